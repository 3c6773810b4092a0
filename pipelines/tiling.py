"""The global tile grid and the partition of an image into output blocks.

One grid per image: every worker sees the same tiles, so a pixel's value depends only on the
tiles that cover it, never on which block or worker computed it. Shapes are spatial only
((H, W) or (D, H, W)); bands are handled by the callers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


def axis_origins(size: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Tile start positions along one axis: a regular stride, the last tile flush with the edge.

    An axis shorter than the tile gets one tile at 0 that reaches past the edge (its input is
    padded and its output cropped back).
    """
    if size <= tile:
        return (0,)
    stride = max(1, int(round(tile * (1.0 - overlap))))
    count = math.ceil((size - tile) / stride) + 1
    return tuple(min(i * stride, size - tile) for i in range(count))


@dataclass(frozen=True)
class Box:
    """A half-open box [start, stop) per spatial axis."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def intersection(self, other: Box) -> Box | None:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop))
        if any(a >= b for a, b in zip(start, stop)):
            return None
        return Box(start, stop)

    def relative_to(self, origin: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, origin))

    def grown(self, margin: int) -> Box:
        return Box(tuple(a - margin for a in self.start), tuple(b + margin for b in self.stop))


@dataclass(frozen=True)
class TileGrid:
    shape: tuple[int, ...]
    tile_size: int
    overlap: float

    @property
    def origins(self) -> tuple[tuple[int, ...], ...]:
        return tuple(axis_origins(size, self.tile_size, self.overlap) for size in self.shape)

    def tile(self, origin: tuple[int, ...]) -> Box:
        return Box(origin, tuple(o + self.tile_size for o in origin))

    def __len__(self) -> int:
        return math.prod(len(o) for o in self.origins)

    def tiles_touching(self, block: Box) -> list[Box]:
        """Every tile of the grid that overlaps the block, in the grid's global raster order."""
        per_axis = [
            [o for o in origins if o < stop and o + self.tile_size > start]
            for origins, start, stop in zip(self.origins, block.start, block.stop)
        ]
        return [self.tile(origin) for origin in itertools.product(*per_axis)]


def block_partition(shape: tuple[int, ...], block_shape: tuple[int, ...]) -> list[Box]:
    """Cut the image into blocks of block_shape (aligned to the output shards), clipped at the edges."""
    ranges = [range(0, size, step) for size, step in zip(shape, block_shape)]
    return [
        Box(start, tuple(min(s + b, size) for s, b, size in zip(start, block_shape, shape)))
        for start in itertools.product(*ranges)
    ]
