"""GeoTIFF / COG (anything GDAL reads) through rasterio: inspect a source, read windows of it.

Only URIs cross function boundaries: a rasterio handle is not thread-safe, so every reader
thread opens its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
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
    has_mask: bool = False
    """The file carries a mask (an internal or sidecar mask band, or alpha) beyond nodata."""
    scales: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()

    @property
    def stem(self) -> str:
        return Path(self.uri).stem

    @property
    def scaled(self) -> bool:
        return any(s != 1 for s in self.scales) or any(o != 0 for o in self.offsets)

    @property
    def pixel_dtype(self) -> str:
        """What read_region returns: float32 once scale/offset are applied."""
        return "float32" if self.scaled else self.dtype

    @property
    def pixel_nodata(self) -> float | None:
        """The value read_region puts in masked or nodata pixels."""
        if self.scaled:
            return float("nan") if (self.nodata is not None or self.has_mask) else None
        if self.has_mask and self.nodata is None:
            return 0
        return self.nodata


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
                has_mask=any(
                    MaskFlags.per_dataset in flags or MaskFlags.alpha in flags for flags in src.mask_flag_enums
                ),
                scales=tuple(src.scales),
                offsets=tuple(src.offsets),
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


def read_region(info: RasterInfo, bands: tuple[int, ...], region: Region) -> np.ndarray:
    """Read bands x region (2D) of the scene: the file's scale and offset applied, masked and
    nodata pixels set to info.pixel_nodata. Raises InputError on a corrupt or truncated file."""
    (row0, col0), (row1, col1) = region.start, region.stop
    window = Window(col0, row0, col1 - col0, row1 - row0)
    try:
        with rasterio_env(info.uri), rasterio.Env(**GDAL_OPTIONS), rasterio.open(info.uri) as src:
            pixels = src.read(list(bands), window=window)
            if info.has_mask:
                invalid = src.read_masks(list(bands), window=window).max(axis=0) == 0
            elif info.nodata is not None:
                invalid = np.all(pixels == info.nodata, axis=0)
            else:
                invalid = None
    except RasterioError as exc:
        raise InputError(info.uri, f"cannot read rows {row0}:{row1}, cols {col0}:{col1} ({exc})") from exc
    if info.scaled:
        shape = (-1, 1, 1)
        scales = np.array([info.scales[b - 1] for b in bands], dtype=np.float32).reshape(shape)
        offsets = np.array([info.offsets[b - 1] for b in bands], dtype=np.float32).reshape(shape)
        pixels = pixels.astype(np.float32) * scales + offsets
    if invalid is not None:
        pixels[:, invalid] = info.pixel_nodata
    return pixels
