"""Segmenting one image, stage by stage, written once for the CLI, the Prefect flow and the
benchmarks:

    ingest -> segment -> finalize -> record

Each stage is a plain function of an ImageRun (flows.run); `run_image` calls them in a row
through a `run_stage` function, which the flow uses to run each as a Prefect task and the
benchmark to time them. Intermediate stores live in the image's work folder
(flows.work_folder); the image's folder <out>/<image>/ only appears, whole, when its outputs
are complete, and the manifest record is written after the statistics.

The output root is a local folder or an s3:// prefix (shared storage every node of a Ray
cluster can reach): the work folder, its Zarr stores and records then live under the prefix
too, and finished outputs are staged locally and uploaded. Object storage has no rename, so
there an image's outputs are complete when its manifest record exists (written last), not
when its folder appears.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

import numpy as np
import pyarrow as pa

from flows.html_report import keep_thumbnail
from flows.manifest import mark_done
from flows.options import RunOptions
from flows.progress import stage_progress
from flows.run import ImageRun
from pipelines import storage
from pipelines.areas import PixelAreas
from pipelines.background import tiles_with_data
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.outputs import OutputContext
from pipelines.regions import load_regions, region_class_counts
from pipelines.sources import SourcePixels
from pipelines.stats import (
    BlockCounts, ImageInfo, block_class_table, image_class_table, image_file_id, region_class_table, write_image_rows,
)
from pipelines.tiling import Box, TileGrid, block_partition
from pipelines.zarr_stores import create_label_store, create_probability_store, ingest_source, store_blocks
from segworkers.cluster import CPU_ACTOR_THREADS, cluster_asked_for, runs_in_driver
from segworkers.local_pool import LocalPool, WorkStopped

if TYPE_CHECKING:
    from segworkers.actors import ActorPool

Pool = Union["ActorPool", LocalPool]
"""Where the model runs: Ray actors (segworkers.actors), or this process (segworkers.local_pool)."""
from segworkers.predictor import BlockJob, BlockResult

logger = logging.getLogger(__name__)


def ingest(image: ImageRun, stopped: Callable[[], bool] = lambda: False) -> None:
    """Copy the source into the image store, block by block; a resumed run copies only the
    blocks an interrupted one had not finished. Sources read in place are not copied. Once
    `stopped()` (Ctrl-C in a night), the blocks being copied finish and are recorded, and
    WorkStopped is raised."""
    options = image.run.options
    work = image.work
    work.prepare({"key": image.key, "block": options.block, "tile": options.tile})
    if image.source.in_place_store or work.has_background_mask():
        return  # nothing to copy (no nodata value either, so no mask); or ingest is done
    if image.reads_in_place:  # nothing to copy: the source is read once, for its mask
        mask = ingest_source(image.source, image.bands, None, options.tile, options.block, nodata=image.nodata)
    else:
        blocks = block_partition(image.source.shape, (options.block,) * len(image.source.shape))
        with stage_progress(f"ingest {image.name}", len(blocks)) as advance:
            def block_done(box: Box) -> None:
                work.mark_ingested(box)
                advance()
                if stopped():  # dask starts no other block once one raises
                    raise WorkStopped()

            mask = ingest_source(image.source, image.bands, work.image_store, options.tile, options.block,
                                 on_block_done=block_done, done=work.ingested_blocks(), nodata=image.nodata)
    source_mask = image.source.background_mask()
    work.save_background_mask(mask if source_mask is None else source_mask)


@dataclass(frozen=True)
class SegmentSummary:
    class_counts: np.ndarray
    """Valid pixels per class, summed over the blocks as their workers counted them."""
    tiles: int
    tiles_skipped: int
    """Tiles with no valid pixel, never sent to the model."""
    class_areas: np.ndarray | None = None
    area_unit: str = "px"
    blocks: tuple[BlockCounts, ...] = ()
    """Per output block: its bounds and the class counts and areas its worker wrote."""
    blocks_resumed: int = 0
    """Blocks an interrupted run had finished, taken from their records, not segmented again."""
    blocks_by_node: dict = field(default_factory=dict)
    """Ray node id -> blocks it segmented in this run (resumed blocks not counted)."""


@dataclass
class SegmentPlan:
    """The blocks of one label store: the jobs, and the results known so far (blocks an
    interrupted run finished, blocks without data)."""

    name: str
    jobs: list[BlockJob]
    results: list[BlockResult | None]
    tiles: int
    """Tiles in the grid."""
    skipped: int
    """Tiles with no valid pixel, never sent to a model."""
    blocks_resumed: int
    areas: PixelAreas | None
    work: object = None
    by_node: dict = field(default_factory=dict)

    @property
    def todo(self) -> list[int]:
        return [i for i, result in enumerate(self.results) if result is None]


def segment(image: ImageRun, pool: Pool | None = None) -> SegmentSummary:
    """Labels (and probabilities if an output needs them) into their Zarr stores, block by block
    on Ray actors.

    Each finished block is recorded in the work folder; a resumed run segments only the blocks
    without a record (those in flight when it was interrupted, and those never started)."""
    return segment_images([image], pool)[0]


def segment_images(images: list[ImageRun], pool: Pool | None = None) -> list[SegmentSummary]:
    """`segment` of several images at once: their blocks go to the actors together, small
    blocks in groups whose tiles share the model's batches."""
    plans = [plan_segment(
        image.run.card,
        image.run.options,
        image_store=image.image_store,
        label_store=image.work.label_store,
        background_mask=image.work.load_background_mask(),
        bands=image.store_bands,
        probability_store=image.work.probability_store if image.needs_probabilities else None,
        name=image.name,
        areas=image.source.pixel_areas(),
        work=image.work,
        image_is_source=image.source.in_place_store is not None,
        nodata=image.nodata,
        source=image.source if image.reads_in_place else None,
        source_bands=image.bands,
    ) for image in images]
    run_plans(images[0].run.card, images[0].run.options, plans, pool)
    return [summarise(plan) for plan in plans]


