"""The demo archive: the real Sentinel-2 scene that xarray-spatial ships, as one 6-band GeoTIFF.

xarray-spatial keeps each band as a netCDF3 file (200 x 300 px, 10 m, EPSG:32719) with the
affine transform and CRS in the variable's attributes.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from pipelines.errors import InputError

BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")


def sentinel2_band_files() -> list[Path]:
    try:
        folder = importlib.resources.files("xrspatial") / "datasets" / "sentinel-2"
    except ModuleNotFoundError as exc:
        raise InputError("xarray-spatial", "the demo scene needs it: pip install 'segpipe[demo]'") from exc
    return [Path(str(folder / f"{band}_band.nc")) for band in BANDS]


def write_sentinel2_scene(path: Path) -> Path:
    """Write the 6 bands on the 10 m grid of the blue band (uint16 digital numbers, nodata 0),
    tagged PROCESSING_LEVEL=L1C: the values are top-of-atmosphere reflectance (median blue 0.127
    above green 0.113, the darkest blue 0.100: an atmosphere not corrected).

    The SWIR bands come at 20 m over a larger extent; they are resampled (nearest) onto the
    10 m grid through their own transforms, so every band describes the same ground.
    """
    from scipy.io import netcdf_file

    bands, grid, crs = [], None, None
    for band_file in sentinel2_band_files():
        with netcdf_file(band_file, mmap=False) as nc:
            variable = nc.variables["__xarray_dataarray_variable__"]
            values = np.rint(variable.data).astype(np.uint16)
            transform = Affine(*variable._attributes["transform"][:6])
            crs = CRS.from_epsg(int(variable._attributes["crs"].decode().split(":")[-1]))
        if grid is None:
            grid = (transform, values.shape)
        bands.append(resample_nearest(values, transform, *grid))
    transform = grid[0]
    data = np.stack(bands)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": len(BANDS),
        "dtype": "uint16", "crs": crs, "transform": transform, "nodata": 0, "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        # Top-of-atmosphere reflectance (a haze floor, blue above green): Level-1C-like data.
        dst.update_tags(PROCESSING_LEVEL="L1C")
        for index, name in enumerate(BANDS, start=1):
            dst.set_band_description(index, name)
    return path


def resample_nearest(values: np.ndarray, transform: Affine, target: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour lookup of `values` (on `transform`) at the pixel centres of the target grid."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    xs = target.a * cols + target.b * rows + target.c
    ys = target.d * cols + target.e * rows + target.f
    inverse = ~transform
    src_cols = inverse.a * xs + inverse.b * ys + inverse.c
    src_rows = inverse.d * xs + inverse.e * ys + inverse.f
    return values[np.floor(src_rows).astype(int), np.floor(src_cols).astype(int)]
