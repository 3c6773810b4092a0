"""The nightly Prefect flow: segment every image of an archive that is not already done.

    discover -> for each image (at most `concurrency` at once): ingest -> segment -> finalize -> stats

One Prefect task per image and stage (Prefect costs milliseconds to a second per task run:
never spend it per tile or block); the stages of one image run inside its `image` task, so
the UI shows each image with its stages. The segment stages of all images stream their blocks
into one pool of Ray actors, created once per run. Transient errors (object storage, a lost
Ray worker) are retried with back-off; a stage resumes where it stopped (finished shards and
blocks are recorded in the work folder). A bad image fails alone: it is recorded with its
error and the others go on. The run holds the output root's lock throughout.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re

# The ephemeral API server's telemetry heartbeat races the first migrations on SQLite
# ("database is locked") and has no network to report to anyway.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows import image_run  # noqa: E402
from flows.image_run import ImageRun, SegmentSummary, plan_image, resolve_settings  # noqa: E402
from flows.manifest import image_key, is_done  # noqa: E402
from flows.progress import stage_progress, transient_stages  # noqa: E402
from flows.root_lock import root_lock, storage_problem  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.model_card import load_card  # noqa: E402
from pipelines.regions import load_regions  # noqa: E402
from pipelines.sources import image_stem  # noqa: E402
from pipelines.stats import begin_run, compact, validate_run_id  # noqa: E402
from segworkers.actors import ActorPool, ensure_ray  # noqa: E402

IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".nii", ".nii.gz")
RETRY_DELAYS_S = [2, 10, 30]
# Errors about the output root itself: retrying cannot help.
PERMANENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: lost connections and timeouts (object storage), a Ray worker or node
    that died; never bad input or a full or read-only disk."""
    import ray.exceptions

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


def stage(function):
    """A per-image stage as a Prefect task: no caching (results live in the output root),
    retried with back-off on transient errors only."""
    return task(function, cache_policy=NO_CACHE, retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
                retry_condition_fn=retry_transient)


@stage
def ingest(run: ImageRun) -> None:
    image_run.ingest(run)


@stage
def segment(run: ImageRun, pool: ActorPool) -> SegmentSummary:
    return image_run.segment(run, pool)


@stage
def finalize(run: ImageRun) -> None:
    image_run.finalize(run)


@stage
def record_stats(run: ImageRun, summary: SegmentSummary, run_id: str, run_date: dt.date) -> None:
    """The image's statistics, then its manifest record: written last, it marks the image done."""
    image_run.record_stats(run, summary, run_id, run_date)
    image_run.complete(run, run_id, run_date)


@task(cache_policy=NO_CACHE, task_run_name="image {run.name}")
def process_image(run: ImageRun, pool: ActorPool, run_id: str, run_date: dt.date) -> dict:
    try:
        ingest(run)
        summary = segment(run, pool)
        finalize(run)
        record_stats(run, summary, run_id, run_date)
        # Small on purpose: a night of 100,000 images keeps every task's result until it ends.
        return {"blocks": len(summary.blocks), "blocks_resumed": summary.blocks_resumed,
                "blocks_by_node": summary.blocks_by_node}
    except InputError:
        image_run.discard(run)
        raise


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def discover_images(archive: str) -> list[str]:
    """The images in a local folder, matching a glob, or under an s3:// prefix."""
    return storage.list_images(archive, IMAGE_SUFFIXES)


def failure_message(exc: BaseException, out: str) -> str:
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, OSError) and (problem := storage_problem(out, exc)):
        return str(problem)
    return f"{type(exc).__name__}: {exc}"


