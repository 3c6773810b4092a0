"""The nightly Prefect flow: segment every image of an archive that is not already done.

    discover -> for each image (at most `concurrency` at once): ingest -> segment -> finalize -> record

One Prefect task per image and stage (Prefect costs milliseconds to a second per task run:
never spend it per tile or block); the stages of one image run inside its `image` task, so
the UI shows each image with its stages. The segment stages of all images stream their blocks
into one pool of Ray actors, created once per run. Transient errors (object storage, a lost
Ray worker) are retried with back-off; a stage resumes where it stopped (finished blocks are
recorded in the work folder). A bad image fails alone: it is recorded with its
error and the others go on. The run holds the output root's lock throughout.
"""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from the
# signature, and a deployment's run cannot resolve string annotations such as "RunOptions".
import contextlib
import datetime as dt
import errno
import json
import math
import re
import time
from pathlib import Path

from flows.prefect_api import quiet_prefect

quiet_prefect()  # before Prefect is imported

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.exceptions import TerminationSignal  # noqa: E402
from prefect.states import Failed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from flows import stages  # noqa: E402
from flows.html_report import write_html_report  # noqa: E402
from flows.manifest import image_key, is_done  # noqa: E402
from flows.options import RunOptions  # noqa: E402
from flows.progress import note, stage_progress, transient_stages  # noqa: E402
from flows.root_lock import storage_problem  # noqa: E402
from flows.run import ImageRun, Run, claim_folder, fold_statistics, plan_image, prepare_run, started  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.sources import image_stem, list_archive  # noqa: E402
from segworkers.actors import ActorPool  # noqa: E402
from segworkers.cluster import ensure_ray, runs_in_driver, worker_error  # noqa: E402
from segworkers.local_pool import WorkStopped  # noqa: E402

RETRY_DELAYS_S = [2, 10, 30]
# Errors about the output root itself: retrying cannot help.
PERMANENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: lost connections and timeouts (object storage), a Ray worker or node
    that died; never bad input or a full or read-only disk."""
    import ray.exceptions

    exc = worker_error(exc)
    if isinstance(exc, InputError):
        return False
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in PERMANENT_ERRNOS and not isinstance(exc, (FileNotFoundError, IsADirectoryError))
    return isinstance(exc, (ConnectionError, TimeoutError))


def retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception, re-raised to inspect it
        return is_transient(exc)
    return False


def retrying(function, *arguments):
    """`function(*arguments)`, called again after each of RETRY_DELAYS_S while it fails with a
    transient error; bad input and a root that cannot take writes fail at once."""
    for retry, delay in enumerate([*RETRY_DELAYS_S, None], start=1):
        try:
            return function(*arguments)
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            get_run_logger().warning("Retry %d/%d of %s in %d s after %s", retry, len(RETRY_DELAYS_S),
                                     function.__name__, delay, one_line(worker_error(exc)))
            time.sleep(delay)


# Small images go through the stages in batches of up to this many pixels (and images): a
# Prefect task costs tens of milliseconds of the driver's time, an image of 512 x 512 about half
# a second of a CPU's model time; a batch's blocks also share the model's batches.
BATCH_PIXELS = 4096 * 4096
BATCH_IMAGES = 32


def image_batches(images: list[ImageRun]) -> list[list[ImageRun]]:
    """Consecutive images in batches of at most BATCH_PIXELS pixels (an image with more is a
    batch of its own) and BATCH_IMAGES images."""
    batches: list[list[ImageRun]] = []
    pixels = 0
    for image in images:
        size = math.prod(image.source.shape)
        if batches and pixels + size <= BATCH_PIXELS and len(batches[-1]) < BATCH_IMAGES:
            batches[-1].append(image)
            pixels += size
        else:
            batches.append([image])
            pixels = size
    return batches


def batch_names(images: list[ImageRun]) -> str:
    """How the UI names a batch: "T32UQD", "a, b", "a … z (32 images)"."""
    names = [image.name for image in images]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]} ({len(names)} images)"


@task(cache_policy=NO_CACHE, task_run_name="{title}")
def stage_task(title: str, work) -> None:
    work()


@task(cache_policy=NO_CACHE, task_run_name="image {names}")
def process_images(names: str, images: list[ImageRun], pool: ActorPool) -> list[dict]:
    """A batch of images through their stages (flows.stages.run_images), each stage a task
    named by the stage and the images ("segment T32UQD"). Each image's outcome: its report
    entry, or its failure in one line."""
    logger = get_run_logger()
    outcomes = stages.run_images(images, pool, attempt=retrying,
                                 run_stage=lambda stage, work: stage_task(f"{stage.__name__} {names}", work))
    entries = []
    for image, outcome in zip(images, outcomes):
        if isinstance(outcome, BaseException):
            message = failure_message(outcome, image.run.out_root)
            expected = isinstance(worker_error(outcome), (InputError, OSError, WorkStopped))
            uri = image.source.uri
            logger.error("failed: %s", message if message.startswith(uri) else f"{uri}: {message}",
                         exc_info=None if expected else outcome)
            entries.append({"failed": message})
            continue
        # Small on purpose: a night of 100,000 images keeps every task's result until it ends.
        summary = outcome.summary
        entries.append({"blocks": len(summary.blocks), "blocks_resumed": summary.blocks_resumed,
                        "blocks_by_node": summary.blocks_by_node, **stages.image_entry(image, outcome)})
    return entries


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def discover_images(archive: str) -> list[str]:
    """The images in a local folder, matching a glob, or under an s3:// prefix."""
    return list_archive(archive)


