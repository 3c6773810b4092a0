"""Segmenting one image, stage by stage: ingest, segment, finalize, stats.

Each stage is a plain function over an ImageRun so that the CLI can call them in a row and
the Prefect flow can wrap each one as a task. Intermediate stores live under
<out>/.work/<image>-<key>/; the image's folder <out>/<image>/ only appears, whole, when its
outputs are complete, and the manifest record is written after the statistics.

The output root is a local folder or an s3:// prefix (shared storage every node of a Ray
cluster can reach): the work folder, its Zarr stores and records then live under the prefix
too, and finished outputs are staged locally and uploaded. Object storage has no rename, so
there an image's outputs are complete when its manifest record exists (written last), not
when its folder appears.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from flows.manifest import image_key, mark_done
from flows.progress import stage_progress
from pipelines import storage
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.cog import write_labels_cog
from pipelines.preview import render_preview
from pipelines.background import FACTOR
from pipelines.ome_zarr import write_ome_zarr_image, write_ome_zarr_labels
from pipelines.slides import tissue_mask
from pipelines.sources import SourceInfo, inspect_source, resolve_bands, source_areas
from pipelines.volumes import write_labels_nifti
from pipelines.areas import PixelAreas
from pipelines.regions import RegionSet, load_regions, region_class_counts
from pipelines.stats import (
    BlockCounts, ImageInfo, RunInfo, block_class_table, image_class_table, image_file_id, region_class_table,
    write_image_rows,
)
from pipelines.background import tiles_with_data
from pipelines.tiling import Region, TileGrid, block_partition
from pipelines.zarr_stores import create_label_store, create_probability_store, ingest_source, shard_regions
from segworkers.actors import ActorPool, segment_blocks
from segworkers.predictor import BlockJob, BlockResult
from segworkers.tile_models import best_device

DEFAULT_BLOCK = 2048
DEFAULT_BLOCK_3D = 128
BLOCK_TILES_ON_GPU = 8


@dataclass(frozen=True)
class SegmentSettings:
    tile: int
    overlap: float
    batch: int
    block: int
    device: str
    blending: str = "gaussian"
    tta: bool = False
    probabilities: bool = False
    label_tiff: bool = False
    """Also write labels.tif for sources whose labels go to OME-Zarr (slides, Zarr)."""
    workers: int | None = None
    regions: str | None = None
    """A vector file (GeoPackage, GeoJSON) of regions to count classes in."""
    region_id: str | None = None
    """The regions' id field (default: 'id' or 'name' if there is one, else the feature id)."""

    def affecting_output(self) -> dict:
        """The settings that change the outputs or statistics; block size and worker count never do."""
        settings = {"tile": self.tile, "overlap": self.overlap, "blending": self.blending, "tta": self.tta,
                    "probabilities": self.probabilities}
        if self.regions:  # the regions file's identity too: editing it changes the region statistics
            settings["regions"] = {"file": str(Path(self.regions).resolve()), "version": storage.stat(self.regions),
                                   "id": self.region_id}
        return settings


