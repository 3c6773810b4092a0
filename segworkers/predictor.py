"""Segment one output block: every tile of the global grid that touches it, blended, argmaxed.

The worker reads the block plus the context its tiles need from the image Zarr once, runs the
tiles in fixed-size batches (optionally with flip test-time augmentation), accumulates
Gaussian-weighted probabilities for the block's pixels only, and writes the block's labels
(and optionally uint8 probabilities) into the pre-created Zarr arrays: one block, one shard,
one writer. Works the same over (H, W) and (D, H, W).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import zarr

from pipelines.background import valid_pixels
from pipelines.blending import BlockAccumulator, quantise_probabilities, tile_weights
from pipelines.model_card import ModelCard
from pipelines.tiling import Region
from pipelines.zarr_stores import NODATA_LABEL, read_padded
from segworkers.crf import dense_crf
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


def flip_axes_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (of an (N, C, *spatial) batch): 4 flips in 2D, 8 in 3D."""
    axes = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class BlockPredictor:
    def __init__(self, card: ModelCard, device: str = "cpu", batch_size: int = 4, threads: int = 1):
        self.card = card
        self.batch_size = batch_size
        self.model = load_tile_model(card, device, threads)
        shape = (-1,) + (1,) * card.spatial_dims
        self.offset = np.asarray(card.mean, dtype=np.float32).reshape(shape)
        self.divisor = np.asarray(card.std, dtype=np.float32).reshape(shape)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        return (pixels.astype(np.float32) * np.float32(self.card.scale) - self.offset) / self.divisor

    def predict_tiles(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Class probabilities (N, K, *tile) of a batch of tiles read with their halo.

        With TTA every flip of the batch goes through the model in one call; the flipped
        probabilities are flipped back and averaged.
        """
        flips = flip_axes_sets(batch.ndim - 2) if tta else [()]
        inputs = np.concatenate([np.flip(batch, axes) if axes else batch for axes in flips])
        probabilities = softmax(self.crop_to_tile(self.model(np.ascontiguousarray(inputs)), batch.shape[2:]))
        n = len(batch)
        views = [np.flip(probabilities[i * n : (i + 1) * n], axes) if axes else probabilities[i * n : (i + 1) * n]
                 for i, axes in enumerate(flips)]
        return np.mean(views, axis=0, dtype=np.float32) if tta else views[0]

    def crop_to_tile(self, logits: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
        tile = [size - 2 * self.model.halo for size in input_shape]
        shortfall = max(want - have for have, want in zip(logits.shape[2:], tile))
        if shortfall > 0:
            raise ValueError(
                f"model {self.card.name} returns {tuple(logits.shape[2:])} for {tuple(input_shape)} inputs, smaller than "
                f"the {tuple(tile)} tile: its card needs a halo of at least {self.model.halo + -(-shortfall // 2)}"
            )
        crop = tuple(slice((have - want) // 2, (have - want) // 2 + want) for have, want in zip(logits.shape[2:], tile))
        return logits[(slice(None), slice(None), *crop)]

    def segment(self, job: BlockJob) -> BlockResult:
        """Segment one block. When the GPU runs out of memory, halve the batch and redo the
        block (never the image); the smaller batch is kept for the blocks that follow."""
        import torch

        while True:
            try:
                return self.segment_block(job)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                logger.warning("out of GPU memory in block %s: batch size now %d", job.block.start, self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def segment_block(self, job: BlockJob) -> BlockResult:
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
        weights = tile_weights(job.blending, (job.tile_size,) * dims)
        accumulator = BlockAccumulator(accumulated, self.card.num_classes, weights)
        if tiles:
            inputs = self.normalise(pixels)
            for first in range(0, len(tiles), self.batch_size):
                batch_tiles = tiles[first : first + self.batch_size]
                batch = np.stack([inputs[(slice(None), *t.grown(halo).relative_to(context.start))] for t in batch_tiles])
                # A constant batch shape keeps each tile's arithmetic identical whatever block it falls in.
                if len(batch_tiles) < self.batch_size:
                    batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - len(batch_tiles), axis=0)])
                for tile, probabilities in zip(batch_tiles, self.predict_tiles(batch, job.tta)):
                    accumulator.add(tile, probabilities)

        in_block = job.block.relative_to(accumulated.start)
        if self.card.postprocess:
            probabilities = self.crf(accumulator.probabilities(), pixels[(slice(None), *accumulated.relative_to(context.start))])
            labels = probabilities.argmax(axis=0).astype(np.uint8)[in_block]
        else:
            labels = accumulator.labels()[in_block]
        valid = valid_pixels(pixels[(slice(None), *job.block.relative_to(context.start))], image.attrs.get("nodata"))
        labels[~valid] = NODATA_LABEL
        zarr.open_array(job.label_store, mode="r+")[job.block.slices()] = labels
        if job.probability_store:
            if not self.card.postprocess:
                probabilities = accumulator.probabilities()
            probabilities = quantise_probabilities(probabilities[(slice(None), *in_block)])
            probabilities[:, ~valid] = 0
            zarr.open_array(job.probability_store, mode="r+")[(slice(None), *job.block.slices())] = probabilities
        counts = np.bincount(labels[valid].ravel(), minlength=self.card.num_classes)[: self.card.num_classes]
        areas = None
        if job.row_areas is not None:
            per_row = [((labels == k) & valid).reshape(len(labels), -1).sum(axis=1) for k in range(self.card.num_classes)]
            areas = np.array([counts_in_rows @ job.row_areas for counts_in_rows in per_row])
        return BlockResult(job.block, counts.astype(np.int64), len(tiles), areas)

    def crf(self, probabilities: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """Dense CRF marginals over the probabilities; the appearance kernel sees the card's
        preview bands, raw values x intensity_scale (theta_beta is in those units)."""
        options = self.card.postprocess
        image = pixels[list(self.card.preview_bands)].astype(np.float32) * float(options.get("intensity_scale", 1.0))
        parameters = {name: options[name] for name in CRF_PARAMETERS if name in options}
        return dense_crf(probabilities, np.moveaxis(image, 0, -1), **parameters)
