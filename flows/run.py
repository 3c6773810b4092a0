"""A run and its images, set up once for the CLI, the Prefect flow and the benchmarks.

    run = prepare_run(model, out, options)      # card, options, regions, run id checked; nothing written
    image = plan_image(run, uri)                # the source opened and checked against the card
    with started(run) as run:                   # the output root locked, the run registered in the statistics
        image = claim_folder(image)             # its folder's name in the root (flows.image_names)
        ...                                     # flows.stages.run_image(...) for each image
                                                # on leaving: pending statistics compacted, lock released

The card's digest (it hashes the weights file) is computed once per run, each image's key
(an S3 HEAD on object storage) once per image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows import segpipe_version
from flows.image_names import claim_name
from flows.manifest import image_key, is_done
from flows.options import RunOptions, load_run_card
from flows.root_lock import root_lock, storage_problem
from flows.work_folder import WorkFolder, WorkInMemory, remove_stale_work_folders
from pipelines import storage
from pipelines.errors import InputError
from pipelines.model_card import ModelCard, builtin_card_names, load_card
from pipelines.outputs import Output, outputs_left_out, resolve_outputs
from pipelines.regions import load_regions
from pipelines.sources import Source, open_source, resolve_bands
from pipelines.stats import RunInfo, begin_run, compact, upgrade, validate_run_id
from segworkers.cluster import cluster_named
from segworkers.tile_models import check_model

# An image of several blocks read in place is read whole into memory once, by its preview
# (which keeps every few pixels; from a Zarr copy it reads a chunk at a time): up to this many
# bytes of its bands (a 4096² image of 4 bands of 16 bits: 128 MiB). A larger image is copied.
IN_PLACE_MAX_BYTES = 128 << 20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    card: ModelCard
    """The model card with the run's runtime overrides."""
    card_digest: str
    options: RunOptions
    """Resolved against the card (RunOptions.resolved): no default left open."""
    out_root: str
    """A local folder or an s3:// prefix."""
    run_id: str
    output_settings: dict
    """What goes into every image's manifest key besides the image and the card digest."""
    run_date: dt.date | None = None
    """Set once the run is started: the date of the run id's first start."""

    @property
    def stats_root(self) -> str:
        return storage.join(self.out_root, "stats")

    def provenance(self) -> dict[str, str]:
        """What outputs record of where they come from."""
        return {"model": self.card.name, "model_version": self.card.version, "model_digest": self.card_digest,
                "run_id": self.run_id, "segpipe_version": segpipe_version()}

    def run_info(self) -> RunInfo:
        options = self.options
        return RunInfo(self.run_id, self.run_date, self.card.name, self.card.version, self.card_digest,
                       options.tile, options.overlap, options.blending, options.tta)


def prepare_run(model: str, out: str | Path, options: RunOptions | None = None) -> Run:
    """Load and check everything a run needs before it touches the output root: a bad card,
    option, regions file or run id, weights that do not load or a model that does not answer
    the card's tile with the card's classes stop it here, before any work."""
    options = options or RunOptions()
    card = load_run_card(model, options)
    resolved = options.resolved(card)
    digest = card.digest()
    check_model(card, digest, resolved.tile)
    if resolved.regions:
        load_regions(resolved.regions, resolved.region_id)
    run_id = validate_run_id(resolved.run_id or dt.date.today().isoformat())
    return Run(card, digest, resolved, str(out), run_id, resolved.output_settings())


@contextlib.contextmanager
def started(run: Run) -> Iterator[Run]:
    """Hold the output root's lock, fold rows an interrupted earlier run left pending (and bring
    a statistics dataset of an older schema version to this one), register the run, drop work folders left behind by finished images; on a normal exit fold this
    run's pending rows into its files."""
    with root_lock(run.out_root, run.run_id):
        try:
            upgrade(run.stats_root)  # rows an interrupted run left pending, a dataset of an older version
            run_date = begin_run(run.stats_root, run.run_id, dt.date.today())
            remove_stale_work_folders(run.out_root, lambda key: is_done(run.out_root, key))
        except OSError as exc:
            raise storage_problem(run.out_root, exc) or exc
        yield dataclasses.replace(run, run_date=run_date)
        fold_statistics(run)


