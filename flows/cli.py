"""The `segpipe` command line.

    segpipe segment SRC --model CARD --out DIR [--tile N] [--overlap F] [--batch N] [--device cpu|cuda]
    segpipe run ARCHIVE --model CARD --out ROOT [--run-id ID] [--concurrency N] [segment options]
    segpipe deploy ARCHIVE --model CARD --out ROOT --cron "0 2 * * *" [--name NAME]
    segpipe stats ROOT [--by class,image,region,run_date] [--change BEFORE AFTER] [--top N --class C] [--sql Q]
    segpipe models list [--classes K] [--bands C]
    segpipe bench [--device cuda] [--model unet-resnet34] [--side N] [--parts ...] [--actors 1,2,4,8]
    segpipe demo [--out DIR]

Bad input (a missing or unreadable image, a card naming a missing weights file, a band count
the card does not fit) ends with one line naming the file and the problem, and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from flows.progress import console
from pipelines.errors import InputError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpipe", description="Segment huge images with semantic segmentation networks.")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment one image")
    segment.add_argument("src", help="source image: a GeoTIFF / COG scene, a whole-slide image, a NIfTI or TIFF-stack volume")
    segment.add_argument("--out", required=True, help="output folder or s3:// prefix")
    add_segment_options(segment)
    segment.add_argument("--tiff", action="store_true",
                         help="slides and Zarr sources: also write labels.tif (a tiled TIFF in pixel coordinates)")
    segment.add_argument("--probabilities", action="store_true",
                         help="also write uint8-quantised class probabilities to DIR/<image>/probabilities.zarr")
    add_statistics_options(segment)

    run = commands.add_parser("run", help="segment every new image of an archive (a Prefect flow; resumable)")
    run.add_argument("archive", help="a folder, a glob ('scenes/2026-*/*.tif') or an s3:// prefix")
    run.add_argument("--out", required=True, help="output root (a folder or an s3:// prefix): images, statistics, manifest")
    add_segment_options(run)
    run.add_argument("--concurrency", type=int, default=2, help="images in progress at once (default 2)")
    add_statistics_options(run)

    deploy = commands.add_parser("deploy", help="serve the run on a schedule against a Prefect server")
    deploy.add_argument("archive", help="a folder, a glob or an s3:// prefix")
    deploy.add_argument("--model", required=True, help="model card: a YAML path or a built-in name")
    deploy.add_argument("--out", required=True, help="output root")
    deploy.add_argument("--cron", required=True, help='schedule, e.g. "0 2 * * *" (every night at 02:00)')
    deploy.add_argument("--name", default="nightly", help="deployment name (default nightly)")

    stats = commands.add_parser("stats", help="areas by class, image, region or run date from an output root's statistics")
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

    models = commands.add_parser("models", help="the model zoo")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_list = models_commands.add_parser("list", help="registry architectures with parameter counts, and built-in cards")
    models_list.add_argument("--classes", type=int, default=21, help="classes to count parameters for (default 21)")
    models_list.add_argument("--bands", type=int, default=3, help="input bands to count parameters for (default 3)")

    bench = commands.add_parser(
        "bench", help="throughput of the worker plane: model alone, segment stage, end to end, MONAI, CPU actor scaling")
    from flows.benchmarks.worker_plane import add_arguments as add_bench_arguments

    add_bench_arguments(bench)

    demo = commands.add_parser("demo", help="run the Prefect flow on the bundled Sentinel-2 demo archive")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="demo folder (default: demo-output)")
    return parser


def add_segment_options(parser: argparse.ArgumentParser) -> None:
    """The model and how it is run: shared by `segment` (one image) and `run` (an archive)."""
    parser.add_argument("--model", required=True, help="model card: a YAML path or a built-in name (s2-cloud)")
    parser.add_argument("--tile", type=int, help="tile side in pixels (default: the card's)")
    parser.add_argument("--overlap", type=float, help="tile overlap fraction in [0, 1) (default: the card's)")
    parser.add_argument("--batch", type=int, help="tiles per model call (default 4)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when the model's runtime can use a GPU")
    parser.add_argument("--blending", choices=("gaussian", "constant"), default="gaussian",
                        help="weights of overlapping tiles (default gaussian, sigma = tile / 8)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average over all flips")
    parser.add_argument("--block", type=int, help="output block (= Zarr shard) side in pixels (default 2048; on a GPU 8 tiles, at least 2048)")
    parser.add_argument("--workers", type=int, help="number of Ray actors (default: one per GPU, or CPUs / 2)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                        help="torch models: compute in this precision (autocast); blending stays fp32 (default: the card's, fp32)")
    parser.add_argument("--channels-last", action="store_true", default=None, help="torch models: channels-last inputs")
    parser.add_argument("--compile", action="store_true", default=None, help="torch models: torch.compile the network")
    parser.add_argument("--cuda-graphs", action="store_true", default=None,
                        help="torch models on a GPU: replay the network as a CUDA graph (batches have one fixed shape)")
    parser.add_argument("--ray-address", help="join this Ray cluster (head host:port, 'auto', or ray://host:10001) "
                                              "instead of starting a local one (default: $RAY_ADDRESS)")


def add_statistics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", help="the run's name in the statistics (default: today's date); "
                                         "re-running a run id replaces its own rows")
    parser.add_argument("--regions", help="a GeoPackage or GeoJSON of regions: also write per region x class areas")
    parser.add_argument("--region-id", help="the regions' id field (default: 'id' or 'name', else the feature id)")


def parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "segment":
            return segment_command(args)
        if args.command == "stats":
            return stats_command(args)
        if args.command == "run":
            return run_command(args)
        if args.command == "deploy":
            from flows.deploy import serve_deployment

            serve_deployment(args.archive, args.model, args.out, args.cron, name=args.name)
            return 0
        if args.command == "models":
            return models_list_command(args)
        if args.command == "bench":
            from flows.benchmarks.worker_plane import run as run_bench

            return run_bench(args)
        return demo_command(args)
    except InputError as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def segment_command(args: argparse.Namespace) -> int:
    from flows.image_run import LABEL_OUTPUTS, plan_image, resolve_settings, run_image
    from flows.report import print_area_table
    from pipelines.model_card import load_card
    from pipelines.regions import load_regions
    from flows.root_lock import root_lock
    from pipelines import storage
    from pipelines.stats import begin_run, compact, validate_run_id

    card = load_card(args.model).with_runtime(args.precision, args.channels_last, args.compile, args.cuda_graphs)
    settings = resolve_settings(
        card, tile=args.tile, overlap=args.overlap, batch=args.batch, block=args.block, device=args.device,
        workers=args.workers, blending=args.blending, tta=args.tta, probabilities=args.probabilities,
        label_tiff=args.tiff, regions=args.regions, region_id=args.region_id,
    )
    run_id = validate_run_id(args.run_id or dt.date.today().isoformat())
    if args.regions:
        load_regions(args.regions, args.region_id)
    run = plan_image(args.src, card, settings, args.out, card.digest())
    shape = " x ".join(str(s) for s in reversed(run.source.shape))
    console.print(f"segmenting {run.source.kind} {run.source.uri} ({shape}) with {card.name} on {settings.device}")
    stats_root = storage.join(run.out_root, "stats")
    if args.ray_address:
        from segworkers.actors import ensure_ray

        ensure_ray(args.ray_address)
    with root_lock(run.out_root, run_id):
        run_date = begin_run(stats_root, run_id, dt.date.today())
        summary, stats = run_image(run, run_id, run_date)
        compact(stats_root)
    print(f"labels:  {storage.join(run.output_dir, LABEL_OUTPUTS[run.source.kind])}\n"
          f"preview: {storage.join(run.output_dir, 'preview.png')}\nstats:   {stats_root}")
    if settings.probabilities:
        print(f"probabilities: {storage.join(run.output_dir, 'probabilities.zarr')} (uint8, probability x 255)")
    print(f"tiles:   {summary.tiles - summary.tiles_skipped} segmented, {summary.tiles_skipped} skipped (no valid pixels)")
    if summary.blocks_resumed:
        print(f"resumed: {summary.blocks_resumed} of {len(summary.blocks)} blocks were done by an interrupted run")
    print_area_table(stats, title=f"{run.name}: per-class areas ({card.name})")
    if summary.blocks_by_node and len(summary.blocks_by_node) > 1:
        print("blocks per Ray node: " + ", ".join(f"{node[:8]} {n}" for node, n in sorted(summary.blocks_by_node.items())))
    return 0


def run_command(args: argparse.Namespace) -> int:
    from flows.archive_flow import segment_archive

    report = segment_archive(
        args.archive, args.model, args.out, tile=args.tile, overlap=args.overlap, batch=args.batch,
        device=args.device, block=args.block, workers=args.workers, run_id=args.run_id, regions=args.regions,
        region_id=args.region_id, concurrency=args.concurrency, ray_address=args.ray_address,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile, cuda_graphs=args.cuda_graphs,
    )
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

    print(f"report: {storage.join(out, 'runs', report['run_id'] + '.json')}; statistics: segpipe stats {out}")


def stats_command(args: argparse.Namespace) -> int:
    from flows.report import print_query_result
    from pipelines import stats_query

    root = str(args.root).rstrip("/")
    stats_root = root if root.endswith("/stats") or root == "stats" else f"{root}/stats"
    con = stats_query.connect(stats_root)
    if args.sql:
        print_query_result(stats_query.sql(con, args.sql), args.format, title=args.sql)
        return 0
    filters = stats_query.Filters(tuple(args.classes), tuple(args.images), args.model, args.run_id, args.since, args.until)
    by = [b.strip() for b in args.by.split(",") if b.strip()]
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


def demo_command(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from flows.archive_flow import segment_archive
    from flows.demo_scene import write_sentinel2_scene
    from flows.report import print_area_table
    from pipelines.stats import read_stats

    archive = args.out / "archive"
    scene = archive / "sentinel2_scene.tif"
    if not scene.exists():
        write_sentinel2_scene(scene)
        console.print(f"wrote the demo archive: {scene}")
    results = args.out / "results"
    report = segment_archive(str(archive), "s2-cloud", str(results))
    for name in report["done"]:
        print(f"segmented {name}: {results / name / 'labels.tif'}, {results / name / 'preview.png'}")
    for name in report["skipped"]:
        print(f"skipped {name}: already done for s2-cloud ({results / name})")
    for uri, reason in report["failed"].items():
        print(f"failed {uri}: {reason}")
    stats = read_stats(results / "stats")
    latest = stats.filter(pc.equal(stats["run_date"], pc.max(stats["run_date"])))
    print_area_table(latest, title=f"Clear / cloud / shadow areas (statistics in {results / 'stats'})")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
