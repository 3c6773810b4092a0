"""Cloud-Optimized GeoTIFF export of a label array.

The COG driver is CreateCopy-only and may buffer the whole raster, so labels are first written
block by block into a tiled GTiff, overviews are added (nearest: class indices must not be
averaged), and GDAL copies that file into the COG layout.
"""

from __future__ import annotations

from pathlib import Path

import rasterio
import rasterio.shutil
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling

from pipelines.model_card import ClassInfo
from pipelines.rasters import GDAL_OPTIONS
from pipelines.tiling import block_partition
from pipelines.zarr_stores import NODATA_LABEL


def write_labels_cog(
    labels: zarr.Array,
    path: Path,
    crs_wkt: str | None,
    transform: tuple[float, ...] | None,
    classes: tuple[ClassInfo, ...],
) -> None:
    """transform None: a plain tiled TIFF in pixel coordinates (slides), no georeferencing."""
    height, width = labels.shape
    scratch = path.with_suffix(".scratch.tif")
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": "uint8",
        "crs": CRS.from_wkt(crs_wkt) if crs_wkt else None,
        **({"transform": Affine(*transform)} if transform else {}),
        "nodata": NODATA_LABEL,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    colormap = {c.id: (*c.color, 255) for c in classes}
    colormap[NODATA_LABEL] = (0, 0, 0, 0)
    try:
        with rasterio.Env(**GDAL_OPTIONS):
            with rasterio.open(scratch, "w", **profile) as dst:
                for region in block_partition((height, width), labels.shards):
                    (row0, col0), (row1, col1) = region.start, region.stop
                    dst.write(labels[region.slices()], 1, window=((row0, row1), (col0, col1)))
                dst.write_colormap(1, colormap)
                factors = [f for f in (2, 4, 8, 16, 32, 64) if min(height, width) // f >= 256]
                if factors:
                    dst.build_overviews(factors, Resampling.nearest)
            rasterio.shutil.copy(
                scratch, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512,
                OVERVIEWS="FORCE_USE_EXISTING", RESAMPLING="NEAREST",
            )
    finally:
        scratch.unlink(missing_ok=True)
