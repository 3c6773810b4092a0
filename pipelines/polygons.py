"""Class polygons from a label array: every connected region of one class (4-connectivity, as
GDAL polygonizes) as one polygon, in pixel coordinates, without seams and without depending on
how the labels were cut into blocks.

The labels are swept one row of blocks (a *strip*) at a time. In each block, every connected
piece of one class gets an id (scipy's labelling) and is polygonized on its own (GDAL's
polygonize of the ids, through rasterio). A piece that touches a border shared with another
block may continue there: where the pixels on the two sides of a shared border have one class,
their pieces are one region (a union-find over the pieces, fed by the pixels along the borders,
never by geometry). A region's pieces are united into its polygon once, when it is complete:
when none of them touches the lower border of the strip just swept. (Uniting each strip into
the regions still open made a class spanning the image cost its whole outline again at every
strip: the time grew with the square of the image's side.) Every complete region of a strip
reaches no lower than that border, and every region still open reaches it, so emitting each
strip's complete regions sorted by (lowest row, highest row, leftmost column, rightmost
column, class, shape) emits them all in that order whatever the strip height: the output is
the same for any block size. Memory holds one strip of labels and the open regions' pieces,
never the whole image.

Shapes are canonical: collinear vertices (where pieces were joined) are dropped and rings put in
shapely's normal form, so a region has one description whichever pieces it was built from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import rasterio.features
import shapely
from affine import Affine

from pipelines.tiling import Box, block_partition
from pipelines.zarr_stores import NODATA_LABEL

FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


@dataclass(frozen=True)
class ClassPolygon:
    class_id: int
    polygon: shapely.Polygon
    """In pixel coordinates: x = column, y = row, the image's top-left corner at (0, 0)."""
    pixels: int
    """Its area in pixels (exact: the polygon is a union of whole pixels)."""


def class_polygons(labels, strip_rows: int | None = None) -> Iterator[ClassPolygon]:
    """Every region of each class of a (H, W) uint8 label array (zarr or numpy; NODATA_LABEL is
    never a region), in the canonical order of the module docstring."""
    height, width = labels.shape
    block = tuple(getattr(labels, "shards", None) or getattr(labels, "chunks", None) or labels.shape)
    rows = strip_rows or block[0]
    regions = OpenRegions()
    above: tuple[np.ndarray, np.ndarray] | None = None  # the last row of the strip above: labels, piece ids
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        complete = []
        first_row = (np.empty(width, np.uint8), np.zeros(width, np.int64))
        last_row = (np.empty(width, np.uint8), np.zeros(width, np.int64))
        left: tuple[np.ndarray, np.ndarray] | None = None  # the right column of the block before
        for box in block_partition((bottom - top, width), (bottom - top, block[1])):
            box = Box((top, box.start[1]), (bottom, box.stop[1]))
            values = np.asarray(labels[box.slices()])
            ids = regions.pieces_of(values, box, height, width, complete)
            columns = slice(box.start[1], box.stop[1])
            first_row[0][columns], first_row[1][columns] = values[0], ids[0]
            last_row[0][columns], last_row[1][columns] = values[-1], ids[-1]
            if left is not None:
                regions.join_across(left, (values[:, 0], ids[:, 0]))
            left = (values[:, -1], ids[:, -1])
        if above is not None:
            regions.join_across(above, first_row)
        above = last_row
        complete += regions.close(bottom, last=bottom == height)
        yield from in_order(complete)