def resolve_settings(
    card: ModelCard,
    tile: int | None = None,
    overlap: float | None = None,
    batch: int | None = None,
    block: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    blending: str = "gaussian",
    tta: bool = False,
    probabilities: bool = False,
    label_tiff: bool = False,
    regions: str | None = None,
    region_id: str | None = None,
) -> SegmentSettings:
    tile = tile or card.tile_size
    if card.fixed_tile_size and tile != card.tile_size:
        raise InputError(card.source, f"model '{card.name}' takes only {card.tile_size}-pixel tiles, not {tile}")
    overlap = card.overlap if overlap is None else overlap
    if not 0 <= overlap < 1:
        raise InputError(card.source, f"overlap must be in [0, 1), got {overlap}")
    device = device or best_device(card)
    block = block or default_block(card.spatial_dims, tile, device)
    block = -(-max(block, tile) // tile) * tile  # a whole number of tile-sized chunks per shard
    return SegmentSettings(
        tile=tile, overlap=overlap, batch=batch or 4, block=block, device=device,
        blending=blending, tta=tta, probabilities=probabilities, label_tiff=label_tiff, workers=workers,
        regions=str(regions) if regions else None, region_id=region_id,
    )


def default_block(spatial_dims: int, tile: int, device: str) -> int:
    """The block side when none is given. A block also runs the tiles straddling its border
    (its neighbour runs them too): at tile 1024 and overlap 0.25, 2048-pixel blocks run each grid
    tile 1.78 times on average, 8192-pixel blocks 1.10 times. A GPU has the memory for big
    blocks (8 tiles a side: about 2 GB per block in flight at 6 classes); host memory per CPU
    actor stays bounded by the 2048 default."""
    if spatial_dims != 2:
        return DEFAULT_BLOCK_3D
    return max(DEFAULT_BLOCK, BLOCK_TILES_ON_GPU * tile) if device == "cuda" else DEFAULT_BLOCK


@dataclass(frozen=True)
class ImageRun:
    source: SourceInfo
    bands: tuple[int, ...]
    """The card's bands resolved against this source (1-based indexes)."""
    card: ModelCard
    settings: SegmentSettings
    out_root: str
    """A local folder or an s3:// prefix."""
    key: str

    @property
    def name(self) -> str:
        return self.source.stem

    @property
    def work_dir(self) -> str:
        return storage.join(self.out_root, ".work", f"{self.name}-{self.key[:12]}")

    @property
    def image_store(self) -> str:
        """Where the model reads the image (a path or URL): a Zarr source is used in place (local
        or s3://), others are ingested."""
        if self.source.kind == "zarr":
            return self.source.detail.array_path
        return storage.join(self.work_dir, "image.zarr")

    @property
    def store_bands(self) -> tuple[int, ...] | None:
        """0-based channels of image_store the model reads; None when ingest kept only those."""
        return tuple(b - 1 for b in self.bands) if self.source.kind == "zarr" else None

    @property
    def label_store(self) -> str:
        return storage.join(self.work_dir, "labels.zarr")

    @property
    def probability_store(self) -> str:
        return storage.join(self.work_dir, "probabilities.zarr")

    @property
    def background_mask(self) -> str:
        return storage.join(self.work_dir, "valid_lowres.npy")

    @property
    def ingested_dir(self) -> str:
        """One marker per source shard copied into image_store."""
        return storage.join(self.work_dir, "ingested")

    @property
    def blocks_dir(self) -> str:
        """One record per output block segmented: its class counts and areas."""
        return storage.join(self.work_dir, "blocks")

    @property
    def state_file(self) -> str:
        return storage.join(self.work_dir, "state.json")

    @property
    def output_dir(self) -> str:
        return storage.join(self.out_root, self.name)


def plan_image(src: str | Path, card: ModelCard, settings: SegmentSettings, out_root: str | Path, card_digest: str
               ) -> ImageRun:
    """Check the source against the card before anything is written."""
    info = inspect_source(src, card)
    bands = resolve_bands(info, card)
    key = image_key(info.uri, card_digest, settings.affecting_output())
    return ImageRun(info, bands, card, settings, str(out_root), key)


def prepare_work_dir(run: ImageRun) -> bool:
    """Keep the image's work folder from an interrupted run when it was made with the same
    key and block size (so its shards and block records still apply); otherwise start it
    afresh. Returns True when resuming."""
    state = {"key": run.key, "block": run.settings.block, "tile": run.settings.tile}
    if storage.exists(run.state_file):
        try:
            if json.loads(storage.read_bytes(run.state_file)) == state:
                return True
        except ValueError:
            pass  # a torn state file: start again
    storage.remove_tree(run.work_dir)
    storage.write_whole(run.state_file, json.dumps(state).encode())
    return False


def region_id(region: Region) -> str:
    return "_".join(str(s) for s in region.start)


def ingest(run: ImageRun) -> None:
    """Copy the source into the image store, shard by shard; a resumed run copies only the
    shards an interrupted one had not finished."""
    prepare_work_dir(run)
    if run.source.kind == "zarr" or storage.exists(run.background_mask):
        return  # a Zarr source is read in place (no nodata value, so no mask); or ingest is done
    done = frozenset(tuple(int(v) for v in name.split("_"))
                     for name in storage.list_names(run.ingested_dir) if not name.startswith("."))
    if done and not storage.exists(storage.join(run.image_store, "zarr.json")):
        done = frozenset()
    shards = block_partition(run.source.shape, (run.settings.block,) * len(run.source.shape))
    with stage_progress(f"ingest {run.name}", len(shards)) as advance:
        def shard_done(region: Region) -> None:
            storage.write_whole(storage.join(run.ingested_dir, region_id(region)), b"")
            advance()

        mask = ingest_source(run.source, run.bands, run.image_store, run.settings.tile, run.settings.block,
                             on_shard_done=shard_done, done=done)
    if run.source.kind == "slide":  # glass has no nodata value: tissue detection marks what to segment
        mask = tissue_mask(run.source.detail.uri, FACTOR, run.source.slide_level, run.source.slide_scale)
    buffer = io.BytesIO()
    np.save(buffer, mask)
    storage.write_whole(run.background_mask, buffer.getvalue())


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


def segment(run: ImageRun, pool: ActorPool | None = None) -> SegmentSummary:
    """Labels (and probabilities if asked) into their Zarr stores, block by block on Ray actors.

    Each finished block is recorded in the work folder; a resumed run segments only the blocks
    without a record (those in flight when it was interrupted, and those never started)."""
    return segment_store(
        run.card,
        run.settings,
        image_store=run.image_store,
        label_store=run.label_store,
        background_mask=np.load(io.BytesIO(storage.read_bytes(run.background_mask)))
        if storage.exists(run.background_mask) else None,
        bands=run.store_bands,
        probability_store=run.probability_store if run.settings.probabilities else None,
        name=run.name,
        areas=source_areas(run.source),
        blocks_dir=run.blocks_dir,
        pool=pool,
    )


def segment_store(
    card: ModelCard,
    settings: SegmentSettings,
    image_store: str | Path,
    label_store: str | Path,
    background_mask: np.ndarray | None = None,
    probability_store: str | Path | None = None,
    name: str = "image",
    areas: PixelAreas | None = None,
    bands: tuple[int, ...] | None = None,
    blocks_dir: str | None = None,
    pool: ActorPool | None = None,
) -> SegmentSummary:
    """Segment an ingested (band, *spatial) Zarr image, 2D or 3D, into a label store.

    With `blocks_dir`, every finished block leaves a record there, and blocks that already have
    one (and the stores they were written to) are kept: an interrupted segmentation resumes."""
    import zarr

    shape = zarr.open_array(str(image_store), mode="r").shape[1:]
    grid = TileGrid(shape, settings.tile, settings.overlap)
    attributes = {"classes": [c.name for c in card.classes], "model": card.name}
    label_store = str(label_store)
    recorded = load_block_records(blocks_dir) if blocks_dir and storage.exists(storage.join(label_store, "zarr.json")) else {}
    if not recorded:
        create_label_store(label_store, shape, chunk=settings.tile, block=settings.block, attributes=attributes)
        if probability_store:
            create_probability_store(probability_store, card.num_classes, shape, settings.tile, settings.block, attributes)
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
            blending=settings.blending,
            tta=settings.tta,
            probability_store=str(probability_store) if probability_store else None,
            row_areas=areas.row_areas[block.start[0] : block.stop[0]] if areas else None,
            bands=bands,
        )
        for block in shard_regions(label_store)
    ]
    skipped = 0 if with_data is None else len(grid) - len(with_data)
    results: list[BlockResult | None] = [recorded.get(job.block.start) for job in jobs]
    todo = [i for i, result in enumerate(results) if result is None]
    resumed = f", {len(jobs) - len(todo)} blocks done before" if len(todo) < len(jobs) else ""
    description = f"segment {name} ({len(grid)} tiles, {skipped} without data skipped{resumed})"
    by_node: dict[str, int] = {}
    with stage_progress(description, len(jobs), completed=len(jobs) - len(todo)) as advance:
        def block_done(index: int, result: BlockResult) -> None:
            if blocks_dir:
                write_block_record(blocks_dir, result)
            results[todo[index]] = result
            node = result.node
            by_node[node] = by_node.get(node, 0) + 1
            advance()

        segment_blocks(
            card, [jobs[i] for i in todo], device=settings.device, batch_size=settings.batch,
            workers=settings.workers, on_block_done=block_done, pool=pool,
        )
    counts = np.sum([r.class_counts for r in results], axis=0)
    if areas is None:
        return SegmentSummary(counts, len(grid), skipped, blocks_by_node=by_node)
    blocks = tuple(BlockCounts(r.block.start, r.block.stop, r.class_counts, r.class_areas) for r in results)
    return SegmentSummary(
        counts, len(grid), skipped, np.sum([r.class_areas for r in results], axis=0), areas.unit, blocks,
        len(jobs) - len(todo), by_node,
    )


