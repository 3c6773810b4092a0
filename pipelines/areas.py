"""Physical area of pixels, for the statistics.

- projected CRS: every pixel has the area |det(transform)| in m² (linear units converted),
  except in Mercator projections (Web Mercator, EPSG:3857, as web map tiles and many drone
  exports are; World Mercator): their map area is the true area times sec² of the latitude
  (2 x at 45°, 4 x at 60°), so each row gets the geodesic area of its first pixel, as for
  geographic grids;
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
        if crs.is_projected and is_mercator(crs):
            return PixelAreas("m2", geodesic_row_areas(crs, transform, height))
        if crs.is_projected:
            metres = crs.linear_units_factor[1]
            return PixelAreas("m2", np.full(height, abs(a * e - b * d) * metres**2))
        if crs.is_geographic:
            return PixelAreas("m2", geodesic_row_areas(crs, transform, height))
    return PixelAreas("px", np.ones(height))


MERCATOR_METHODS = ("Popular Visualisation Pseudo Mercator", "Mercator (variant A)", "Mercator (variant B)",
                    "Mercator (variant C)", "Mercator")


def is_mercator(crs: CRS) -> bool:
    """A normal-aspect Mercator projection (not Transverse Mercator, whose UTM zones keep areas
    within 0.1 %)."""
    operation = pyproj.CRS.from_wkt(crs.to_wkt()).coordinate_operation
    return operation is not None and operation.method_name in MERCATOR_METHODS


def geodesic_row_areas(crs: CRS, transform: tuple[float, ...], height: int) -> np.ndarray:
    """Ellipsoidal area of the first pixel of each row (the quadrilateral of its four corners;
    a projected CRS's corners taken to longitude and latitude first)."""
    a, b, c, d, e, f = transform
    projection = pyproj.CRS.from_wkt(crs.to_wkt())
    geod = projection.get_geod()
    to_degrees = (pyproj.Transformer.from_crs(projection, projection.geodetic_crs, always_xy=True)
                  if projection.is_projected else None)
    rows = np.arange(height, dtype=np.float64)[:, None]
    x = np.array([0.0, 1.0, 1.0, 0.0])[None, :]
    y = rows + np.array([0.0, 0.0, 1.0, 1.0])[None, :]
    lons, lats = c + a * x + b * y, f + d * x + e * y  # (rows, 4 corners)
    if to_degrees is not None:
        lons, lats = to_degrees.transform(lons, lats)
    areas = np.empty(height)
    for row in range(height):
        area, _ = geod.polygon_area_perimeter(lons[row].tolist(), lats[row].tolist())
        areas[row] = abs(area)
    return areas