def failure_message(exc: BaseException, out: str) -> str:
    """One line for the report: bad input and storage problems as segpipe words them, anything
    else as its type and the first line of its message (the traceback goes to the log)."""
    exc = worker_error(exc)
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, OSError) and (problem := storage_problem(out, exc)):
        return str(problem)
    return one_line(getattr(exc, "cause", None) or exc)


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    first = next((line for line in ANSI_CODES.sub("", str(exc)).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first.strip()}"


@flow(name="segment-archive")
def segment_archive(archive: str, model: str, out: str, options: RunOptions = RunOptions()) -> dict:
    """Segment each image in `archive` with `model`, writing results and statistics under `out`.

    `options` (flows.options.RunOptions) are those of `segpipe run`: the run id (default:
    today's date, so a night's re-run resumes the same run) names the run's rows in the
    statistics; `ray_address` joins an existing Ray cluster (default: RAY_ADDRESS, else a local
    one). Returns the run's report: done, skipped and failed images, and blocks per Ray node."""
    try:
        report = run_archive(archive, model, out, options)
    except InputError as exc:
        # Bad input stops the run in one line: the flow run is Failed with it as its message (no
        # traceback in the log), and a caller gets the InputError itself.
        return Failed(message=str(exc), data=exc)
    if report["failed"]:  # users filter the runs with failed images by this state
        return Failed(message=f"{len(report['failed'])} image(s) failed, {len(report['done'])} done, "
                              f"{len(report['skipped'])} skipped: see the run report", data=report)
    return report


def run_night(archive: str, model: str, out: str, options: RunOptions | None = None) -> dict:
    """The segment-archive flow, run in this process, and its report, also when images failed
    (the flow run then ends Failed); bad input that stops the whole run raises its InputError."""
    state = segment_archive(archive, model, out, options or RunOptions(), return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result


def run_archive(archive: str, model: str, out: str, options: RunOptions) -> dict:
    logger = get_run_logger()
    run = prepare_run(model, out, options)
    options = run.options
    report: dict = {"run_id": run.run_id, "model": run.card.name, "model_version": run.card.version,
                    "archive": storage.absolute(archive), "out": storage.absolute(run.out_root), "started": dt.datetime.now().isoformat(timespec="seconds"),
                    "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in run.card.classes],
                    "done": [], "skipped": [], "failed": {}, "blocks": {}, "blocks_by_node": {}, "images": {}}
    with started(run) as run, contextlib.ExitStack() as stack:
        report["run_date"] = run.run_date.isoformat()
        to_do = images_to_do(discover_images(archive), run, report)
        if to_do and runs_in_driver(options.device, options.workers, options.ray_address):
            pool = stack.enter_context(stages.local_pool(run.card, options))
        elif to_do:  # the actors start (and load the model) while the images are opened
            ensure_ray(run.options.ray_address)
            pool = stack.enter_context(ActorPool.take(run.card, options.device, options.batch, options.workers))
        images = open_images(to_do, run, report)
        logger.info("run %s: %d images to segment, %d already done, %d failed to open",
                    run.run_id, len(images), len(report["skipped"]), len(report["failed"]))
        if images:
            run_batches(images, run, report, pool)
        report["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        fold_statistics(run)  # the report's chart of the nights then reads one file, not one per image
        try:
            whole = write_run_report(run.out_root, report)
            report["html"] = write_html_report(run.out_root, whole)
        except OSError as exc:  # the summary is printed all the same
            report["report_error"] = failure_message(exc, run.out_root)
            logger.error("the run report could not be written: %s", report["report_error"])
        publish_artifacts(report)
    logger.info("run %s: %d done, %d skipped, %d failed", run.run_id, len(report["done"]), len(report["skipped"]),
                len(report["failed"]))
    return report


def images_to_do(uris: list[str], run: Run, report: dict) -> list[tuple[str, str]]:
    """(URI, manifest key) of the images not done yet: those the manifest has for this card and
    settings are skipped without opening them."""
    to_do = []
    for uri in uris:
        try:
            key = image_key(uri, run.card_digest, run.output_settings)
        except (InputError, OSError) as exc:
            fail_to_open(uri, exc, run, report)
            continue
        if is_done(run.out_root, key):
            report["skipped"].append(image_stem(uri))
        else:
            to_do.append((uri, key))
    return to_do


def open_images(to_do: list[tuple[str, str]], run: Run, report: dict) -> list[ImageRun]:
    """The images opened and checked against the card, each with its folder in the root."""
    logger = get_run_logger()
    images = []
    for uri, key in to_do:
        try:
            image = claim_folder(plan_image(run, uri, key))
        except (InputError, OSError) as exc:
            fail_to_open(uri, exc, run, report)
            continue
        for text in image.notes:
            logger.warning(text)
        images.append(image)
    return images


def fail_to_open(uri: str, exc: BaseException, run: Run, report: dict) -> None:
    message = failure_message(exc, run.out_root)
    get_run_logger().error("failed: %s", message if message.startswith(uri) else f"{uri}: {message}")
    report["failed"][uri] = message


def run_batches(images: list[ImageRun], run: Run, report: dict, pool: ActorPool) -> None:
    artifact = create_progress_artifact(0.0, key=artifact_key(f"progress-{run.run_id}"),
                                        description=f"segpipe run {run.run_id}: images finished")
    runner = ThreadPoolTaskRunner(max_workers=max(1, run.options.concurrency))
    with transient_stages(), runner:
        with stage_progress(f"run {run.run_id}: images", len(images)) as advance:
            futures = [(batch, runner.submit(process_images, parameters={
                "names": batch_names(batch), "images": quote(batch), "pool": pool})) for batch in image_batches(images)]
            futures.reverse()
            finished = 0
            while futures:
                batch, future = futures.pop()  # dropped once read: memory stays flat over a long night
                try:
                    entries = wait_for_batch(future, pool)
                except Exception as exc:  # noqa: BLE001 - a batch that broke: its images failed, the run goes on
                    get_run_logger().error("failed: %s", batch_names(batch), exc_info=exc)
                    entries = [{"failed": failure_message(exc, run.out_root)}] * len(batch)
                for image, entry in zip(batch, entries):
                    if "failed" in entry:
                        report["failed"][image.source.uri] = entry["failed"]
                        continue
                    report["blocks"][image.name] = {"total": entry["blocks"], "resumed": entry["blocks_resumed"]}
                    report["images"][image.name] = {key: value for key, value in entry.items()
                                                    if not key.startswith("blocks")}
                    for node, count in entry["blocks_by_node"].items():
                        report["blocks_by_node"][node] = report["blocks_by_node"].get(node, 0) + count
                    report["done"].append(image.name)
                finished += len(batch)
                advance(len(batch))
                update_progress_artifact(artifact, 100.0 * finished / len(images))


def wait_for_batch(future, pool):
    """The batch's entries. On Ctrl-C or SIGTERM (which Prefect raises as TerminationSignal
    while its flow runs), the pool is stopped first: the images in progress finish the blocks
    they have on the model, keep them (their work folders) and end, instead of the night waiting
    for whole images (minutes for a large one) before it can stop."""
    try:
        return future.result()
    except (KeyboardInterrupt, TerminationSignal):
        if pool is not None:
            pool.stop()
            note("stopping after the blocks in progress; the same command resumes the night")
        raise


def publish_artifacts(report: dict) -> None:
    """The run in Prefect's UI: a table of every image (done with its areas, outputs, time and
    resumed blocks; failed with its whole reason; skipped) and a markdown summary with the class
    areas and the HTML report's location."""
    from flows.report import format_area

    run_id = report["run_id"]
    rows = []
    for name in report["done"]:
        entry, blocks = report["images"].get(name, {}), report["blocks"].get(name, {})
        areas = "; ".join(f"{c} {format_area(v['area'], entry['area_unit'])}" for c, v in entry.get("classes", {}).items())
        rows.append({"image": name, "outcome": "done", "areas": areas, "seconds": entry.get("seconds"),
                     "resumed blocks": f"{blocks.get('resumed', 0)} of {blocks.get('total', 0)}",
                     "outputs": ", ".join(entry.get("outputs", []))})
    rows += [{"image": uri, "outcome": f"failed: {why}"} for uri, why in report["failed"].items()]
    rows += [{"image": name, "outcome": "skipped: already done"} for name in report["skipped"]]
    create_table_artifact(rows, key=artifact_key(f"images-{run_id}"), description=f"segpipe run {run_id}")
    create_markdown_artifact(run_summary_markdown(report), key=artifact_key(f"summary-{run_id}"),
                             description=f"segpipe run {run_id}: summary")


def run_summary_markdown(report: dict) -> str:
    from flows.report import format_area

    totals: dict[tuple[str, str], float] = {}
    for entry in report["images"].values():
        for name, value in entry.get("classes", {}).items():
            totals[name, entry["area_unit"]] = totals.get((name, entry["area_unit"]), 0.0) + value["area"]
    lines = [f"# segpipe run {report['run_id']} ({report.get('run_date', '')})", "",
             f"{len(report['done'])} done, {len(report['skipped'])} skipped, {len(report['failed'])} failed; "
             f"model {report.get('model', '')}.", ""]
    if report.get("html"):
        # A file URI, escaped: a root whose path has a space or a '#' broke the markdown link.
        target = report["html"] if storage.is_remote(report["html"]) else Path(report["html"]).resolve().as_uri()
        lines += [f"Report: [{report['html']}]({target})", ""]
    if totals:
        lines += ["| class | area |", "|---|---|"] + [f"| {name} | {format_area(area, unit)} |"
                                                    for (name, unit), area in totals.items()]
    for uri, why in report["failed"].items():
        lines.append(f"- failed: `{uri}`: {why}")
    return "\n".join(lines) + "\n"


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]", "-", text.lower())


def write_run_report(root: str, report: dict) -> dict:
    """<root>/runs/<run id>.json: what the run has done over all its attempts (a night resumed
    after a crash, or run again by its schedule, keeps the images its earlier attempts finished
    as done, not as skipped), with each attempt's counts under "attempts". Returns it."""
    path = storage.join(root, "runs", f"{report['run_id']}.json")
    whole = with_earlier_attempts(report, earlier_report(path))
    storage.write_whole(path, json.dumps(whole, indent=2).encode())
    return whole


def earlier_report(path: str) -> dict:
    try:
        earlier = json.loads(storage.read_bytes(path)) if storage.exists(path) else {}
    except (OSError, ValueError):  # a report cut short by a crash: this attempt's alone is written
        return {}
    return earlier if isinstance(earlier, dict) else {}


def attempt_counts(report: dict) -> dict:
    """One attempt of a run: when, and what it did."""
    return {"started": report.get("started"), "finished": report.get("finished"), "done": len(report.get("done", [])),
            "skipped": len(report.get("skipped", [])), "failed": len(report.get("failed", {}))}


def attempts_of(report: dict) -> list[dict]:
    """A run report's attempts (one, for a report written before they were recorded)."""
    return report["attempts"] if "attempts" in report else [attempt_counts(report)]


def with_earlier_attempts(report: dict, earlier: dict) -> dict:
    """`report` (this attempt) with the images an earlier attempt of the same run id finished
    that this one skipped as done: they are done in the run. Images skipped as done by another
    run id stay skipped."""
    attempt = attempt_counts(report)
    earlier_images = earlier.get("images", {})
    unclaimed = [name for name in earlier.get("done", []) if name in earlier_images and name not in report["done"]]
    carried, skipped = [], []
    for stem in report["skipped"]:
        match = next((name for name in unclaimed if image_stem(earlier_images[name].get("uri", "")) == stem), None)
        if match is None:
            skipped.append(stem)
        else:
            unclaimed.remove(match)
            carried.append(match)
    whole = dict(report, done=carried + report["done"], skipped=skipped,
                 images={**{name: earlier_images[name] for name in carried}, **report["images"]},
                 blocks={**{name: earlier.get("blocks", {}).get(name, {}) for name in carried}, **report["blocks"]},
                 attempts=[*attempts_of(earlier), attempt] if carried else [attempt])
    if carried:
        whole["started"] = earlier.get("started", report.get("started"))
        whole["blocks_by_node"] = dict(earlier.get("blocks_by_node", {}))
        for node, count in report["blocks_by_node"].items():
            whole["blocks_by_node"][node] = whole["blocks_by_node"].get(node, 0) + count
    return whole