def fold_statistics(run: Run) -> None:
    """Fold the run's pending statistics rows into its files (pipelines.stats.compact). A run
    does it before its report, whose chart of the nights then reads one file per run instead of
    one per image; `started` does it again on a normal exit, for runs that have no report."""
    try:
        compact(run.stats_root)
    except OSError as exc:  # pending rows are read as they are, and the next run folds them
        problem = storage_problem(run.out_root, exc) or exc
        logger.warning("statistics left pending, not folded into the run's files: %s", problem)


@dataclass(frozen=True)
class ImageRun:
    """One image of a run: its source, the card's bands in it, its key, its name, what it writes."""

    run: Run
    source: Source
    bands: tuple[int, ...]
    """The card's bands resolved against this source (1-based indexes)."""
    key: str
    outputs: tuple[Output, ...]
    name: str
    """Its folder in the output root and its name in the statistics (flows.image_names): the
    file's stem until `claim_folder` gives it the name claimed for it in the root."""
    notes: tuple[str, ...] = ()
    """One-line notes for the user on how the image is taken (not errors)."""
    work_in_memory: WorkInMemory = field(default_factory=WorkInMemory, compare=False, repr=False)
    """The work of an image that works in memory (works_in_memory), from stage to stage."""

    @property
    def work(self) -> WorkFolder | WorkInMemory:
        if self.works_in_memory:
            return self.work_in_memory
        return WorkFolder(self.work_path)

    @property
    def work_path(self) -> str:
        """Its work folder, where finalize also stages its outputs (on the output root's file system)."""
        return storage.join(self.run.out_root, ".work", f"{self.name}-{self.key[:12]}")

    @property
    def works_in_memory(self) -> bool:
        """Its mask and labels stay in this process (flows.work_folder.WorkInMemory) instead of a
        work folder: an image of one block read in place whose outputs need no probabilities.
        Such an image is redone whole after a crash, in about the time its work folder's Zarr
        store and records took to write and read (about 30 ms of CPU for 512²); an image of
        several blocks keeps its work folder, so that a crash loses no finished block."""
        return self.reads_in_place and self.of_one_block and not self.needs_probabilities

    @property
    def of_one_block(self) -> bool:
        """At most --block pixels a side."""
        return max(self.source.shape) <= self.run.options.block

    @property
    def output_dir(self) -> str:
        return storage.join(self.run.out_root, self.name)

    @property
    def reads_in_place(self) -> bool:
        """The model and the outputs read the source itself, with no Zarr copy: a 2D image whose
        source is cheap to read again (a local GeoTIFF), with no output that copies the image,
        of one block, or of several when the file reads a block's window without decoding whole
        rows of the image (tiles, or strips no wider than a block) and its bands fit
        IN_PLACE_MAX_BYTES (the outputs read it whole). The pixels are the same as those of a copy.
        Not with a cluster named (--ray-address, RAY_ADDRESS): its actors may run on machines that
        see the output root, where the copy goes, but not a file on this machine's disk."""
        source = self.source
        if not (source.in_place_store is None and source.cheap_to_reread and len(source.shape) == 2
                and not any(output.copies_image for output in self.outputs)
                and not cluster_named(self.run.options.ray_address)):
            return False
        whole_bytes = len(self.bands) * math.prod(source.shape) * np.dtype(source.dtype).itemsize
        return self.of_one_block or (source.reads_windows_alone(self.run.options.block)
                                     and whole_bytes <= IN_PLACE_MAX_BYTES)

    @property
    def image_store(self) -> str:
        """Where the model reads the image: the source itself when it is a store read in place,
        else the store ingest writes (when the image is read in place: its URI, for messages)."""
        if self.reads_in_place:
            return self.source.uri
        return self.source.in_place_store or self.work.image_store

    @property
    def store_bands(self) -> tuple[int, ...] | None:
        """0-based channels of image_store the model reads; None when ingest kept only those."""
        return tuple(b - 1 for b in self.bands) if self.source.in_place_store else None

    @property
    def nodata(self) -> float | None:
        """The value that marks a pixel without data in every band: --nodata, else what the
        source declares, else the card's input.nodata."""
        for value in (self.run.options.nodata, self.source.nodata, self.run.card.nodata):
            if value is not None:
                return value
        return None

    @property
    def store_band_names(self) -> tuple[str | None, ...]:
        """Names of the image store's channels: the source's own when it is read in place, else
        (ingest kept the card's bands) the source's names of those bands, or the card's."""
        names = self.source.band_names
        if self.source.in_place_store:
            return tuple(names)
        return tuple((names[b - 1] if b - 1 < len(names) else None) or self.run.card.band_names[i]
                     for i, b in enumerate(self.bands))

    @property
    def needs_probabilities(self) -> bool:
        return any(output.needs_probabilities for output in self.outputs)