def write_block_record(blocks_dir: str, result: BlockResult) -> None:
    """After the block's labels are in their shard: what its worker counted (JSON floats
    round-trip exactly, so resumed statistics are byte-identical)."""
    record = {"start": list(result.block.start), "stop": list(result.block.stop), "tiles_run": result.tiles_run,
              "class_counts": result.class_counts.tolist(),
              "class_areas": None if result.class_areas is None else result.class_areas.tolist()}
    storage.write_whole(storage.join(blocks_dir, f"{region_id(result.block)}.json"), json.dumps(record).encode())


def load_block_records(blocks_dir: str) -> dict[tuple[int, ...], BlockResult]:
    records = {}
    for name in storage.list_names(blocks_dir):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        record = json.loads(storage.read_bytes(storage.join(blocks_dir, name)))
        areas = record["class_areas"]
        records[tuple(record["start"])] = BlockResult(
            Region(tuple(record["start"]), tuple(record["stop"])), np.asarray(record["class_counts"], dtype=np.int64),
            record["tiles_run"], None if areas is None else np.asarray(areas, dtype=np.float64),
        )
    return records


LABEL_OUTPUTS = {"scene": "labels.tif", "slide": "image.ome.zarr", "volume": "labels.nii.gz", "zarr": "labels.ome.zarr"}


