"""Weighted blending of overlapping tile predictions into one block.

Every pixel ends up with sum_t w_t(p) * prob_t(p) over the tiles t covering it, accumulated
in fp32 in the grid's global tile order. Because the order and the operands are the same
whatever the block, a block's labels do not depend on how the image was partitioned.
"""

from __future__ import annotations

import numpy as np

from pipelines.tiling import Box


def gaussian_weights(tile_shape: tuple[int, ...], sigma_fraction: float = 1.0 / 8) -> np.ndarray:
    """Separable Gaussian importance map centred on the tile, peak 1.

    sigma = tile * sigma_fraction per axis (1/8 as in nnU-Net). Values are floored at the
    smallest positive value so that every covered pixel has a non-zero total weight.
    """
    weights = np.ones(tile_shape, dtype=np.float32)
    for axis, size in enumerate(tile_shape):
        centre = (size - 1) / 2.0
        sigma = size * sigma_fraction
        profile = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2).astype(np.float32)
        shape = [1] * len(tile_shape)
        shape[axis] = size
        weights = weights * profile.reshape(shape)
    weights /= weights.max()
    return np.maximum(weights, weights[weights > 0].min())


def constant_weights(tile_shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(tile_shape, dtype=np.float32)


def tile_weights(mode: str, tile_shape: tuple[int, ...]) -> np.ndarray:
    if mode == "gaussian":
        return gaussian_weights(tile_shape)
    if mode == "constant":
        return constant_weights(tile_shape)
    raise ValueError(f"unknown blending mode {mode!r} (gaussian or constant)")


class BlockAccumulator:
    """Accumulates weighted class probabilities of tiles for the pixels of one block only.

    The arrays are of the weights' kind: numpy arrays, or torch tensors on any device (a GPU
    worker keeps its block on the GPU). The arithmetic is the same elementwise fp32 either way,
    so both give the same sums.
    """

    def __init__(self, block: Box, num_classes: int, weights):
        self.block = block
        self.weights = weights
        self.sums = fp32_zeros_like(weights, (num_classes, *block.shape))
        self.weight_sums = fp32_zeros_like(weights, block.shape)

    def add(self, tile: Box, probabilities) -> None:
        """probabilities: (K, *tile.shape) fp32 for the tile at its global position."""
        overlap = tile.intersection(self.block)
        if overlap is None:
            return
        in_tile = overlap.relative_to(tile.start)
        in_block = overlap.relative_to(self.block.start)
        self.sums[(slice(None), *in_block)] += probabilities[(slice(None), *in_tile)] * self.weights[in_tile]
        self.weight_sums[in_block] += self.weights[in_tile]

    def labels(self, region: tuple[slice, ...] | None = None, with_highest: bool = False):
        """Argmax over classes (the first of equal maxima; numpy: int64 indexes, torch: uint8 up
        to 256 classes); the total weight is a positive per-pixel factor and cannot change it.
        Only of `region` (slices of the accumulated pixels) when given: a block's own pixels,
        without its halo (a sixth of a 2240² accumulator around a 2048² block).

        With `with_highest`: (labels, each pixel's highest class score, NaN where any class's
        is). Where it is not finite the model answered NaN or infinity (damaged or diverged
        weights, an overflow at low precision), and the argmax means nothing: NaN compares
        false, so such a pixel would quietly get class 0."""
        sums = self.sums if region is None else self.sums[(slice(None), *region)]
        if isinstance(sums, np.ndarray):
            labels = sums.argmax(0)
            return (labels, sums.max(0)) if with_highest else labels
        # torch's argmax over the leading (class) axis is slow on the CPU (0.67 s for 4 x 2048²,
        # a sixth of the block's time); one elementwise pass per class, in place, takes a few
        # milliseconds a class (fresh tensors each pass: 165 against 110 ms for 4 x 2240² on
        # one thread).
        import torch

        index = sums.new_zeros(sums.shape[1:], dtype=torch.uint8 if len(sums) <= 256 else torch.long)
        best = sums[0].clone()
        greater = sums.new_empty(sums.shape[1:], dtype=torch.bool)
        for k in range(1, len(sums)):
            torch.gt(sums[k], best, out=greater)
            index.masked_fill_(greater, k)
            torch.maximum(best, sums[k], out=best)
        # torch.maximum carries a NaN through: `best` is the highest score, or NaN.
        return (index, best) if with_highest else index

    def covered(self):
        """Where at least one tile contributed: elsewhere (background whose tiles were skipped)
        there is no prediction, and the pixels are nodata."""
        return self.weight_sums > 0

    def probabilities(self):
        """The weighted mean probabilities; 0 where no tile contributed (skipped background)."""
        # Covered pixels have a total weight of at least the smallest tile weight, far above `tiny`.
        return self.sums / self.weight_sums.clip(min=float(np.finfo(np.float32).tiny))


def fp32_zeros_like(like, shape: tuple[int, ...]):
    """fp32 zeros of `like`'s kind: a numpy array, or a torch tensor on like's device (torch stays unimported here)."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=np.float32)
    return like.new_zeros(shape)


def quantise_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 0..255 (the rounding error is at most 1/510)."""
    return np.rint(np.clip(probabilities, 0.0, 1.0) * 255).astype(np.uint8)