def segment_store(
    card: ModelCard,
    options: RunOptions,
    image_store: str | Path,
    label_store: str | Path,
    pool: Pool | None = None,
    **plan_options,
) -> SegmentSummary:
    """Segment a (band, *spatial) Zarr image, 2D or 3D, into a label store, with resolved
    options (RunOptions.resolved); `plan_options` as plan_segment takes them."""
    plan = plan_segment(card, options, image_store, label_store, **plan_options)
    run_plans(card, options, [plan], pool)
    return summarise(plan)


def plan_segment(
    card: ModelCard,
    options: RunOptions,
    image_store: str | Path,
    label_store: str | Path,
    background_mask: np.ndarray | None = None,
    probability_store: str | Path | None = None,
    name: str = "image",
    areas: PixelAreas | None = None,
    bands: tuple[int, ...] | None = None,
    work=None,
    image_is_source: bool = False,
    nodata: float | None = None,
    source=None,
    source_bands: tuple[int, ...] = (),
) -> SegmentPlan:
    """The block jobs of a label store (created here unless a resumed run's is there).

    With a `work` folder (flows.work_folder), every finished block leaves a record there, and
    blocks that already have one (and the stores they were written to) are kept: an
    interrupted segmentation resumes. With a `source`, the model reads it in place (its
    1-based `source_bands`) instead of `image_store`."""
    import zarr

    shape = source.shape if source is not None else zarr.open_array(str(image_store), mode="r").shape[1:]
    grid = TileGrid(shape, options.tile, options.overlap)
    attributes = {"classes": [c.name for c in card.classes], "model": card.name}
    if work is not None and work.in_memory:  # the labels come back with the results and stay in memory
        work.create_labels(shape, options.block)
        recorded, label_store, blocks = {}, None, block_partition(shape, (options.block,) * len(shape))
    else:
        label_store = str(label_store)
        recorded = work.block_records() if work and storage.exists(storage.join(label_store, "zarr.json")) else {}
        if not recorded:
            create_label_store(label_store, shape, chunk=options.tile, block=options.block, attributes=attributes)
            if probability_store:
                create_probability_store(probability_store, card.num_classes, shape, options.tile, options.block,
                                         attributes)
        blocks = store_blocks(label_store)
    with_data = tiles_with_data(grid, background_mask) if background_mask is not None else None
    jobs = [
        BlockJob(
            image_store=str(image_store),
            label_store=label_store,
            block=block,
            tiles=tuple(
                t for t in grid.tiles_touching(block.grown(card.block_margin))
                if with_data is None or t.start in with_data
            ),
            tile_size=grid.tile_size,
            blending=options.blending,
            tta=options.tta,
            probability_store=str(probability_store) if probability_store else None,
            row_areas=areas.row_areas[block.start[0] : block.stop[0]] if areas else None,
            bands=bands,
            image_is_source=image_is_source,
            nodata=nodata,
            source=source,
            source_bands=source_bands,
        )
        for block in blocks
    ]
    results: list[BlockResult | None] = [recorded.get(job.block.start) for job in jobs]
    blocks_resumed = sum(result is not None for result in results)
    for i, job in enumerate(jobs):
        if results[i] is None and not job.tiles:  # no data in it: its shard stays unwritten, nodata
            results[i] = empty_block(job, card.num_classes)
    skipped = 0 if with_data is None else len(grid) - len(with_data)
    return SegmentPlan(name, jobs, results, len(grid), skipped, blocks_resumed, areas, work)


