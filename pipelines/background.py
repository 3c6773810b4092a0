"""Background skipping: a low-resolution mask of where there is anything to segment.

A cell of the mask covers FACTOR pixels per axis and is True when any pixel in it is valid, so
a tile whose footprint meets no True cell holds no valid pixel at all: it is never sent to a
model, and its pixels (all nodata) get the nodata label. The decision is per tile of the global
grid, so it does not depend on blocks or workers.
"""

from __future__ import annotations

import itertools

import numpy as np

from pipelines.tiling import Box, TileGrid

FACTOR = 8


def valid_pixels(pixels: np.ndarray, nodata: float | None) -> np.ndarray:
    """(band, *spatial) -> (*spatial) bool: a pixel is valid unless every band holds nodata, or
    any band holds a value that is not a finite number (NaN, infinity)."""
    if nodata is None:
        valid = np.ones(pixels.shape[1:], dtype=bool)
    elif np.isnan(nodata):
        valid = ~np.all(np.isnan(pixels), axis=0)
    else:
        valid = ~np.all(pixels == nodata, axis=0)
    if np.issubdtype(pixels.dtype, np.floating):
        valid &= np.all(np.isfinite(pixels), axis=0)
    return valid


def mask_shape(shape: tuple[int, ...], factor: int = FACTOR) -> tuple[int, ...]:
    return tuple(-(-s // factor) for s in shape)


def add_box_to_mask(mask: np.ndarray, box: Box, valid: np.ndarray, factor: int = FACTOR) -> None:
    """OR the valid pixels of `box` into the low-resolution mask (cells may straddle regions)."""
    lead = [s % factor for s in box.start]
    cells = [-(-(lead_i + size) // factor) for lead_i, size in zip(lead, box.shape)]
    padded = np.zeros([c * factor for c in cells], dtype=bool)
    padded[tuple(slice(l, l + size) for l, size in zip(lead, box.shape))] = valid
    reduced = padded.reshape([v for c in cells for v in (c, factor)]).any(axis=tuple(range(1, 2 * len(cells), 2)))
    first = [s // factor for s in box.start]
    mask[tuple(slice(f, f + c) for f, c in zip(first, cells))] |= reduced


def tiles_with_data(grid: TileGrid, mask: np.ndarray, factor: int = FACTOR) -> set[tuple[int, ...]]:
    """Origins of the grid's tiles that hold at least one valid pixel."""
    keep = set()
    for origin in itertools.product(*grid.origins):
        window = tuple(
            slice(o // factor, -(-min(o + grid.tile_size, size) // factor))
            for o, size in zip(origin, grid.shape)
        )
        if mask[window].any():
            keep.add(origin)
    return keep
