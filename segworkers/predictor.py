"""Segment one output block: every tile of the global grid that touches it, blended, argmaxed.

The worker reads the block plus the context its tiles need from the image Zarr once, moves the
raw pixels to its device, and there normalises them, runs the tiles in fixed-size batches
(optionally with flip test-time augmentation), accumulates Gaussian-weighted fp32
probabilities for the block's pixels only, takes the argmax and counts the classes
(segworkers.device_blocks). It writes the block's labels (and optionally uint8
probabilities) into the pre-created Zarr arrays: one block, one shard, one writer. Works the
same over (H, W) and (D, H, W), on a GPU or the CPU.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from pipelines.blending import BlockAccumulator, quantise_probabilities, tile_weights
from pipelines.errors import InputError
from pipelines.model_card import CRF_PARAMETERS, ModelCard
from pipelines.tiling import Box
from pipelines.zarr_stores import NODATA_LABEL, read_padded, read_padded_source
from segworkers.crf import dense_crf
from segworkers.device_blocks import (
    WorkerStreams,
    flip_axes_sets,
    label_statistics,
    softmax,
    to_device,
    to_host,
    valid_pixels,
)
from segworkers.tile_models import load_tile_model

logger = logging.getLogger(__name__)


# Pixel dtypes whose inputs the CPU looks up in a table of every value (BlockPredictor.normalise_by_table).
TABLED_DTYPES = {np.dtype(name): getattr(torch, name) for name in ("uint8", "int8", "uint16", "int16")}


def table_index_dtype(dtype: np.dtype) -> np.dtype:
    """The unsigned view of an 8- or 16-bit dtype: the pixels as indexes into its table."""
    return np.dtype(f"uint{8 * dtype.itemsize}")


def integer_nodata(nodata: float | None, dtype: np.dtype) -> int | None:
    """The nodata value as a value of the integer dtype; None when no pixel can hold it."""
    if nodata is None or not math.isfinite(nodata) or nodata != int(nodata):
        return None
    info = np.iinfo(dtype)
    return int(nodata) if info.min <= nodata <= info.max else None


class CpuLanes:
    """Forward passes on the CPU, `lanes` at a time, each on one torch thread.

    One forward pass on two torch threads (an OpenMP team) loses most of its speed as soon as
    another thread of the process computes: each parallel region waits for the thread the
    kernel preempted (a b4 d2 U-Net fell from 105 to 39 tiles/s beside one thread drawing
    previews). Whole batches on lanes of one thread each share the CPUs with other work without
    waiting for each other, and a thread makes more tiles per CPU second alone than in a team
    (12.5 against 16.8 ms per 256² tile there). The batches' probabilities are taken in their
    order, so the sums, and the labels, are the same as one batch after the other.

    Each lane sets its own torch thread count: the count set here reaches at::parallel_for in
    other threads, but oneDNN's convolutions read OpenMP's own per-thread default (the cores), so
    a lane left alone ran its convolutions on a team of two. And while a thread's team lives, every
    other team of the process waits for its threads by sleeping instead of spinning (libgomp,
    with more threads than cores): lanes left behind by a finished pool made a later training in
    the same process 2.5 times slower. close() ends the lanes."""

    def __init__(self, lanes: int):
        torch.set_num_threads(1)  # this process's CPU torch work: the lanes, and the blending between them
        self.lanes = max(1, lanes)
        # (map's ticket, item's index, function, item, future): the lanes take the items of the
        # oldest map first, so that of two groups of blocks in flight one finishes its batches
        # well before the other. Served in turn, the two would finish together and then
        # normalise their next blocks and take their labels together, with the lanes idle
        # (a fifth of a 4096² image's segment stage).
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.tickets = itertools.count()
        self.workers = [threading.Thread(target=self.work, name=f"model-lane_{lane}", daemon=True)
                        for lane in range(self.lanes)] if self.lanes > 1 else []
        for worker in self.workers:
            worker.start()

    def work(self) -> None:
        torch.set_num_threads(1)
        while True:
            _, _, function, item, future = self.queue.get()
            if function is None:  # close()
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(item))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                future.set_exception(exc)

    def close(self) -> None:
        """End the lanes once the items queued are done (each lane takes one end mark, queued
        after every map's items)."""
        for lane, worker in enumerate(self.workers):
            self.queue.put((math.inf, lane, None, None, None))
        for worker in self.workers:
            worker.join()
        self.workers = []

    def map(self, function, items: list):
        """function(item) for each item on the lanes, results in the items' order, at most
        one item more than the lanes in flight (the caller adds one batch while others run);
        the items of an earlier call go first."""
        if self.lanes == 1:
            yield from map(function, items)
            return
        ticket = next(self.tickets)
        in_flight = collections.deque()
        try:
            for index, item in enumerate(items):
                future = Future()
                self.queue.put((ticket, index, function, item, future))
                in_flight.append(future)
                if len(in_flight) > self.lanes:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:  # a failed batch: the rest of this call's items are not run
            for future in in_flight:
                future.cancel()


@dataclass(frozen=True)
class BlockJob:
    image_store: str
    label_store: str | None
    """Where the block's labels are written; None: they come back in BlockResult.labels."""
    block: Box
    tiles: tuple[Box, ...]
    """The grid's tiles that touch the block (grown by the card's block_margin) and hold data, in global grid order."""
    tile_size: int
    blending: str = "gaussian"
    tta: bool = False
    probability_store: str | None = None
    bands: tuple[int, ...] | None = None
    """0-based channels of the image store to read (a Zarr source used in place); None: all."""
    row_areas: np.ndarray | None = None
    """Area of one pixel (voxel) in each row (slice, in 3D) of the block along its first axis;
    None when areas are not wanted."""
    image_is_source: bool = False
    """The image store is the user's own (a Zarr source read in place): what cannot be read from
    it is bad input."""
    nodata: float | None = None
    """The value of pixels without data in every band; None: the image store's `nodata` attribute."""
    source: object = None
    """The image's source (pipelines.sources), when the model reads it in place instead of an
    image store (a small local GeoTIFF: ImageRun.reads_in_place); `image_store` is then its URI
    and `nodata` is the image's."""
    source_bands: tuple[int, ...] = ()
    """The 1-based bands of `source` to read, in the card's order."""


@dataclass(frozen=True)
class BlockResult:
    block: Box
    class_counts: np.ndarray
    """Pixels per class among the block's valid pixels, counted from the labels written."""
    tiles_run: int
    class_areas: np.ndarray | None = None
    """Area per class from the same labels and the job's row_areas."""
    node: str = ""
    """The Ray node that segmented the block (set by the actor; not part of any output)."""
    labels: np.ndarray | None = None
    """The block's labels, when its job has no label store to write them to."""


@dataclass
class BlockWork:
    """One block on its way through the predictor."""

    job: BlockJob
    context: Box
    """What is read: the block with its margin and its tiles with their halo."""
    accumulated: Box
    """Where probabilities are summed: the block with the post-processing margin."""
    pixels: np.ndarray
    """The raw context pixels (host)."""
    nodata: float | None
    valid: object = None
    inputs: object = None
    accumulator: BlockAccumulator | None = None
    labels: np.ndarray | None = None
    row_counts: np.ndarray | None = None
    probabilities: np.ndarray | None = None


class BlockPredictor:
    """A model on one device, segmenting blocks; several threads may segment blocks at once.

    On a GPU each thread works on its own CUDA stream. On the CPU the blocks' batches go through
    the model on `threads` lanes, one torch thread each (CpuLanes), shared by the blocks in
    progress.
    """

    def __init__(self, card: ModelCard, device: str = "cpu", batch_size: int = 4, threads: int = 1):
        self.card = card
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.batch_size_lock = threading.Lock()
        on_cpu = self.device.type == "cpu"
        self.model = load_tile_model(card, device, 1 if on_cpu else threads)
        self.lanes = CpuLanes(threads) if on_cpu else None
        shape = (-1,) + (1,) * card.spatial_dims
        self.scale = torch.tensor(card.scale, dtype=torch.float32, device=self.device)
        self.offset = torch.tensor(card.mean, dtype=torch.float32, device=self.device).reshape(shape)
        self.divisor = torch.tensor(card.std, dtype=torch.float32, device=self.device).reshape(shape)
        self.weights: dict[tuple[str, int], torch.Tensor] = {}
        self.weights_lock = threading.Lock()
        self.input_tables: dict[np.dtype, np.ndarray] = {}
        self.streams = WorkerStreams(self.device)
        if self.device.type == "cuda":  # weights copied on the default stream, used on the workers' streams
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """End the CPU lanes (a GPU predictor holds no thread)."""
        if self.lanes is not None:
            self.lanes.close()

    def segment(self, job: BlockJob) -> BlockResult:
        return self.segment_group([job])[0]

    def segment_group(self, jobs: list[BlockJob]) -> list[BlockResult]:
        """Segment blocks (of one image or several): their tiles share fixed-size batches, so a
        small block's last batch is filled with the next block's tiles, not with repeats. When
        the GPU runs out of memory, halve the batch and redo the group (never the image); the
        smaller batch is kept for the blocks that follow."""
        while True:
            batch_size = self.batch_size
            try:
                return self.segment_blocks(jobs, batch_size)
            except torch.cuda.OutOfMemoryError:
                with self.batch_size_lock:
                    if batch_size == 1:
                        raise
                    if self.batch_size == batch_size:  # a block running beside this one may have halved it already
                        self.batch_size = batch_size // 2
                        logger.warning("out of GPU memory in block %s: batch size now %d", jobs[0].block.start,
                                       self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def segment_blocks(self, jobs: list[BlockJob], batch_size: int) -> list[BlockResult]:
        blocks = [self.read_block(job) for job in jobs]
        with self.streams.current():
            for block in blocks:
                self.normalise(block)
            self.accumulate(blocks, batch_size)
            for block in blocks:
                self.take_labels(block)
        return [self.write_block(block) for block in blocks]

    def read_block(self, job: BlockJob) -> BlockWork:
        """The block's context (the block with its margin, and every tile with its halo) read
        from the image store."""
        image = None if job.source is not None else zarr.open_array(job.image_store, mode="r")
        shape = job.source.shape if image is None else image.shape[1:]
        halo = self.model.halo
        dims = len(job.block.start)
        tiles = job.tiles
        # Post-processing sees the block's probabilities with a margin (clipped to the image).
        accumulated = job.block.grown(self.card.block_margin).intersection(Box((0,) * dims, shape))
        context = Box(
            tuple(min([t.start[i] - halo for t in tiles] + [accumulated.start[i]]) for i in range(dims)),
            tuple(max([t.stop[i] + halo for t in tiles] + [accumulated.stop[i]]) for i in range(dims)),
        )
        if image is None:
            return BlockWork(job, context, accumulated, read_padded_source(job.source, job.source_bands, context),
                             job.nodata)
        nodata = image.attrs.get("nodata") if job.nodata is None else job.nodata
        return BlockWork(job, context, accumulated, self.read_context(image, context, job), nodata)

    def stays_finite(self, dtype: torch.dtype) -> bool:
        """Whether every value of an integer dtype stays a finite number through the card's scale,
        mean and std (with float32's largest number, 3.4e38, far away)."""
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            return False
        info = torch.iinfo(dtype)
        largest = max(abs(info.min), abs(info.max)) * max(abs(self.card.scale), 1.0)
        return (largest + max(map(abs, self.card.mean))) / min(self.card.std) < 1e37

    def normalise(self, block: BlockWork) -> None:
        """On the device: the valid pixels of the block, and the normalised inputs of its context."""
        job = block.job
        if self.lanes is not None and block.pixels.dtype in TABLED_DTYPES and self.stays_finite(
                TABLED_DTYPES[block.pixels.dtype]):
            self.normalise_by_table(block)
            return
        values = to_device(block.pixels, self.device)
        # Integer pixels (8- and 16-bit scenes, slides) are finite numbers and stay so: the
        # searches for NaN and infinity, a third of this step on the CPU, are for floating point.
        finite = self.stays_finite(values.dtype)
        values = values.float()
        block.valid = valid_pixels(values[(slice(None), *job.block.relative_to(block.context.start))], block.nodata,
                                   finite)
        # A pixel without data (the nodata value in every band) reaches the model as the bands'
        # means (0 once normalised), not as the value that marks it: a zero border would
        # otherwise read as dark ground and sway the labels near it.
        declared = None if block.nodata is None or math.isnan(block.nodata) else (values == block.nodata).all(0)
        values = values.mul_(self.scale)
        if self.card.clip:
            values = values.clamp_(*self.card.clip)
        inputs = values.sub_(self.offset).div_(self.divisor)
        # A value that is no finite number (NaN, inf) is nodata for its pixel, and reaches the
        # model as the normalised mean (0): one NaN would otherwise spread through a whole tile.
        if finite:
            # Contiguous, as torch.where makes it: the tiles' batches are sliced from it.
            block.inputs = inputs.contiguous() if declared is None else torch.where(~declared, inputs, 0.0)
        else:
            keep = inputs.isfinite() if declared is None else inputs.isfinite() & ~declared
            block.inputs = torch.where(keep, inputs, 0.0)
        block.accumulator = self.new_accumulator(block)

    def normalise_by_table(self, block: BlockWork) -> None:
        """normalise on the CPU for 8- and 16-bit integer pixels: each band's inputs looked up in
        a table of its every value, made by the same float32 operations, so the same numbers
        (a 2048² block with its halo: about 0.22 -> 0.09 s on one thread). The nodata value is
        compared as an integer, as every pixel of such a dtype is one."""
        job, pixels = block.job, block.pixels
        table = self.input_table(pixels.dtype)
        indexes = pixels.view(table_index_dtype(pixels.dtype))
        inputs = np.empty(pixels.shape, dtype=np.float32)
        for band in range(len(pixels)):
            np.take(table[band], indexes[band], out=inputs[band], mode="clip")  # every index is in the table
        nodata = integer_nodata(block.nodata, pixels.dtype)
        in_block = job.block.relative_to(block.context.start)
        if nodata is None:  # no pixel holds the nodata value
            block.valid = torch.ones(job.block.shape, dtype=torch.bool)
        else:
            declared = (pixels == nodata).all(0)
            np.copyto(inputs, np.float32(0.0), where=declared)  # the bands' normalised means, as normalise does
            block.valid = torch.from_numpy(~declared[in_block])
        block.inputs = torch.from_numpy(inputs)
        block.accumulator = self.new_accumulator(block)

    def new_accumulator(self, block: BlockWork) -> BlockAccumulator:
        return BlockAccumulator(block.accumulated, self.card.num_classes,
                                self.device_weights(block.job.blending, block.job.tile_size))

    def input_table(self, dtype: np.dtype) -> np.ndarray:
        """(band, every value of the dtype, in the order of its unsigned view) float32: normalise's
        own operations on each value."""
        with self.weights_lock:
            if dtype not in self.input_tables:
                every = np.arange(2 ** (8 * dtype.itemsize), dtype=table_index_dtype(dtype)).view(dtype)
                values = torch.from_numpy(every).float().expand(len(self.card.mean), -1).clone()
                values = values.mul_(self.scale)
                if self.card.clip:
                    values = values.clamp_(*self.card.clip)
                self.input_tables[dtype] = values.sub_(self.offset.reshape(-1, 1)).div_(self.divisor.reshape(-1, 1)).numpy()
            return self.input_tables[dtype]

    def take_labels(self, block: BlockWork) -> None:
        """Labels and class counts (or, with post-processing, the probabilities) to the host."""
        job, accumulator = block.job, block.accumulator
        in_block = job.block.relative_to(block.accumulated.start)
        valid = block.valid & accumulator.covered()[in_block]
        labels, highest = accumulator.labels(in_block, with_highest=True)
        # One pass that allocates nothing (the sum is NaN or infinite when any score is; a
        # score is a weighted sum of probabilities, a few at most, far from fp32's range), and
        # the pixels are only counted when it is not finite.
        if not math.isfinite(float(highest.sum())):
            answered = int((~torch.isfinite(highest) & valid).sum())
            if answered:  # not only where there is no data (nodata, skipped), which no label shows
                block.inputs = block.accumulator = None
                raise self.non_finite_answer(job, answered, int(valid.sum()))
        if self.card.postprocess:
            block.probabilities, block.valid = to_host(accumulator.probabilities(), valid)
        else:
            labels, row_counts = label_statistics(labels, valid, self.card.num_classes, NODATA_LABEL)
            wanted = accumulator.probabilities()[(slice(None), *in_block)] if job.probability_store else None
            block.labels, block.row_counts, block.probabilities = to_host(labels, row_counts, wanted)
        block.inputs = block.accumulator = None  # the device memory goes with them

    def non_finite_answer(self, job: BlockJob, pixels: int, valid: int) -> InputError:
        """The error for a block where the model answered NaN or infinity: its labels would be
        class 0 there, passed off as a prediction, so the image fails instead (its other images
        go on in a night)."""
        where = ", ".join(f"{axis} {start}:{stop}" for axis, start, stop in
                          zip(("rows", "cols") if len(job.block.start) == 2 else ("slices", "rows", "cols"),
                              job.block.start, job.block.stop))
        precision = self.card.runtime.precision
        cause = ("damaged or diverged weights" if precision == "fp32" else
                 f"damaged or diverged weights, or an overflow at precision {precision} (fp32 rules that out)")
        return InputError(self.card.source or self.card.name,
                          f"the model answered NaN or infinity for {pixels:,} of the {valid:,} valid pixels of "
                          f"{where}: {cause}")

    def write_block(self, block: BlockWork) -> BlockResult:
        """Post-processing (dense CRF) on the host, then the block's labels (and probabilities)
        into its shard of the label store."""
        job = block.job
        if self.card.postprocess:
            in_block = job.block.relative_to(block.accumulated.start)
            probabilities = self.crf(block.probabilities,
                                     block.pixels[(slice(None), *block.accumulated.relative_to(block.context.start))])
            labels, row_counts = label_statistics(torch.from_numpy(probabilities.argmax(axis=0)[in_block]),
                                                  torch.from_numpy(block.valid), self.card.num_classes, NODATA_LABEL)
            block.labels, block.row_counts = labels.numpy(), row_counts.numpy()
            block.probabilities = probabilities[(slice(None), *in_block)]
        labels, row_counts, probabilities = block.labels, block.row_counts, block.probabilities
        if job.label_store is not None:
            zarr.open_array(job.label_store, mode="r+")[job.block.slices()] = labels
        if job.probability_store:
            probabilities = quantise_probabilities(probabilities)
            probabilities[:, labels == NODATA_LABEL] = 0  # no class has the nodata label
            zarr.open_array(job.probability_store, mode="r+")[(slice(None), *job.block.slices())] = probabilities
        areas = None if job.row_areas is None else np.array([in_rows @ job.row_areas for in_rows in row_counts])
        return BlockResult(job.block, row_counts.sum(axis=1), len(job.tiles), areas,
                           labels=labels if job.label_store is None else None)

    def read_context(self, image: zarr.Array, context: Box, job: BlockJob) -> np.ndarray:
        try:
            return read_padded(image, context, job.bands)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - codecs raise anything from ValueError to RuntimeError
            if not job.image_is_source:
                raise
            raise InputError(job.image_store, f"cannot read pixels {context.start}-{context.stop} "
                                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                             ) from exc

    def accumulate(self, blocks: list[BlockWork], batch_size: int) -> None:
        """Weighted probabilities of every block's tiles into its accumulator, on the device.
        The tiles of all the blocks run in batches of `batch_size`, the last one filled up with
        its last tile: a constant batch shape keeps each tile's arithmetic identical whatever
        block and batch it falls in, and lets CUDA graphs replay. Within a block the tiles are
        added in the grid's global order (the same order whatever the block partition)."""
        # On the CPU the batches are made one at a time while the lanes run those before, so
        # only a few are held at once; on a GPU one after the other, on this thread's stream.
        run = (self.lanes.map if self.lanes is not None else map)(
            lambda item: (item[0], self.predict_tiles(item[1], item[2])), self.batches(blocks, batch_size))
        for in_batch, probabilities in run:
            for (block, tile), tile_probabilities in zip(in_batch, probabilities):
                block.accumulator.add(tile, tile_probabilities)

    def batches(self, blocks: list[BlockWork], batch_size: int):
        """(tiles, inputs, tta) of each batch, the tiles as (block, tile)."""
        halo = self.model.halo
        queue = [(block, tile) for block in blocks for tile in block.job.tiles]
        for first in range(0, len(queue), batch_size):
            in_batch = queue[first : first + batch_size]
            job = in_batch[0][0].job
            batch = torch.empty((batch_size, in_batch[0][0].inputs.shape[0],
                                 *(job.tile_size + 2 * halo for _ in job.block.start)),
                                device=self.device, memory_format=self.model.memory_format or torch.contiguous_format)
            for slot in range(batch_size):
                block, tile = in_batch[min(slot, len(in_batch) - 1)]
                batch[slot] = block.inputs[(slice(None), *tile.grown(halo).relative_to(block.context.start))]
            yield in_batch, batch, job.tta

    def device_weights(self, blending: str, tile_size: int) -> torch.Tensor:
        key = (blending, tile_size)
        with self.weights_lock:
            if key not in self.weights:
                weights = torch.from_numpy(tile_weights(blending, (tile_size,) * self.card.spatial_dims)).to(self.device)
                if self.device.type == "cuda":  # other threads' streams will read it
                    torch.cuda.current_stream().synchronize()
                self.weights[key] = weights
            return self.weights[key]

    def predict_tiles(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """fp32 class probabilities (N, K, *tile) of a batch of tiles read with their halo.

        With TTA every flip of the batch goes through the model in one call; the flipped
        probabilities are flipped back and averaged (summed in flip order, then divided).
        """
        flips = flip_axes_sets(batch.dim() - 2) if tta else [()]
        inputs = torch.cat([batch.flip(axes) if axes else batch for axes in flips]) if tta else batch
        probabilities = softmax(self.crop_to_tile(self.model.forward(inputs), batch.shape[2:]))
        views = [p.flip(axes) if axes else p for p, axes in zip(probabilities.split(len(batch)), flips)]
        total = views[0]
        for view in views[1:]:
            total = total + view
        return total / len(views) if tta else total

    def crop_to_tile(self, logits: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        tile = [size - 2 * self.model.halo for size in input_shape]
        shortfall = max(want - have for have, want in zip(logits.shape[2:], tile))
        if shortfall > 0:
            raise ValueError(
                f"model {self.card.name} returns {tuple(logits.shape[2:])} for {tuple(input_shape)} inputs, smaller than "
                f"the {tuple(tile)} tile: its card needs a halo of at least {self.model.halo + -(-shortfall // 2)}"
            )
        crop = tuple(slice((have - want) // 2, (have - want) // 2 + want) for have, want in zip(logits.shape[2:], tile))
        return logits[(slice(None), slice(None), *crop)]

    def crf(self, probabilities: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """Dense CRF marginals over the probabilities; the appearance kernel sees the card's
        preview bands, raw values x intensity_scale (theta_beta is in those units)."""
        options = self.card.postprocess
        image = np.nan_to_num(pixels[list(self.card.preview_bands)].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        image *= float(options.get("intensity_scale", 1.0))
        parameters = {name: options[name] for name in CRF_PARAMETERS if name in options}
        return dense_crf(probabilities, np.moveaxis(image, 0, -1), **parameters)
