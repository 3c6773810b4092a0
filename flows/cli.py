"""The `segpipe` command line.

    segpipe [--version] [-q | -v] COMMAND ...
    segpipe segment SRC --model CARD --out DIR [--tile N] [--overlap F] [--batch N] [--device cpu|cuda] [--json]
    segpipe run ARCHIVE --model CARD --out ROOT [--run-id ID] [--concurrency N] [segment options]
    segpipe deploy ARCHIVE --model CARD --out ROOT --cron "0 2 * * *" [--name NAME] [run options]
    segpipe stats ROOT [--by class,image,region,run_date] [--change BEFORE AFTER] [--top N --class C] [--sql Q]
    segpipe report ROOT [--run-id ID]
    segpipe train --images IMAGES --labels LABELS --architecture NAME --out DIR [--epochs N] [--workers N] [--resume]
    segpipe evaluate LABELS --reference REFERENCE [--format table|csv|json] [--out DIR]
    segpipe models list [--classes K] [--bands C]
    segpipe bench [--device cuda] [--model unet-resnet34] [--side N] [--parts ...] [--actors 1,2,4,8]
    segpipe demo [--out DIR]
    segpipe serve [--detach] [--stop] [--socket PATH] [--idle-exit SECONDS]

Bad input (a missing or unreadable image, a card naming a missing weights file, a band count
the card does not fit) ends with one line naming the file and the problem, and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from flows.options import RunOptions, add_field_options, add_run_options, options_from_args
from flows.training_run import TrainingOptions
from flows import segpipe_version
from flows.progress import console, note, set_verbosity, verbosity
from flows.resident import ends_at_once_when_interrupted, interrupted, terminated_as_interrupted
from pipelines.errors import InputError

EXIT_BAD_INPUT = 2
# The demo scene is top-of-atmosphere reflectance (Level-1C): the L1C model fits it.
DEMO_CARD = "s2-cloud-l1c"


def add_loudness(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress bars or notes: results and errors only")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also Prefect's and Ray's own messages (banners, task logs, workers' output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpipe", description="Segment huge images with semantic segmentation networks.")
    parser.add_argument("--version", action="version", version=f"segpipe {segpipe_version()}")
    add_loudness(parser, default=False)
    # -q / -v also after the command (`segpipe run ... -q`); there they only override when given.
    loudness = argparse.ArgumentParser(add_help=False)
    add_loudness(loudness, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", parents=[loudness], help="segment one image")
    segment.add_argument("src", help="source image: a GeoTIFF / COG scene, a whole-slide image, a NIfTI or TIFF-stack "
                                     "volume, a Zarr / OME-Zarr array")
    segment.add_argument("--model", required=True, help="model card: a YAML path, a folder holding card.yaml (segpipe train's --out) or a built-in name (s2-cloud)")
    segment.add_argument("--out", required=True, help="output folder or s3:// prefix")
    add_run_options(segment, archive=False)
    segment.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")

    run = commands.add_parser("run", parents=[loudness],
        help="segment every new image of an archive (a Prefect flow; resumable)")
    run.add_argument("archive", help="a folder, a glob ('scenes/2026-*/*.tif') or an s3:// prefix")
    run.add_argument("--model", required=True, help="model card: a YAML path, a folder holding card.yaml (segpipe train's --out) or a built-in name (s2-cloud)")
    run.add_argument("--out", required=True, help="output root (a folder or an s3:// prefix): images, statistics, manifest")
    add_run_options(run, archive=True)
    run.add_argument("--json", action="store_true", help="print the run report as one JSON object on stdout")

    deploy = commands.add_parser("deploy", parents=[loudness],
        help="serve the run on a schedule against a Prefect server")
    deploy.add_argument("archive", help="a folder, a glob or an s3:// prefix")
    deploy.add_argument("--model", required=True, help="model card: a YAML path, a folder holding card.yaml or a built-in name")
    deploy.add_argument("--out", required=True, help="output root")
    deploy.add_argument("--cron", required=True, help='schedule, e.g. "0 2 * * *" (every night at 02:00)')
    deploy.add_argument("--timezone", help="IANA timezone of the cron times (default UTC)")
    deploy.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    add_run_options(deploy, archive=True)

    train = commands.add_parser("train", parents=[loudness],
        help="train a network on labelled images into a model card (Ray Train)")
    train.add_argument("--images", help="an image, or a folder / glob / s3:// prefix of images (required, unless "
                                        "--resume)")
    train.add_argument("--labels",
                       help="its label raster (class ids, 255 = not labelled; a slide: QuPath GeoJSON annotations), "
                            "or a folder of them matched by name (IMAGE.tif, IMAGE_mask.tif, IMAGE_labels.tif, ...); "
                            "required, unless --resume")
    train.add_argument("--out", required=True, help="folder (or s3:// prefix) for card.yaml, weights, metrics and "
                                                    "checkpoints")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_field_options(train, TrainingOptions)
    train.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")

    evaluate = commands.add_parser("evaluate", parents=[loudness],
        help="IoU, Dice, precision, recall and confusion of labels against a "
                                                    "reference")
    evaluate.add_argument("prediction", help="a labels raster (labels.tif, labels.nii.gz), or an output root")
    evaluate.add_argument("--reference", required=True,
                          help="the reference raster on the same grid (255 = not labelled), or for an output root a "
                               "folder of references matched by image name")
    evaluate.add_argument("--format", choices=("table", "csv", "json"), default="table",
                          help="output format (default table)")
    evaluate.add_argument("--out", help="also write evaluation.parquet (per image x class) and confusion.parquet here")

    report = commands.add_parser("report", parents=[loudness],
        help="write a run's HTML report again (<root>/runs/<run id>.html)")
    report.add_argument("root", help="an output root (local folder or s3:// prefix)")
    report.add_argument("--run-id", help="the run (default: the latest report in the root)")

    stats = commands.add_parser("stats", parents=[loudness],
        help="areas by class, image, region or run date from an output root's statistics")
    stats.add_argument("root", help="an output root (local folder or s3:// prefix) or its stats/ folder")
    stats.add_argument("--by", default="class",
                       help="comma-separated grouping: class, image, region, run_date, run_id, model (default: class)")
    stats.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                       help="only this class (repeatable)")
    stats.add_argument("--image", dest="images", action="append", default=[], metavar="NAME",
                       help="only this image, by its stem (repeatable)")
    stats.add_argument("--model", help="only this model card")
    stats.add_argument("--run-id", help="only this run")
    stats.add_argument("--since", type=parse_date, metavar="YYYY-MM-DD", help="only runs on or after this date")
    stats.add_argument("--until", type=parse_date, metavar="YYYY-MM-DD", help="only runs on or before this date")
    stats.add_argument("--change", nargs=2, type=parse_date, metavar=("BEFORE", "AFTER"),
                       help="areas on two run dates side by side, with the change")
    stats.add_argument("--top", type=int, metavar="N", help="the N images with the largest share of --class")
    stats.add_argument("--sql", help="a DuckDB query over the views image_class, block_class, region_class")
    stats.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default table)")

    models = commands.add_parser("models", parents=[loudness], help="the model zoo")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_list = models_commands.add_parser("list", parents=[loudness],
        help="registry architectures with parameter counts, and built-in cards")
    models_list.add_argument("--classes", type=int, default=21, help="classes to count parameters for (default 21)")
    models_list.add_argument("--bands", type=int, default=3, help="input bands to count parameters for (default 3)")

    # The benchmark parses its own options (segpipe bench --help): its modules load only when it runs.
    commands.add_parser("bench", add_help=False, prefix_chars="\0",
                        help="throughput of the worker plane: model alone, segment stage, end to end, MONAI, CPU actor "
                             "scaling (segpipe bench --help)").add_argument("bench_args", nargs=argparse.REMAINDER)

    serve = commands.add_parser("serve", parents=[loudness],
        help="keep a resident segpipe process that runs segment, stats, report, evaluate and models without "
             "their 2-3 s of start-up")
    serve.add_argument("--socket", type=Path,
                       help="where to listen (default: $SEGPIPE_SERVER, else $XDG_RUNTIME_DIR/segpipe/server.sock); "
                            "segpipe commands find it there through the same setting")
    serve.add_argument("--detach", action="store_true",
                       help="run in the background (its log: server.log beside the socket)")
    serve.add_argument("--stop", action="store_true", help="stop the server listening at the socket")
    serve.add_argument("--idle-exit", type=float, metavar="SECONDS", help="stop after this long with nothing to do")

    demo = commands.add_parser("demo", parents=[loudness],
        help="run the Prefect flow on the bundled Sentinel-2 demo archive")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="demo folder (default: demo-output)")
    return parser


def parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbosity("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    try:
        if args.command in ("run", "demo"):
            return flow_command(args)
        if args.command == "segment":
            return segment_command(args)
        if args.command == "stats":
            return stats_command(args)
        if args.command == "report":
            from flows.html_report import rebuild

            print(rebuild(str(args.root).rstrip("/"), args.run_id))
            return 0
        if args.command == "deploy":
            from flows.deploy import serve_deployment

            serve_deployment(args.archive, args.model, args.out, args.cron, name=args.name, timezone=args.timezone,
                             options=options_from_args(args))
            return 0
        if args.command == "train":
            return train_command(args)
        if args.command == "evaluate":
            return evaluate_command(args)
        if args.command == "models":
            return models_list_command(args)
        if args.command == "serve":
            return serve_command(args)
        if args.command == "bench":
            from flows.benchmarks.worker_plane import main as bench

            return bench(args.bench_args, prog="segpipe bench")
        raise AssertionError(f"no such command: {args.command}")
    except InputError as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as stop:
        return interrupted(stop)


def segment_command(args: argparse.Namespace) -> int:
    import dataclasses

    started_at = dt.datetime.now().isoformat(timespec="seconds")
    with ends_at_once_when_interrupted():  # nothing is written before the run starts
        from flows.report import print_area_table
        from flows.root_lock import storage_problem
        from flows.run import claim_folder, plan_image, prepare_run, started
        from segworkers.cluster import worker_error
        from flows.stages import run_image
        from pipelines import storage

        run = prepare_run(args.model, args.out, options_from_args(args))
        image = plan_image(run, args.src)
    shape = " x ".join(str(s) for s in reversed(image.source.shape))
    if verbosity() != "quiet":
        console.print(f"segmenting {image.source.kind} {image.source.uri} ({shape}) with {run.card.name} on "
                      f"{run.options.device}")
    for text in image.notes:
        note(text)
    with started(run) as run:
        image = claim_folder(dataclasses.replace(image, run=run))
        try:
            result = run_image(image)
        except OSError as exc:  # a full or read-only disk, also from inside a worker
            raise storage_problem(run.out_root, worker_error(exc)) or exc
    summary = result.summary
    if run.options.regions and len(image.source.shape) == 2:
        from pipelines.regions import load_regions, outside_raster_note

        regions = load_regions(run.options.regions, run.options.region_id)
        if outside := outside_raster_note(regions, image.source.crs_wkt, image.source.regions_transform,
                                              *image.source.shape):
            note(outside)
            image = dataclasses.replace(image, notes=(*image.notes, outside))
    page = write_segment_report(run, image, result, started_at)
    if args.json:
        from flows.stages import image_entry

        print(json.dumps({"image": image.name, "run_id": run.run_id, "run_date": run.run_date.isoformat(),
                          "model": run.card.name, "notes": list(image.notes), "statistics": run.stats_root,
                          "report": page, "blocks": len(summary.blocks), "blocks_resumed": summary.blocks_resumed,
                          **image_entry(image, result)}))
        return 0
    for output in image.outputs:
        if output.file in result.written:
            label = "labels" if output.name == image.source.labels_output else output.name
            print(f"{label + ':':8s} {storage.join(image.output_dir, output.file)} ({output.description})")
    print(f"stats:   {run.stats_root}")
    print(f"report:  {page}")
    print(f"tiles:   {summary.tiles - summary.tiles_skipped} segmented, {summary.tiles_skipped} skipped (no valid pixels)")
    if summary.blocks_resumed:
        print(f"resumed: {summary.blocks_resumed} of {len(summary.blocks)} blocks were done by an interrupted run")
    print_area_table(result.stats, title=f"{image.name}: per-class areas ({run.card.name})")
    if summary.blocks_by_node and len(summary.blocks_by_node) > 1:
        print("blocks per Ray node: " + ", ".join(f"{node[:8]} {n}" for node, n in sorted(summary.blocks_by_node.items())))
    return 0


def write_segment_report(run, image, result, started_at: str) -> str:
    """`segment`'s report for its image: <root>/runs/<run id>-<image>.json and .html beside it (a
    run of the same id keeps its own), which `segpipe report --run-id <run id>-<image>` rebuilds."""
    from flows.html_report import write_html_report
    from flows.stages import image_entry
    from pipelines import storage

    report = {"run_id": run.run_id, "run_date": run.run_date.isoformat(), "model": run.card.name,
              "model_version": run.card.version, "archive": image.source.uri, "out": run.out_root,
              "started": started_at, "finished": dt.datetime.now().isoformat(timespec="seconds"),
              "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in run.card.classes],
              "done": [image.name], "skipped": [], "failed": {},
              "blocks": {image.name: {"total": len(result.summary.blocks), "resumed": result.summary.blocks_resumed}},
              "images": {image.name: image_entry(image, result)}}
    name = storage.join(run.out_root, "runs", f"{run.run_id}-{image.name}")
    storage.write_whole(f"{name}.json", json.dumps(report, indent=2, default=str).encode())
    return write_html_report(run.out_root, report, f"{name}.html")


def flow_command(args: argparse.Namespace) -> int:
    """`run` and `demo` run the Prefect flow. Its API (a temporary server of this command's own,
    unless PREFECT_API_URL names one) starts first, and while it does the flow's modules are
    imported, the run's card and options checked and, where the model runs on Ray actors
    (segworkers.cluster.runs_in_driver), Ray and the actors started."""
    import threading

    model, out, options = (args.model, args.out, options_from_args(args)) if args.command == "run" else (
        DEMO_CARD, args.out / "results", RunOptions())
    with contextlib.ExitStack() as running:
        with collection_paused(), ends_at_once_when_interrupted():  # until the flow begins, nothing is written
            from flows.prefect_api import prefect_api
            from segworkers.cluster import ensure_ray, runs_in_driver

            api_ready = running.enter_context(prefect_api())
            # The flow's modules (torch, Prefect) are imported beside Ray's start-up, which mostly waits for its processes.
            importing = threading.Thread(target=importlib.import_module, args=("flows.archive_flow",))
            importing.start()
            if not runs_in_driver("cpu", options.workers, options.ray_address):  # a cluster, or a machine for several actors
                ensure_ray(options.ray_address)
            importing.join()
            from flows.archive_flow import run_night
            from flows.run import prepare_run

            # Bad input stops the command here; else the actors start (and load the model) while the flow does.
            run = prepare_run(model, out, options)
        on_actors = not runs_in_driver(run.options.device, run.options.workers, run.options.ray_address)
        if on_actors:
            from segworkers.actors import ActorPool

            ensure_ray(run.options.ray_address)
            ActorPool.prestart(run.card, run.options.device, run.options.batch, run.options.workers)
        try:
            api_ready()
            with terminated_as_interrupted():
                return run_command(args, run_night) if args.command == "run" else demo_command(args, run_night)
        finally:
            if on_actors:
                ActorPool.discard_prestarted()


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection within: while a command loads torch, Prefect and Ray, each
    full collection walks every object they have made so far (about 400,000 at the end): six of
    them, 0.5 s of CPU beside Prefect's server starting on the same cores. Loading makes
    little garbage; what it made is collected after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_command(args: argparse.Namespace, run_night) -> int:
    report = run_night(args.archive, args.model, args.out, options_from_args(args))
    from pipelines.sources import left_out_note, nothing_found_note

    if not (report["done"] or report["skipped"] or report["failed"]):  # nothing found at all
        note(nothing_found_note(args.archive))
    else:
        left_out = left_out_note(args.archive)
        if left_out:
            note(left_out)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print_run_report(report, args.out)
    return 1 if report["failed"] else 0


def print_run_report(report: dict, out) -> None:
    print(f"run {report['run_id']} ({report.get('run_date', '')}): {len(report['done'])} done, "
          f"{len(report['skipped'])} skipped (already done), {len(report['failed'])} failed")
    for name in report["done"]:
        blocks = report.get("blocks", {}).get(name, {})
        resumed = f" (resumed: {blocks['resumed']} of {blocks['total']} blocks were done)" if blocks.get("resumed") else ""
        print(f"  done    {name}{resumed}")
    for uri, reason in report["failed"].items():
        print(f"  failed  {reason if reason.startswith(uri) else f'{uri}: {reason}'}")
    from pipelines import storage

    if "report_error" in report:
        print(f"report: not written ({report['report_error']}); statistics: segpipe stats {out}")
    else:
        print(f"report: {report.get('html') or storage.join(out, 'runs', report['run_id'] + '.json')}; "
              f"statistics: segpipe stats {out}")


def stats_command(args: argparse.Namespace) -> int:
    from pipelines import stats_query

    root = str(args.root).rstrip("/")
    stats_root = root if root.endswith("/stats") or root == "stats" else f"{root}/stats"
    try:
        return answer_stats(args, stats_query.connect(stats_root), stats_root)
    except (stats_query.duckdb.Error, InputError) as exc:
        # DuckDB says a view's stream failed, not which file or what to do: look for the file.
        cause = exc if isinstance(exc, stats_query.duckdb.Error) else exc.__cause__
        if isinstance(cause, stats_query.duckdb.Error) and "stream registered as" in str(cause):
            from pipelines.stats import damaged_file

            damaged = damaged_file(stats_root)
            if damaged is not None:
                raise damaged from exc
        raise


def answer_stats(args: argparse.Namespace, con, stats_root: str) -> int:
    from flows.report import print_query_result
    from pipelines import stats_query

    if args.sql:
        print_query_result(stats_query.sql(con, args.sql), args.format, title=args.sql)
        return 0
    filters = stats_query.Filters(tuple(args.classes), tuple(args.images), args.model, args.run_id, args.since, args.until)
    by = [b.strip() for b in args.by.split(",") if b.strip()]
    stats_query.check_filters(con, filters, tuple(args.change) if args.change else None, by)
    if args.top is not None:
        if len(args.classes) != 1:
            raise InputError("--top", "name exactly one --class to rank the images by")
        result = stats_query.top_images(con, args.classes[0], args.top, filters)
        title = f"top {args.top} images by {args.classes[0]} share"
    elif args.change:
        before, after = args.change
        result = stats_query.changes(con, before, after, by, filters)
        title = f"change by {', '.join(by)} from {before} to {after}"
    else:
        result = stats_query.areas_by(con, by, filters)
        title = f"areas by {', '.join(by)} ({stats_root})"
    print_query_result(result, args.format, title=title)
    return 0


def train_command(args: argparse.Namespace) -> int:
    from flows.training_run import epoch_line, options_from_values, parse_option_values, train

    given = {name: getattr(args, name) for name in TrainingOptions.model_fields if getattr(args, name, None) is not None}
    for name in ("bands", "clip", "augment"):
        if name in given:
            given[name] = tuple(b.strip() for b in given[name].split(",") if b.strip() and b.strip() != "none")
    if "architecture_options" in given:
        given["architecture_options"] = parse_option_values(given["architecture_options"])
    trained = train(args.images, args.labels, args.out, options_from_values(**given), resume=args.resume)
    last = trained.history[-1]
    if args.json:
        print(json.dumps({"card": trained.card_path, "epochs": len(trained.history), "seconds": round(trained.seconds, 1),
                          "validation": {k: v for k, v in last.items() if k != "confusion"}}))
        return 0
    print(f"card:    {trained.card_path}")
    print(f"metrics: {trained.card_path.rsplit('/', 1)[0]}/metrics.json, metrics.parquet, metrics.png")
    print(f"last {epoch_line(last, len(trained.history))}")
    print(f"segment: segpipe segment IMAGE --model {trained.card_path} --out DIR")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from flows.report import print_evaluation
    from pipelines.evaluation import evaluate, pairs_to_evaluate

    pairs, notes = pairs_to_evaluate(args.prediction, args.reference)
    for text in notes:
        note(text)
    agreements = [evaluate(prediction, reference, image=name) for name, prediction, reference in pairs]
    print_evaluation(agreements, args.format, args.out)
    return 0


def models_list_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipelines.model_card import builtin_card_names, load_card
    from segworkers import models

    table = Table(title=f"segworkers.models ({args.classes} classes, {args.bands} input bands)")
    table.add_column("name")
    table.add_column("parameters", justify="right")
    for name in models.names():
        table.add_row(name, f"{models.parameter_count(name, args.classes, args.bands) / 1e6:,.2f} M")
    cards = Table(title="built-in model cards")
    for column in ("card", "format", "classes", "tile"):
        cards.add_column(column)
    for name in builtin_card_names():
        card = load_card(name)
        cards.add_row(name, card.format, ", ".join(c.name for c in card.classes), str(card.tile_size))
    Console().print(table, cards)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from flows.resident import ServerProblem, serve, socket_path, stop_server

    path = args.socket or socket_path()
    if path is None:
        raise InputError("SEGPIPE_SERVER", "is off: name the socket with --socket")
    try:
        if args.stop:
            process = stop_server(path)
            print(f"stopped the segpipe server at {path} (pid {process})" if process
                  else f"no segpipe server listens at {path}")
            return 0
        return serve(path, idle_exit=args.idle_exit, detach=args.detach)
    except ServerProblem as exc:
        raise InputError(exc.path, exc.reason) from exc


def demo_command(args: argparse.Namespace, run_night) -> int:
    import pyarrow.compute as pc

    from flows.demo_scene import write_sentinel2_scene
    from flows.report import print_area_table
    from pipelines.stats import read_stats

    archive = args.out / "archive"
    scene = archive / "sentinel2_scene.tif"
    if not scene.exists():
        write_sentinel2_scene(scene)
        console.print(f"wrote the demo archive: {scene}")
    results = args.out / "results"
    report = run_night(str(archive), DEMO_CARD, str(results))
    for name in report["done"]:
        print(f"segmented {name}: {results / name / 'labels.tif'}, {results / name / 'preview.png'}")
    for name in report["skipped"]:
        print(f"skipped {name}: already done for {DEMO_CARD} ({results / name})")
    for uri, reason in report["failed"].items():
        print(f"failed {uri}: {reason}")
    stats = read_stats(results / "stats")
    latest = stats.filter(pc.equal(stats["run_date"], pc.max(stats["run_date"])))
    print_area_table(latest, title=f"Clear / cloud / shadow areas (statistics in {results / 'stats'})")
    return 1 if report["failed"] else 0


def leave_to_exit() -> None:
    """For a command's own process, once the command is done: its objects (about 400,000 of
    torch, Prefect and Ray after a night) are left out of the interpreter's last garbage
    collections at exit, which walked them all for 0.8 s. The command has closed what it
    wrote; exit handlers (Ray's shutdown, stopping Prefect's temporary server) still run."""
    gc.freeze()


if __name__ == "__main__":
    code = main()
    leave_to_exit()
    sys.exit(code)
