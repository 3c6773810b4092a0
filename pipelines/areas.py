"""Physical area of pixels, for the statistics.

- projected CRS: every pixel has the area |det(transform)| in m² (linear units converted);
- geographic CRS: a pixel's area shrinks towards the poles, so each image row gets its own
  geodesic area on the CRS's ellipsoid (pyproj.Geod), exact for north-up grids where every
  pixel of a row has the same shape;
- no CRS: one pixel is one `px` (the source's note says so: Source.notes).
The worker that writes a block sums (class pixels in a row) x (that row's pixel area) over its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyproj
from rasterio.crs import CRS


@dataclass(frozen=True)
class PixelAreas:
    unit: str
    row_areas: np.ndarray
    """Area of one pixel in each image row (float64, length = image height)."""


def pixel_areas(crs_wkt: str | None, transform: tuple[float, ...], height: int) -> PixelAreas:
    a, b, c, d, e, f = transform
    if crs_wkt:
        crs = CRS.from_wkt(crs_wkt)
        if crs.is_projected:
            metres = crs.linear_units_factor[1]
            return PixelAreas("m2", np.full(height, abs(a * e - b * d) * metres**2))
        if crs.is_geographic:
            return PixelAreas("m2", geodesic_row_areas(crs, transform, height))
    return PixelAreas("px", np.ones(height))


def geodesic_row_areas(crs: CRS, transform: tuple[float, ...], height: int) -> np.ndarray:
    """Ellipsoidal area of the first pixel of each row (the quadrilateral of its four corners)."""
    a, b, c, d, e, f = transform
    geod = pyproj.CRS.from_wkt(crs.to_wkt()).get_geod()
    areas = np.empty(height)
    for row in range(height):
        corners = [(0, row), (1, row), (1, row + 1), (0, row + 1)]
        lons = [c + a * x + b * y for x, y in corners]
        lats = [f + d * x + e * y for x, y in corners]
        area, _ = geod.polygon_area_perimeter(lons, lats)
        areas[row] = abs(area)
    return areas