class OpenRegions:
    """The pieces that touch a shared block border, joined into regions by a union-find."""

    def __init__(self):
        self.pieces: dict[int, tuple[int, shapely.Polygon]] = {}
        self.parent: dict[int, int] = {}
        self.next_id = 1  # 0: no piece (nodata, or a piece that touches no shared border)

    def pieces_of(self, values: np.ndarray, box: Box, height: int, width: int,
                  complete: list[tuple[int, shapely.Polygon]]) -> np.ndarray:
        """Polygonize the block's pieces: those that touch no shared border are complete regions
        (appended to `complete`), the others are held here. Returns the block's pixels' piece
        ids (0 where the piece is not held)."""
        from scipy import ndimage  # here: the outputs' registry imports this module for every command

        ids = np.zeros(values.shape, np.int32)
        classes = [0]
        for class_id in np.unique(values):
            if class_id == NODATA_LABEL:
                continue
            found, count = ndimage.label(values == class_id, structure=FOUR_CONNECTED)
            ids[found > 0] = found[found > 0] + (len(classes) - 1)
            classes += [int(class_id)] * count
        held = np.zeros(len(classes), np.int64)
        offset = Affine.translation(box.start[1], box.start[0])
        for geometry, value in rasterio.features.shapes(ids, mask=ids > 0, connectivity=4, transform=offset):
            local = int(value)
            piece = polygon_from_geojson(geometry)
            if touches_shared_border(piece, box, height, width):
                held[local] = self.next_id
                self.pieces[self.next_id] = (classes[local], piece)
                self.parent[self.next_id] = self.next_id
                self.next_id += 1
            else:
                complete.append((classes[local], piece))
        return held[ids]

    def root(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def join_across(self, one_side: tuple[np.ndarray, np.ndarray], other_side: tuple[np.ndarray, np.ndarray]) -> None:
        """Join the pieces of pixels facing each other across a shared border (a block's last
        column and the next block's first, a strip's last row and the next strip's first) where
        they have one class."""
        (labels_a, ids_a), (labels_b, ids_b) = one_side, other_side
        facing = (labels_a == labels_b) & (ids_a > 0) & (ids_b > 0)
        for a, b in set(zip(ids_a[facing].tolist(), ids_b[facing].tolist())):
            root_a, root_b = self.root(a), self.root(b)
            if root_a != root_b:
                self.parent[root_a] = root_b

    def close(self, bottom: int, last: bool) -> list[tuple[int, shapely.Polygon]]:
        """The regions that do not reach `bottom` (the lower border of the strip just swept; all of
        them after the last strip), each united into one polygon; the others stay open."""
        regions: dict[int, list[int]] = defaultdict(list)
        for index in self.pieces:
            regions[self.root(index)].append(index)
        complete = []
        for indexes in regions.values():
            if not last and any(self.pieces[i][1].bounds[3] == bottom for i in indexes):
                continue
            class_id = self.pieces[indexes[0]][0]
            pieces = [self.pieces[i][1] for i in indexes]
            united = pieces[0] if len(pieces) == 1 else union_of_pieces(pieces)
            complete += [(class_id, region) for region in shapely.get_parts(united)]
            for i in indexes:
                del self.pieces[i], self.parent[i]
        return complete


def union_of_pieces(pieces: list[shapely.Polygon]) -> shapely.Geometry:
    """The union of a region's pieces. Only their outlines are united: a piece's holes lie inside
    it, away from every other piece, so they are holes of the union as they are, added back
    after (a general union of a class with thousands of holes took seconds)."""
    outlines = shapely.union_all(shapely.polygons(shapely.get_exterior_ring(np.asarray(pieces, dtype=object))))
    holes = [ring for piece in pieces for ring in piece.interiors]
    if not holes:
        return outlines
    if not isinstance(outlines, shapely.Polygon):  # joined through edges, a region is one polygon
        raise AssertionError(f"a region's pieces united into {outlines.geom_type}")
    return shapely.Polygon(outlines.exterior, [*outlines.interiors, *holes])


def polygon_from_geojson(geometry: dict) -> shapely.Polygon:
    """A GeoJSON polygon (rasterio.features.shapes' output) as a shapely polygon, its rings
    through numpy (shapely.geometry.shape builds them point by point)."""
    shell, *holes = (shapely.linearrings(np.asarray(ring, dtype=np.float64)) for ring in geometry["coordinates"])
    return shapely.polygons(shell, holes=holes or None)


def touches_shared_border(piece: shapely.Polygon, box: Box, height: int, width: int) -> bool:
    """Whether the piece reaches a side of its block that another block (or strip) shares."""
    min_x, min_y, max_x, max_y = piece.bounds
    (row0, col0), (row1, col1) = box.start, box.stop
    return (min_y == row0 > 0) or (max_y == row1 < height) or (min_x == col0 > 0) or (max_x == col1 < width)


def in_order(complete: list[tuple[int, shapely.Polygon]]) -> list[ClassPolygon]:
    """A strip's complete regions in canonical shapes and in the canonical order: (lowest row,
    highest row, leftmost column, rightmost column, class, shape). Each shape's collinear
    vertices are dropped (tolerance 0 keeps every corner, so the plain Douglas-Peucker simplifier
    cannot change the shape; the topology-preserving one took minutes for a region with
    thousands of holes) and its rings put in normal form. Vectorised over the strip's regions:
    a noisy label map has hundreds of thousands."""
    if not complete:
        return []
    classes = [class_id for class_id, _ in complete]
    shapes = shapely.normalize(shapely.simplify(np.asarray([p for _, p in complete], dtype=object), 0,
                                                preserve_topology=False))
    bounds, pixels, descriptions = shapely.bounds(shapes), np.rint(shapely.area(shapes)), shapely.to_wkb(shapes)
    order = sorted(range(len(complete)), key=lambda i: (bounds[i, 3], bounds[i, 1], bounds[i, 0], bounds[i, 2],
                                                         classes[i], descriptions[i]))
    return [ClassPolygon(classes[i], shapes[i], int(pixels[i])) for i in order]
