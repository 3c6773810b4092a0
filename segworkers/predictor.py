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

import contextlib
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from pipelines.blending import BlockAccumulator, quantise_probabilities, tile_weights
from pipelines.model_card import ModelCard
from pipelines.tiling import Region
from pipelines.zarr_stores import NODATA_LABEL, read_padded
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
CRF_PARAMETERS = ("iterations", "w_appearance", "theta_alpha", "theta_beta", "w_smoothness", "theta_gamma")


@dataclass(frozen=True)
class BlockJob:
    image_store: str
    label_store: str
    block: Region
    tiles: tuple[Region, ...]
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


@dataclass(frozen=True)
class BlockResult:
    block: Region
    class_counts: np.ndarray
    """Pixels per class among the block's valid pixels, counted from the labels written."""
    tiles_run: int
    class_areas: np.ndarray | None = None
    """Area per class from the same labels and the job's row_areas."""
    node: str = ""
    """The Ray node that segmented the block (set by the actor; not part of any output)."""


class BlockPredictor:
    """A model on one device, segmenting blocks; several threads may segment blocks at once.

    On a GPU each thread works on its own CUDA stream. On the CPU one block computes at a time
    (its torch operations already use every thread the worker has) while others read or write.
    """

    def __init__(self, card: ModelCard, device: str = "cpu", batch_size: int = 4, threads: int = 1):
        self.card = card
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.batch_size_lock = threading.Lock()
        self.model = load_tile_model(card, device, threads)
        shape = (-1,) + (1,) * card.spatial_dims
        self.scale = torch.tensor(card.scale, dtype=torch.float32, device=self.device)
        self.offset = torch.tensor(card.mean, dtype=torch.float32, device=self.device).reshape(shape)
        self.divisor = torch.tensor(card.std, dtype=torch.float32, device=self.device).reshape(shape)
        self.weights: dict[tuple[str, int], torch.Tensor] = {}
        self.weights_lock = threading.Lock()
        self.streams = WorkerStreams(self.device)
        self.compute_lock = threading.Lock() if self.device.type == "cpu" else contextlib.nullcontext()
        if self.device.type == "cuda":  # weights copied on the default stream, used on the workers' streams
            torch.cuda.synchronize(self.device)

    def segment(self, job: BlockJob) -> BlockResult:
        """Segment one block. When the GPU runs out of memory, halve the batch and redo the
        block (never the image); the smaller batch is kept for the blocks that follow."""
        while True:
            batch_size = self.batch_size
            try:
                return self.segment_block(job, batch_size)
            except torch.cuda.OutOfMemoryError:
                with self.batch_size_lock:
                    if batch_size == 1:
                        raise
                    if self.batch_size == batch_size:  # a block running beside this one may have halved it already
                        self.batch_size = batch_size // 2
                        logger.warning("out of GPU memory in block %s: batch size now %d", job.block.start, self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def segment_block(self, job: BlockJob, batch_size: int) -> BlockResult:
        image = zarr.open_array(job.image_store, mode="r")
        halo = self.model.halo
        dims = len(job.block.start)
        tiles = job.tiles
        # Post-processing sees the block's probabilities with a margin (clipped to the image).
        accumulated = job.block.grown(self.card.block_margin).intersection(Region((0,) * dims, image.shape[1:]))
        context = Region(
            tuple(min([t.start[i] - halo for t in tiles] + [accumulated.start[i]]) for i in range(dims)),
            tuple(max([t.stop[i] + halo for t in tiles] + [accumulated.stop[i]]) for i in range(dims)),
        )
        pixels = read_padded(image, context, job.bands)
        in_block = job.block.relative_to(accumulated.start)
        with self.compute_lock, self.streams.current():
            values = to_device(pixels, self.device).float()
            valid = valid_pixels(values[(slice(None), *job.block.relative_to(context.start))], image.attrs.get("nodata"))
            inputs = values.mul_(self.scale).sub_(self.offset).div_(self.divisor)
            accumulator = self.accumulate(inputs, context, accumulated, job, batch_size)
            if self.card.postprocess:
                probabilities, valid = to_host(accumulator.probabilities(), valid)
            else:
                labels, row_counts = label_statistics(accumulator.labels()[in_block], valid, self.card.num_classes, NODATA_LABEL)
                wanted = accumulator.probabilities()[(slice(None), *in_block)] if job.probability_store else None
                labels, row_counts, probabilities = to_host(labels, row_counts, wanted)
        if self.card.postprocess:
            probabilities = self.crf(probabilities, pixels[(slice(None), *accumulated.relative_to(context.start))])
            labels, row_counts = label_statistics(
                torch.from_numpy(probabilities.argmax(axis=0)[in_block]), torch.from_numpy(valid), self.card.num_classes, NODATA_LABEL)
            labels, row_counts = labels.numpy(), row_counts.numpy()
            probabilities = probabilities[(slice(None), *in_block)]

        zarr.open_array(job.label_store, mode="r+")[job.block.slices()] = labels
        if job.probability_store:
            probabilities = quantise_probabilities(probabilities)
            probabilities[:, labels == NODATA_LABEL] = 0  # no class has the nodata label
            zarr.open_array(job.probability_store, mode="r+")[(slice(None), *job.block.slices())] = probabilities
        areas = None if job.row_areas is None else np.array([in_rows @ job.row_areas for in_rows in row_counts])
        return BlockResult(job.block, row_counts.sum(axis=1), len(tiles), areas)

    def accumulate(self, inputs: torch.Tensor, context: Region, accumulated: Region, job: BlockJob, batch_size: int
                   ) -> BlockAccumulator:
        """Weighted probabilities of the job's tiles over the accumulated region, on the device,
        added in the grid's global tile order (the same order whatever the block partition)."""
        accumulator = BlockAccumulator(accumulated, self.card.num_classes, self.device_weights(job.blending, job.tile_size))
        halo = self.model.halo
        for first in range(0, len(job.tiles), batch_size):
            batch_tiles = job.tiles[first : first + batch_size]
            # A constant batch shape (the last tile repeated) keeps each tile's arithmetic
            # identical whatever block it falls in, and lets CUDA graphs replay.
            batch = torch.empty((batch_size, inputs.shape[0], *(job.tile_size + 2 * halo for _ in job.block.start)),
                                device=self.device, memory_format=self.model.memory_format or torch.contiguous_format)
            for slot in range(batch_size):
                tile = batch_tiles[min(slot, len(batch_tiles) - 1)]
                batch[slot] = inputs[(slice(None), *tile.grown(halo).relative_to(context.start))]
            for tile, probabilities in zip(batch_tiles, self.predict_tiles(batch, job.tta)):
                accumulator.add(tile, probabilities)
        return accumulator

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
        image = pixels[list(self.card.preview_bands)].astype(np.float32) * float(options.get("intensity_scale", 1.0))
        parameters = {name: options[name] for name in CRF_PARAMETERS if name in options}
        return dense_crf(probabilities, np.moveaxis(image, 0, -1), **parameters)