def plan_image(run: Run, uri: str | Path, key: str | None = None) -> ImageRun:
    """Open the source and check it against the card before anything is written. `key`: the
    image's manifest key when the caller has computed it already."""
    source = open_source(uri, run.card)
    pixels = math.prod(source.shape)
    if pixels > run.options.max_pixels:
        size = " x ".join(str(n) for n in reversed(source.shape))
        raise InputError(source.uri, f"is {size} = {pixels:,} pixels, more than --max-pixels {run.options.max_pixels:,}; "
                                     "give a larger --max-pixels if the image really is that big")
    key = key or image_key(source.uri, run.card_digest, run.output_settings)
    bands = resolve_bands(source, run.card)
    return ImageRun(run, source, bands, key, resolve_outputs(run.options.outputs, source), source.stem,
                    tuple(image_notes(source, run.card, bands, run.options.outputs)))


def image_notes(source: Source, card: ModelCard, bands: tuple[int, ...], outputs: tuple[str, ...] = ()) -> list[str]:
    notes = source.notes()
    left_out = outputs_left_out(outputs, source)
    if left_out:
        notes.append(f"{source.uri} is a {len(source.shape)}D {source.kind}: no {', '.join(left_out)} for it (those "
                     f"outputs are {'2D' if len(source.shape) == 3 else '3D'} only)")
    if card.processing_level and source.processing_level and source.processing_level != card.processing_level:
        fitting = [name for name in builtin_card_names() if load_card(name).processing_level == source.processing_level]
        hint = f" (built-in cards for {source.processing_level}: {', '.join(fitting)})" if fitting else ""
        notes.append(f"{source.uri} is tagged processing level {source.processing_level}, but card {card.name} is "
                     f"made for {card.processing_level} data: its answer may be wrong{hint}")
    if source.count > len(bands):
        notes.append(f"{source.uri} has {source.count} bands; card {card.name} reads band(s) {', '.join(map(str, bands))}")
    if card.fixed_tile_size and all(n < card.tile_size for n in source.shape):
        # Measured with s2-cloud on 100 x 100 crops of the demo scene: 0.67 of their pixels got
        # the label the same pixels get inside the scene (0.79 at 150 x 150); zeros or the edge's
        # values around the image instead of its mirror agreed far less (0.01-0.09).
        size = " x ".join(map(str, source.shape[::-1]))
        notes.append(f"{source.uri} is {size} px, smaller than the {card.tile_size}-px tile that model card "
                     f"{card.name} takes (its input size is fixed): the tile is filled by mirroring the image, and "
                     "the labels may differ from those of the same pixels inside a larger image")
    return notes


def claim_folder(image: ImageRun) -> ImageRun:
    """The image with the name it has in the output root (claimed now if it had none), with
    the run's lock held: no two images share a folder, none lands on the root's own entries."""
    return dataclasses.replace(image, name=claim_name(image.run.out_root, image.source.uri, image.source.stem))
