"""Segment one output block: every tile of the global grid that touches it, blended, argmaxed.

The worker reads the block plus the context its tiles need from the image Zarr once, runs the
tiles in fixed-size batches, accumulates Gaussian-weighted probabilities for the block's
pixels only, and writes the block's labels into the (pre-created) label Zarr: one block, one
shard, one writer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from pipelines.blending import BlockAccumulator, tile_weights
from pipelines.model_card import ModelCard
from pipelines.tiling import Region, TileGrid
from pipelines.zarr_stores import NODATA_LABEL, read_padded
from segworkers.tile_models import load_tile_model


@dataclass(frozen=True)
class BlockJob:
    image_store: str
    label_store: str
    block: Region
    grid: TileGrid
    blending: str = "gaussian"


@dataclass(frozen=True)
class BlockResult:
    block: Region
    class_counts: np.ndarray
    """Pixels per class among the block's valid pixels, counted from the labels written."""
    tiles_run: int


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

    def predict_tiles(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K, *tile) of a batch of tiles read with their halo."""
        logits = self.model(batch)
        tile = tuple(size - 2 * self.model.halo for size in batch.shape[2:])
        crop = tuple(slice((have - want) // 2, (have - want) // 2 + want) for have, want in zip(logits.shape[2:], tile))
        logits = logits[(slice(None), slice(None), *crop)]
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def segment(self, job: BlockJob) -> BlockResult:
        image = zarr.open_array(job.image_store, mode="r")
        tiles = job.grid.tiles_touching(job.block)
        halo = self.model.halo
        context = Region(
            tuple(min(t.start[i] for t in tiles) - halo for i in range(len(job.block.start))),
            tuple(max(t.stop[i] for t in tiles) + halo for i in range(len(job.block.start))),
        )
        pixels = read_padded(image, context)
        inputs = self.normalise(pixels)
        weights = tile_weights(job.blending, (job.grid.tile_size,) * len(job.block.start))
        accumulator = BlockAccumulator(job.block, self.card.num_classes, weights)
        for first in range(0, len(tiles), self.batch_size):
            batch_tiles = tiles[first : first + self.batch_size]
            batch = np.stack([inputs[(slice(None), *t.grown(halo).relative_to(context.start))] for t in batch_tiles])
            # A constant batch shape keeps each tile's arithmetic identical whatever block it falls in.
            if len(batch_tiles) < self.batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - len(batch_tiles), axis=0)])
            for tile, probabilities in zip(batch_tiles, self.predict_tiles(batch)):
                accumulator.add(tile, probabilities)

        labels = accumulator.labels()
        valid = valid_mask(pixels[(slice(None), *job.block.relative_to(context.start))], image.attrs.get("nodata"))
        labels[~valid] = NODATA_LABEL
        label_array = zarr.open_array(job.label_store, mode="r+")
        label_array[job.block.slices()] = labels
        counts = np.bincount(labels[valid].ravel(), minlength=self.card.num_classes)[: self.card.num_classes]
        return BlockResult(job.block, counts.astype(np.int64), len(tiles))


def valid_mask(pixels: np.ndarray, nodata: float | None) -> np.ndarray:
    """A pixel is valid unless every band holds the source's nodata value."""
    if nodata is None:
        return np.ones(pixels.shape[1:], dtype=bool)
    if np.isnan(nodata):
        return ~np.all(np.isnan(pixels), axis=0)
    return ~np.all(pixels == nodata, axis=0)