def run_plans(card: ModelCard, options: RunOptions, plans: list[SegmentPlan], pool: Pool | None) -> None:
    """Every block still to do of every plan, on the actors; each finished block recorded (in
    its work folder) as it comes back. Progress is counted in tiles run (a tile straddling a
    block border runs in each block it touches): the time of a block grows with its tiles, so
    the estimate of the time left holds."""
    todo = [(plan, i) for plan in plans for i in plan.todo]
    tiles_to_run = sum(len(job.tiles) for plan in plans for job in plan.jobs)
    tiles_done = tiles_to_run - sum(len(plan.jobs[i].tiles) for plan, i in todo)
    resumed = sum(plan.blocks_resumed for plan in plans)
    what = plans[0].name if len(plans) == 1 else f"{len(plans)} images"
    tiles, skipped = sum(p.tiles for p in plans), sum(p.skipped for p in plans)
    # The bar counts tile runs: a tile on a block border runs once in each block it touches.
    runs = f"; {tiles_to_run} tile runs, border tiles once per block" if tiles_to_run != tiles - skipped else ""
    description = (f"segment {what} ({tiles} tiles, {skipped} without data skipped{runs}"
                   f"{f', {resumed} blocks done before' if resumed else ''})")
    with stage_progress(description, tiles_to_run, completed=tiles_done) as advance:
        def block_done(index: int, result: BlockResult) -> None:
            plan, i = todo[index]
            if plan.work:
                plan.work.write_block_record(result)
            plan.results[i] = result
            plan.by_node[result.node] = plan.by_node.get(result.node, 0) + 1
            advance(len(plan.jobs[i].tiles))

        jobs = [plan.jobs[i] for plan, i in todo]
        if pool is None and (is_small_work(jobs, options) or
                             runs_in_driver(options.device, options.workers, options.ray_address)):
            with local_pool(card, options) as own_pool:
                own_pool.run(jobs, block_done)
            return
        if pool is not None:
            pool.run(jobs, block_done)
            return
        from segworkers.actors import segment_blocks  # Ray, imported only by work that runs on it

        segment_blocks(card, jobs, device=options.device, batch_size=options.batch, workers=options.workers,
                       on_block_done=block_done)


