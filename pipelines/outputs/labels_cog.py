"""labels.tif of a scene: a Cloud-Optimized GeoTIFF with the source's CRS and transform.

The COG driver is CreateCopy-only and may buffer the whole raster, so labels are first written
block by block into a tiled GTiff, overviews are added (nearest: class indices must not be
averaged) down to a single 512-pixel tile, as GDAL's COG validator and `rio cogeo validate
--strict` want, and GDAL copies that file into the COG layout.

What the values mean travels with the file: a colour table with the card's classes and a
transparent nodata (a TIFF palette has all 256 entries; the others are unused), the class names as the band's category names and a
raster attribute table (value, class, red, green, blue, alpha) in `labels.tif.aux.xml`, GDAL's
own sidecar that QGIS, ArcGIS and every GDAL tool read, and the provenance (model, version,
digest, run id, segpipe version) in the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import rasterio
import rasterio.shutil
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling

from pipelines.model_card import ClassInfo
from pipelines.outputs import Output, OutputContext
from pipelines.sources.scene import GDAL_OPTIONS
from pipelines.tiling import Box, block_partition
from pipelines.zarr_stores import NODATA_LABEL


TILE = 512


def write_labels_cog(
    labels: zarr.Array,
    path: Path,
    crs_wkt: str | None,
    transform: tuple[float, ...] | None,
    classes: tuple[ClassInfo, ...],
    pixel_size_um: tuple[float, float] | None = None,
    provenance: dict[str, str] | None = None,
) -> None:
    """transform None: a plain tiled TIFF in pixel coordinates (slides, images), no
    georeferencing; `pixel_size_um` (y, x) then goes into the TIFF resolution tags (pixels per
    centimetre), which QuPath, napari and ImageJ read."""
    write_uint8_cog(lambda box: labels[box.slices()], labels.shape, labels.shards, path, crs_wkt, transform,
                    NODATA_LABEL, Resampling.nearest,
                    colormap={**{c.id: (*c.color, 255) for c in classes}, NODATA_LABEL: (0, 0, 0, 0)},
                    pixel_size_um=pixel_size_um, provenance=provenance)
    write_class_table(path, classes)


def write_uint8_cog(
    read_block: Callable[[Box], np.ndarray],
    shape: tuple[int, int],
    block_shape: tuple[int, int],
    path: Path,
    crs_wkt: str | None,
    transform: tuple[float, ...] | None,
    nodata: int,
    resampling: Resampling,
    colormap: dict | None = None,
    pixel_size_um: tuple[float, float] | None = None,
    provenance: dict[str, str] | None = None,
) -> None:
    """A one-band uint8 COG written block by block (`read_block(box)` for each block of
    `block_shape`); blocks all nodata are left out of the file (sparse) and read back as nodata."""
    height, width = shape
    scratch = path.with_suffix(".scratch.tif")
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": "uint8",
        "crs": CRS.from_wkt(crs_wkt) if crs_wkt else None,
        **({"transform": Affine(*transform)} if transform else {}),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": TILE,
        "blockysize": TILE,
        "compress": "deflate",
        "sparse_ok": True,
    }
    try:
        with rasterio.Env(**GDAL_OPTIONS):
            with rasterio.open(scratch, "w", **profile) as dst:
                for box in block_partition((height, width), block_shape):
                    (row0, col0), (row1, col1) = box.start, box.stop
                    block = read_block(box)
                    if (block == nodata).all():
                        continue
                    dst.write(block, 1, window=((row0, row1), (col0, col1)))
                if colormap:
                    dst.write_colormap(1, colormap)
                if pixel_size_um:
                    dst.update_tags(TIFFTAG_RESOLUTIONUNIT="3", TIFFTAG_YRESOLUTION=str(1e4 / pixel_size_um[0]),
                                    TIFFTAG_XRESOLUTION=str(1e4 / pixel_size_um[1]))
                if provenance:
                    dst.update_tags(**{f"SEGPIPE_{key.upper()}": value for key, value in provenance.items()})
                if factors := overview_factors(height, width):
                    dst.build_overviews(factors, resampling)
            rasterio.shutil.copy(
                scratch, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=TILE,
                OVERVIEWS="FORCE_USE_EXISTING", RESAMPLING=resampling.name.upper(), SPARSE_OK="TRUE",
            )
    finally:
        scratch.unlink(missing_ok=True)


def overview_factors(height: int, width: int, tile: int = TILE) -> list[int]:
    """Powers of two until the coarsest level fits in one tile."""
    factors, factor = [], 2
    while max(height, width) / (factor // 2) > tile:
        factors.append(factor)
        factor *= 2
    return factors


# GDAL raster attribute table field types and usages (gdal.h: GDALRATFieldType, GDALRATFieldUsage).
RAT_INTEGER, RAT_STRING = 0, 2
RAT_USAGE = {"Value": 5, "Class": 2, "Red": 6, "Green": 7, "Blue": 8, "Alpha": 9}  # MinMax, Name, colours


def write_class_table(path: Path, classes: tuple[ClassInfo, ...]) -> None:
    """`<path>.aux.xml`: the class names as category names and a thematic raster attribute
    table, in GDAL's PAM format."""
    from xml.etree import ElementTree as ET

    dataset = ET.Element("PAMDataset")
    band = ET.SubElement(dataset, "PAMRasterBand", band="1")
    categories = ET.SubElement(band, "CategoryNames")
    for c in classes:
        ET.SubElement(categories, "Category").text = c.name
    table = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    for index, (name, usage) in enumerate(RAT_USAGE.items()):
        field = ET.SubElement(table, "FieldDefn", index=str(index))
        ET.SubElement(field, "Name").text = name
        ET.SubElement(field, "Type").text = str(RAT_STRING if name == "Class" else RAT_INTEGER)
        ET.SubElement(field, "Usage").text = str(usage)
    for c in classes:
        row = ET.SubElement(table, "Row", index=str(c.id))
        for value in (c.id, c.name, *c.color, 255):
            ET.SubElement(row, "F").text = str(value)
    ET.indent(dataset)
    Path(f"{path}.aux.xml").write_bytes(ET.tostring(dataset, encoding="utf-8") + b"\n")


def write(context: OutputContext, folder: Path) -> None:
    source = context.source
    write_labels_cog(context.labels, folder / OUTPUT.file, source.crs_wkt, source.transform, context.card.classes,
                     provenance=context.provenance)


OUTPUT = Output("labels-cog", "labels.tif", write, spatial_dims=(2,),
                description="class per pixel, COG with the source's CRS and transform")