def finalize(run: ImageRun) -> None:
    """Write the labels in the format viewers of this kind of source open (COG for scenes,
    OME-Zarr for slides, NIfTI for volumes) and preview.png, then move the image's folder into
    place in one rename (on object storage: upload it, then drop what an earlier output had
    and this one has not)."""
    import zarr

    labels = zarr.open_array(run.label_store, mode="r")
    image = zarr.open_array(run.image_store, mode="r")
    remote = storage.is_remote(run.out_root)
    staged = Path(tempfile.mkdtemp(prefix=f"segpipe-{run.name}-")) if remote else Path(run.work_dir) / "output"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        write_outputs(run, labels, image, staged)
        if remote:
            publish_remote(staged, run.output_dir)
        else:
            publish_local(staged, Path(run.output_dir), Path(run.work_dir) / "previous-output")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def write_outputs(run: ImageRun, labels, image, staged: Path) -> None:
    labels_path = staged / LABEL_OUTPUTS[run.source.kind]
    if run.source.kind == "scene":
        detail = run.source.detail
        write_labels_cog(labels, labels_path, detail.crs_wkt, detail.transform, run.card.classes)
    elif run.source.kind in ("slide", "zarr"):
        if run.source.kind == "slide":  # the image at the resolution segmented, labels inside it
            write_ome_zarr_image(image, labels_path, run.name, pixel_size=label_pixel_size(run.source))
        write_ome_zarr_labels(
            labels, labels_path, run.card.name, [(c.id, c.name, c.color) for c in run.card.classes],
            pixel_size=label_pixel_size(run.source),
        )
        if run.settings.label_tiff and len(run.source.shape) == 2:
            write_labels_cog(labels, staged / "labels.tif", None, None, run.card.classes)
    else:
        write_labels_nifti(labels, labels_path, run.source.detail)
    preview_bands = run.card.preview_bands
    if run.store_bands is not None:
        preview_bands = tuple(run.store_bands[p] for p in preview_bands)
    if len(run.source.shape) == 3:  # the preview shows the middle slice
        middle = run.source.shape[0] // 2
        image, labels = image[:, middle], labels[middle]
    render_preview(image, labels, preview_bands, run.card.classes, staged / "preview.png")
    if run.settings.probabilities:
        if storage.is_remote(run.probability_store):
            fs, path = storage.filesystem(run.probability_store)
            fs.get(path.rstrip("/") + "/", str(staged / "probabilities.zarr"), recursive=True)
        else:
            Path(run.probability_store).replace(staged / "probabilities.zarr")


def publish_local(staged: Path, output_dir: Path, previous: Path) -> None:
    """The new folder replaces the old in one rename: a reader sees one or the other, whole."""
    if output_dir.exists():
        output_dir.replace(previous)
    staged.replace(output_dir)
    shutil.rmtree(previous, ignore_errors=True)