# Work of up to this many tiles, with no cluster asked for, runs in this process: starting Ray
# and an actor (about 8 s on a 2-core machine) costs more than the model time of such work.
SMALL_WORK_TILES = 64


def is_small_work(jobs: list[BlockJob], options: RunOptions) -> bool:
    return not cluster_asked_for(options.workers, options.ray_address) and \
        sum(len(job.tiles) for job in jobs) <= SMALL_WORK_TILES


def local_pool(card: ModelCard, options: RunOptions) -> LocalPool:
    """The model in this process (segworkers.cluster.runs_in_driver), with a CPU actor's threads."""
    return LocalPool(card, options.device, options.batch, threads=min(CPU_ACTOR_THREADS, os.cpu_count() or 1))


def summarise(plan: SegmentPlan) -> SegmentSummary:
    results = plan.results
    counts = np.sum([r.class_counts for r in results], axis=0)
    if plan.areas is None:
        return SegmentSummary(counts, plan.tiles, plan.skipped, blocks_by_node=plan.by_node)
    blocks = tuple(BlockCounts(r.block.start, r.block.stop, r.class_counts, r.class_areas) for r in results)
    return SegmentSummary(
        counts, plan.tiles, plan.skipped, np.sum([r.class_areas for r in results], axis=0), plan.areas.unit, blocks,
        plan.blocks_resumed, plan.by_node,
    )


def empty_block(job: BlockJob, num_classes: int) -> BlockResult:
    """A block without a tile to run: the worker would write nodata everywhere and count nothing."""
    areas = None if job.row_areas is None else np.zeros(num_classes)
    return BlockResult(job.block, np.zeros(num_classes, dtype=np.int64), 0, areas)