@flow(name="segment-archive")
def segment_archive(
    archive: str,
    model: str,
    out: str,
    tile: int | None = None,
    overlap: float | None = None,
    batch: int | None = None,
    device: str | None = None,
    block: int | None = None,
    workers: int | None = None,
    run_id: str | None = None,
    regions: str | None = None,
    region_id: str | None = None,
    concurrency: int = 2,
    ray_address: str | None = None,
    precision: str | None = None,
    channels_last: bool | None = None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
) -> dict:
    """Segment each image in `archive` with `model`, writing results and statistics under `out`.

    The run id (default: today's date, so a night's re-run resumes the same run) names the
    run's rows in the statistics. `ray_address` joins an existing Ray cluster (default:
    RAY_ADDRESS, else a local one). `precision`, `channels_last`, `compile` and `cuda_graphs`
    override the card's runtime options. Returns the run's report: done, skipped and failed images,
    and blocks per Ray node."""
    logger = get_run_logger()
    card = load_card(model).with_runtime(precision, channels_last, compile, cuda_graphs)
    settings = resolve_settings(card, tile=tile, overlap=overlap, batch=batch, block=block, device=device,
                                workers=workers, regions=regions, region_id=region_id)
    if regions:
        load_regions(regions, region_id)  # a bad regions file stops the run before any work
    run_id = validate_run_id(run_id or dt.date.today().isoformat())
    root = str(out)
    report: dict = {"run_id": run_id, "done": [], "skipped": [], "failed": {}, "blocks": {}, "blocks_by_node": {}}
    with root_lock(root, run_id):
        stats_root = storage.join(root, "stats")
        compact(stats_root)  # rows an interrupted earlier run left pending
        run_date = begin_run(stats_root, run_id, dt.date.today())
        report["run_date"] = run_date.isoformat()
        runs = plan_archive(discover_images(archive), card, settings, root, report)
        logger.info("run %s: %d images to segment, %d already done, %d failed to open",
                    run_id, len(runs), len(report["skipped"]), len(report["failed"]))
        if runs:
            ensure_ray(ray_address)
            segment_images(runs, card, settings, run_id, run_date, concurrency, report)
        compact(stats_root)
        write_run_report(root, report)
    logger.info("run %s: %d done, %d skipped, %d failed", run_id, len(report["done"]), len(report["skipped"]),
                len(report["failed"]))
    return report


def plan_archive(uris: list[str], card, settings, root: str, report: dict) -> list[ImageRun]:
    """The images still to do: those the manifest has for this card and settings are skipped
    without opening them; the others are opened and checked against the card."""
    logger = get_run_logger()
    digest = card.digest()
    runs = []
    for uri in uris:
        try:
            if is_done(root, image_key(uri, digest, settings.affecting_output())):
                report["skipped"].append(image_stem(uri))
                continue
            runs.append(plan_image(uri, card, settings, root, digest))
        except InputError as exc:
            logger.error("failed: %s", exc)
            report["failed"][uri] = str(exc)
    return runs


def segment_images(runs: list[ImageRun], card, settings, run_id: str, run_date: dt.date, concurrency: int,
                   report: dict) -> None:
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, key=artifact_key(f"progress-{run_id}"),
                                        description=f"segpipe run {run_id}: images finished")
    runner = ThreadPoolTaskRunner(max_workers=max(1, concurrency))
    with ActorPool(card, settings.device, settings.batch, settings.workers) as pool, transient_stages(), runner:
        with stage_progress(f"run {run_id}: images", len(runs)) as advance:
            futures = [(run, runner.submit(process_image, parameters={
                "run": run, "pool": pool, "run_id": run_id, "run_date": run_date})) for run in runs]
            futures.reverse()
            for finished in range(1, len(runs) + 1):
                run, future = futures.pop()  # dropped once read: memory stays flat over a long night
                try:
                    outcome = future.result()
                    report["blocks"][run.name] = {"total": outcome["blocks"], "resumed": outcome["blocks_resumed"]}
                    for node, count in outcome["blocks_by_node"].items():
                        report["blocks_by_node"][node] = report["blocks_by_node"].get(node, 0) + count
                    report["done"].append(run.name)
                except Exception as exc:  # noqa: BLE001 - one image's failure is recorded, the run goes on
                    message = failure_message(exc, run.out_root)
                    logger.error("failed: %s: %s", run.source.uri, message)
                    report["failed"][run.source.uri] = message
                advance()
                update_progress_artifact(artifact, 100.0 * finished / len(runs))
    rows = [{"image": name, "outcome": "done"} for name in report["done"]]
    rows += [{"image": uri, "outcome": f"failed: {why}"} for uri, why in report["failed"].items()]
    create_table_artifact(rows, key=artifact_key(f"images-{run_id}"), description=f"segpipe run {run_id}")


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]", "-", text.lower())


def write_run_report(root: str, report: dict) -> None:
    """<root>/runs/<run id>.json: what the last attempt of the run did."""
    storage.write_whole(storage.join(root, "runs", f"{report['run_id']}.json"), json.dumps(report, indent=2).encode())