def publish_remote(staged: Path, output_dir: str) -> None:
    """Upload the new files over the old, then remove the old ones the new output lacks."""
    storage.put_tree(staged, output_dir)
    kept = set(storage.list_files(staged))
    for name in storage.list_files(output_dir):
        if name not in kept:
            storage.remove(storage.join(output_dir, name))


def label_pixel_size(source: SourceInfo) -> tuple[tuple[float, str], ...] | None:
    """Pixel size per spatial axis for OME-Zarr labels: the slide's µm/px or the source's own."""
    if source.kind == "slide" and source.working_mpp:
        return ((source.working_mpp, "µm"),) * 2
    if source.kind == "zarr" and source.detail.unit:
        return tuple((size, source.detail.unit) for size in source.detail.pixel_size)
    return None


def run_info(run: ImageRun, run_id: str, run_date: dt.date) -> RunInfo:
    settings = run.settings
    return RunInfo(run_id, run_date, run.card.name, run.card.version, run.card.digest(), settings.tile,
                   settings.overlap, settings.blending, settings.tta)


def record_stats(run: ImageRun, summary: SegmentSummary, run_id: str, run_date: dt.date) -> pa.Table:
    """Write the image's rows (per class, per block x class, per region x class) to the
    statistics dataset as pending rows of the run; returns the per-class rows."""
    image = ImageInfo(run.name, run.source.uri, run.key, summary.area_unit)
    info = run_info(run, run_id, run_date)
    classes = run.card.classes
    georeferenced = run.source.kind == "scene" and run.source.detail.crs_wkt
    tables = {
        "image_class": image_class_table(image, info, classes, summary.class_counts, summary.class_areas),
        "block_class": block_class_table(
            image, info, classes, summary.blocks,
            transform=run.source.detail.transform if georeferenced else None,
            crs=crs_name(run.source.detail.crs_wkt) if georeferenced else None,
        ),
    }
    if run.settings.regions:
        regions = load_regions(run.settings.regions, run.settings.region_id)
        tables["region_class"] = region_class_table(image, info, classes, regions.source, count_regions(run, regions))
    write_image_rows(storage.join(run.out_root, "stats"), run_id, run_date, image_file_id(run.source.uri, run.name), tables)
    return tables["image_class"]


def count_regions(run: ImageRun, regions: RegionSet) -> list[tuple[str, np.ndarray, np.ndarray]]:
    import zarr

    if len(run.source.shape) != 2:
        raise InputError(regions.source, "region statistics need a 2D image, not a volume")
    crs_wkt, transform = None, None
    if run.source.kind == "scene":
        crs_wkt, transform = run.source.detail.crs_wkt, run.source.detail.transform
    labels = zarr.open_array(run.label_store, mode="r")
    areas = source_areas(run.source)
    counted = region_class_counts(regions, labels, crs_wkt, transform, run.card.num_classes, areas.row_areas)
    return [(r.region, r.counts, r.areas) for r in counted]


def crs_name(crs_wkt: str) -> str:
    """EPSG:xxxx where the CRS has such a code, else its WKT."""
    from rasterio.crs import CRS

    crs = CRS.from_wkt(crs_wkt)
    code = crs.to_epsg()
    return f"EPSG:{code}" if code else crs_wkt


def complete(run: ImageRun, run_id: str, run_date: dt.date) -> None:
    mark_done(
        run.out_root,
        run.key,
        {"image": run.name, "uri": run.source.uri, "model": run.card.name, "run_id": run_id, "run_date": run_date,
         "outputs": [storage.join(run.output_dir, LABEL_OUTPUTS[run.source.kind]),
                     storage.join(run.output_dir, "preview.png")]},
    )
    storage.remove_tree(run.work_dir)


def discard(run: ImageRun) -> None:
    """Drop a bad image's intermediate stores; its published folder is left as it was. (Other
    failures keep them: the next run resumes from the finished shards and blocks.)"""
    storage.remove_tree(run.work_dir)


def run_image(run: ImageRun, run_id: str, run_date: dt.date) -> tuple[SegmentSummary, pa.Table]:
    try:
        ingest(run)
        summary = segment(run)
        finalize(run)
        table = record_stats(run, summary, run_id, run_date)
        complete(run, run_id, run_date)
        return summary, table
    except InputError:
        discard(run)  # bad input: nothing of it is worth keeping
        raise