def finalize(image: ImageRun) -> tuple[str, ...]:
    """Write the run's outputs (pipelines.outputs) into a staging folder, then move the image's
    folder into place in one rename (on object storage: upload it, then drop what an earlier
    output had and this one has not). Returns the files written: an output that is not
    required (the preview) and fails is left out, with a warning."""
    import zarr

    work = image.work
    remote = storage.is_remote(image.run.out_root)
    staged = Path(tempfile.mkdtemp(prefix=f"segpipe-{image.name}-")) if remote else Path(image.work_path) / "output"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    context = OutputContext(
        name=image.name, source=image.source, card=image.run.card,
        labels=work.labels(),
        image=SourcePixels(image.source, image.bands) if image.reads_in_place else zarr.open_array(image.image_store, mode="r"),
        image_bands=image.store_bands,
        probability_store=work.probability_store if image.needs_probabilities else None,
        image_band_names=image.store_band_names,
        provenance=image.run.provenance(),
        options={"simplify": image.run.options.vector_simplify},
    )
    written = []
    try:
        for output in image.outputs:
            try:
                output.write(context, staged)
            except Exception as exc:  # noqa: BLE001 - any failure of a writer
                if full_disk := full_disk_error(staged):
                    raise full_disk from exc
                if output.required:
                    raise
                logger.warning("%s: no %s (%s: %s); the labels and statistics are written", image.source.uri,
                               output.file, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                shutil.rmtree(staged / output.file, ignore_errors=True)
                continue
            written.append(output.file)
        if (picture := context.pictures.get("preview")) is not None:  # drawn and saved
            keep_thumbnail(image.run.out_root, image.run.run_id, image.name, picture)
        storage.publish_folder(staged, image.output_dir, previous=storage.join(image.work_path, "previous-output"))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        if work.in_memory and not remote:  # the folder was only for staging
            shutil.rmtree(image.work_path, ignore_errors=True)
    return tuple(written)


def full_disk_error(folder: Path) -> OSError | None:
    """GDAL and other writers report a full disk as a plain I/O error, without errno: when the
    folder written to has no space left, that is what the error was."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= FULL_DISK_BYTES:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))


FULL_DISK_BYTES = 1 << 20


def record(image: ImageRun, summary: SegmentSummary, written: tuple[str, ...]) -> pa.Table:
    """The image's statistics (per class, per block x class, per region x class) as pending rows
    of the run, then its manifest record: written last, it marks the image done. Returns the
    per-class rows."""
    run, source = image.run, image.source
    info = ImageInfo(image.name, source.uri, image.key, summary.area_unit)
    run_info = run.run_info()
    classes = run.card.classes
    georeferenced = source.crs_wkt is not None
    tables = {
        "image_class": image_class_table(info, run_info, classes, summary.class_counts, summary.class_areas),
        "block_class": block_class_table(
            info, run_info, classes, summary.blocks,
            transform=source.transform if georeferenced else None,
            crs=crs_name(source.crs_wkt) if georeferenced else None,
        ),
    }
    if run.options.regions:
        regions = load_regions(run.options.regions, run.options.region_id)
        tables["region_class"] = region_class_table(info, run_info, classes, regions.source,
                                                    count_regions(image, regions))
    write_image_rows(run.stats_root, run.run_id, run.run_date, image_file_id(source.uri, image.name, run.card.name),
                     tables)
    mark_done(
        run.out_root,
        image.key,
        {"image": image.name, "uri": source.uri, "model": run.card.name, "run_id": run.run_id,
         "run_date": run.run_date, "outputs": [storage.join(image.output_dir, name) for name in written]},
    )
    image.work.remove()
    return tables["image_class"]


def count_regions(image: ImageRun, regions) -> list[tuple[str, np.ndarray, np.ndarray]]:
    source = image.source
    if len(source.shape) != 2:
        raise InputError(regions.source, "region statistics need a 2D image, not a volume")
    labels = image.work.labels()
    counted = region_class_counts(regions, labels, source.crs_wkt, source.regions_transform,
                                  image.run.card.num_classes, source.pixel_areas().row_areas)
    return [(r.region, r.counts, r.areas) for r in counted]


def crs_name(crs_wkt: str) -> str:
    """EPSG:xxxx where the CRS has such a code, else its WKT."""
    from rasterio.crs import CRS

    crs = CRS.from_wkt(crs_wkt)
    code = crs.to_epsg()
    return f"EPSG:{code}" if code else crs_wkt


def discard(image: ImageRun) -> None:
    """Drop a bad image's intermediate stores; its published folder is left as it was. (Other
    failures keep them: the next run resumes from the finished blocks.)"""
    image.work.remove()


def call(function: Callable, *args):
    return function(*args)


def run_now(stage: Callable, work: Callable[[], None]) -> None:
    work()


@dataclass(frozen=True)
class ImageResult:
    summary: SegmentSummary
    stats: pa.Table
    """The per-class rows."""
    written: tuple[str, ...]
    """The files and folders in the image's output folder."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Per stage, as run_images timed it (the shared segment stage: this image's share, by tiles)."""


class Batch:
    """Images going through the stages together, each one's results and failure kept apart: a
    bad image fails alone, the others go on."""

    def __init__(self, images: list[ImageRun], pool: Pool | None = None):
        self.images = images
        self.pool = pool
        self.failures: dict[str, BaseException] = {}
        self.values: dict[str, dict] = {"ingest": {}, "segment": {}, "finalize": {}, "record": {}}
        self.seconds: dict[str, dict[str, float]] = {image.name: {} for image in images}

    @property
    def live(self) -> list[ImageRun]:
        return [image for image in self.images if image.name not in self.failures]

    def fail(self, image: ImageRun, exc: BaseException) -> None:
        if isinstance(exc, InputError):
            discard(image)  # bad input: nothing of it is worth keeping
        self.failures[image.name] = exc

    def stopped(self) -> bool:
        """The pool was stopped (Ctrl-C in a night): no image starts another long stage. The
        record of an image whose outputs are written (milliseconds) is still made."""
        return self.pool is not None and self.pool.stopping.is_set()

    def each(self, stage: Callable, attempt: Callable, arguments: Callable = lambda image: ()) -> None:
        """`stage(image, *arguments(image))` for every image still going."""
        for image in self.live:
            if stage is not record and self.stopped():
                self.fail(image, WorkStopped())
                continue
            started = time.perf_counter()
            try:
                self.values[stage.__name__][image.name] = attempt(stage, image, *arguments(image))
            except Exception as exc:  # noqa: BLE001 - recorded; the other images go on
                self.fail(image, exc)
            finally:
                self.seconds[image.name][stage.__name__] = round(time.perf_counter() - started, 3)

    def segment(self, pool: Pool | None, attempt: Callable) -> None:
        """The segment stage of every image still going, their blocks on the actors together.
        When that fails, each image is segmented alone (the blocks already done are kept), so
        that the one at fault fails alone."""
        live = self.live
        if len(live) == 1:
            return self.each(segment, attempt, lambda image: (pool,))
        started = time.perf_counter()
        try:
            summaries = attempt(segment_images, live, pool)
        except WorkStopped as stop:  # the blocks finished are recorded; the images resume from them
            for image in live:
                self.fail(image, stop)
            return
        except Exception:  # noqa: BLE001 - which image? each alone says
            return self.each(segment, attempt, lambda image: (pool,))
        seconds = time.perf_counter() - started
        tiles = sum(summary.tiles for summary in summaries) or 1
        for image, summary in zip(live, summaries):
            self.values["segment"][image.name] = summary
            self.seconds[image.name]["segment"] = round(seconds * summary.tiles / tiles, 3)

    def outcomes(self) -> list[ImageResult | BaseException]:
        return [self.failures.get(image.name) or ImageResult(
            self.values["segment"][image.name], self.values["record"][image.name],
            self.values["finalize"][image.name], self.seconds[image.name]) for image in self.images]


def run_images(images: list[ImageRun], pool: Pool | None = None, run_stage: Callable = run_now,
               attempt: Callable = call) -> list[ImageResult | BaseException]:
    """Every stage of several images, stage by stage: each image's result, or the exception it
    failed with. `run_stage(stage, work)` runs each stage's work for the whole batch (a Prefect
    task in a flow, a timer in a benchmark); `attempt(function, *arguments)` calls each image's
    stage (with retries, in a flow)."""
    batch = Batch(images, pool)
    run_stage(ingest, lambda: batch.each(ingest, attempt, lambda image: (batch.stopped,)))
    run_stage(segment, lambda: batch.segment(pool, attempt))
    run_stage(finalize, lambda: batch.each(finalize, attempt))
    run_stage(record, lambda: batch.each(record, attempt, lambda image: (batch.values["segment"][image.name],
                                                                         batch.values["finalize"][image.name])))
    return batch.outcomes()


def run_image(image: ImageRun, pool: Pool | None = None, run_stage: Callable = run_now) -> ImageResult:
    """Every stage of one image; what it failed with is raised."""
    [outcome] = run_images([image], pool, run_stage)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def image_entry(image: ImageRun, result: ImageResult) -> dict:
    """What the run report keeps of a finished image."""
    rows = result.stats.to_pylist()
    return {"uri": image.source.uri, "kind": image.source.kind, "shape": list(image.source.shape),
            "stages": result.seconds, "seconds": round(sum(result.seconds.values()), 3),
            "outputs": [storage.join(image.output_dir, name) for name in result.written],
            "area_unit": result.summary.area_unit,
            "classes": {row["class_name"]: {"pixels": row["pixel_count"], "area": row["area"]} for row in rows},
            "valid_pixels": int(result.summary.class_counts.sum()), "tiles": result.summary.tiles,
            "tiles_skipped": result.summary.tiles_skipped}
