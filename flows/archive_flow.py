"""The Prefect flow: segment every image of an archive that is not already done for this model.

One task per image and stage (Prefect costs ~0.1-1 s per task run, never spend it per tile);
Ray is called from inside the segment task. A bad image fails alone: it is recorded and the
flow goes on with the others.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pyarrow as pa

# The ephemeral API server's telemetry heartbeat races the first migrations on SQLite
# ("database is locked") and has no network to report to anyway.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import image_run
from flows.image_run import ImageRun, SegmentSummary, plan_image, resolve_settings
from flows.manifest import is_done
from pipelines import storage
from pipelines.errors import InputError
from pipelines.model_card import load_card
from pipelines.regions import load_regions
from pipelines.stats import begin_run, compact

IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".nii", ".nii.gz")


@task(cache_policy=NO_CACHE)
def discover_images(archive: str) -> list[str]:
    """The images directly in a local folder or under an s3:// prefix."""
    return storage.list_images(archive, IMAGE_SUFFIXES)


@task(cache_policy=NO_CACHE)
def ingest(run: ImageRun) -> None:
    image_run.ingest(run)


@task(cache_policy=NO_CACHE)
def segment(run: ImageRun) -> SegmentSummary:
    return image_run.segment(run)


@task(cache_policy=NO_CACHE)
def finalize(run: ImageRun) -> None:
    image_run.finalize(run)


@task(cache_policy=NO_CACHE)
def record_stats(run: ImageRun, summary: SegmentSummary, run_id: str, run_date: dt.date) -> pa.Table:
    table = image_run.record_stats(run, summary, run_id, run_date)
    image_run.complete(run, run_id, run_date)
    return table


@flow(name="segment-archive")
def segment_archive(
    archive: str,
    model: str,
    out: str,
    tile: int | None = None,
    overlap: float | None = None,
    batch: int | None = None,
    device: str | None = None,
    run_id: str | None = None,
    regions: str | None = None,
    region_id: str | None = None,
) -> dict:
    """Segment each image in `archive` with `model`, writing results and statistics under `out`.

    The run id (default: today's date, so a night's re-run resumes the same run) names the
    run's rows in the statistics."""
    logger = get_run_logger()
    card = load_card(model)
    digest = card.digest()
    settings = resolve_settings(card, tile=tile, overlap=overlap, batch=batch, device=device, regions=regions,
                                region_id=region_id)
    if regions:
        load_regions(regions, region_id)  # a bad regions file stops the run before any work
    stats_root = Path(out) / "stats"
    compact(stats_root)  # rows an interrupted earlier run left pending
    run_id = run_id or dt.date.today().isoformat()
    run_date = begin_run(stats_root, run_id, dt.date.today())
    report: dict = {"done": [], "skipped": [], "failed": {}, "stats": []}
    for uri in discover_images(archive):
        try:
            run = plan_image(uri, card, settings, Path(out), digest)
        except InputError as exc:
            logger.error("failed: %s", exc)
            report["failed"][uri] = str(exc)
            continue
        if is_done(run.out_root, run.key):
            logger.info("skipping %s: already segmented with %s and these settings", run.name, card.name)
            report["skipped"].append(run.name)
            continue
        try:
            ingest(run)
            summary = segment(run)
            finalize(run)
            report["stats"].append(record_stats(run, summary, run_id, run_date))
            report["done"].append(run.name)
        except InputError as exc:
            image_run.discard(run)
            logger.error("failed: %s", exc)
            report["failed"][uri] = str(exc)
    compact(stats_root)
    report["run_id"] = run_id
    return report
