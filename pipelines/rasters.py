"""GeoTIFF / COG (anything GDAL reads) through rasterio: inspect a source, read windows of it.

Only URIs cross function boundaries: a rasterio handle is not thread-safe, so every reader
thread opens its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipelines.errors import InputError
from pipelines.storage import exists, rasterio_env
from pipelines.tiling import Region

# GDAL's block cache defaults to 5% of RAM per process; a fixed bound keeps a worker's memory
# independent of the machine and of the image.
GDAL_OPTIONS = {"GDAL_CACHEMAX": 256}


@dataclass(frozen=True)
class RasterInfo:
    uri: str
    height: int
    width: int
    count: int
    dtype: str
    crs_wkt: str | None
    transform: tuple[float, ...]
    """Affine coefficients (a, b, c, d, e, f) as rasterio orders them."""
    nodata: float | None
    band_names: tuple[str | None, ...] = ()
    """The bands' descriptions, where the file has them."""

    @property
    def stem(self) -> str:
        return Path(self.uri).stem


def inspect_raster(uri: str | Path) -> RasterInfo:
    uri = str(uri)
    if not exists(uri):
        raise InputError(uri, "no such file")
    try:
        with rasterio_env(uri), rasterio.open(uri) as src:
            if src.crs is None:
                raise InputError(uri, "has no coordinate reference system: a scene must be georeferenced")
            return RasterInfo(
                uri=uri,
                height=src.height,
                width=src.width,
                count=src.count,
                dtype=src.dtypes[0],
                crs_wkt=src.crs.to_wkt() if src.crs else None,
                transform=tuple(src.transform)[:6],
                nodata=src.nodata,
                band_names=tuple(src.descriptions),
            )
    except RasterioError as exc:
        raise InputError(uri, f"not a readable raster ({exc})") from exc


def check_bands(info, bands: tuple[int, ...], card_source: str) -> None:
    """info: anything with `uri` and `count` (the number of bands); bands are 1-based indexes."""
    if max(bands) > info.count or min(bands) < 1:
        raise InputError(
            info.uri,
            f"has {info.count} band(s) but model card {card_source} needs bands {list(bands)}",
        )


def read_region(uri: str, bands: tuple[int, ...], region: Region) -> np.ndarray:
    """Read bands x region (2D) from the source; raises InputError on a corrupt or truncated file."""
    (row0, col0), (row1, col1) = region.start, region.stop
    try:
        with rasterio_env(uri), rasterio.Env(**GDAL_OPTIONS), rasterio.open(uri) as src:
            return src.read(list(bands), window=Window(col0, row0, col1 - col0, row1 - row0))
    except RasterioError as exc:
        raise InputError(uri, f"cannot read rows {row0}:{row1}, cols {col0}:{col1} ({exc})") from exc
