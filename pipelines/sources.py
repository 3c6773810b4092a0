"""One view over every kind of source: a georeferenced scene, a whole-slide image, a volume.

`inspect_source` decides the kind from the model card and the file (a 3D card reads volumes;
slide formats, or a card that asks for a resolution in µm per pixel, read slides; anything else
is a scene for GDAL) and `read_source_region` returns (band, *region) pixels of any of them, so
ingest, segmentation and statistics do not care which kind they are working on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.areas import PixelAreas, pixel_areas
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.rasters import RasterInfo, check_bands, inspect_raster, read_region
from pipelines.slides import SlideInfo, choose_level, inspect_slide, read_slide_region, working_shape
from pipelines.tiling import Region
from pipelines.volumes import VolumeInfo, inspect_volume, read_volume_region, voxel_volume

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
VOLUME_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SourceInfo:
    uri: str
    kind: str
    """"scene", "slide" or "volume"."""
    shape: tuple[int, ...]
    """Spatial shape: (H, W), or (D, H, W) for volumes."""
    count: int
    dtype: str
    nodata: float | None
    detail: RasterInfo | SlideInfo | VolumeInfo
    slide_level: int = 0
    slide_scale: float = 1.0
    band_names: tuple[str | None, ...] = ()

    @property
    def stem(self) -> str:
        name = Path(self.uri).name
        for suffix in VOLUME_SUFFIXES + SLIDE_SUFFIXES + (".tif", ".tiff"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return Path(name).stem

    @property
    def working_mpp(self) -> float | None:
        """Slides: µm per pixel of the image the model sees (level and resampling applied)."""
        if self.kind != "slide" or self.detail.mpp_x is None:
            return None
        return self.detail.mpp_x * self.detail.level_downsamples[self.slide_level] * self.slide_scale


def inspect_source(uri: str | Path, card: ModelCard) -> SourceInfo:
    uri = str(uri)
    lower = uri.lower()
    if card.spatial_dims == 3 or lower.endswith(VOLUME_SUFFIXES):
        volume = inspect_volume(uri)
        info = SourceInfo(uri, "volume", volume.shape, volume.channels, volume.dtype, None, volume)
    elif lower.endswith(SLIDE_SUFFIXES) or card.mpp is not None:
        slide = inspect_slide(uri)
        level, scale = choose_level(slide, card.mpp)
        shape = working_shape(slide, level, scale)
        info = SourceInfo(uri, "slide", shape, 3, "uint8", None, slide, level, scale, ("red", "green", "blue"))
    else:
        raster = inspect_raster(uri)
        shape = (raster.height, raster.width)
        info = SourceInfo(uri, "scene", shape, raster.count, raster.dtype, raster.nodata, raster, band_names=raster.band_names)
    check_bands(info, resolve_bands(info, card), card.source)
    return info


def resolve_bands(info: SourceInfo, card: ModelCard) -> tuple[int, ...]:
    """The card's bands as 1-based indexes of this source; names match its band names (any case)."""
    names = [(name or "").lower() for name in info.band_names]
    indexes = []
    for band in card.bands:
        if isinstance(band, int):
            indexes.append(band)
        elif band.lower() in names:
            indexes.append(names.index(band.lower()) + 1)
        else:
            known = ", ".join(n for n in info.band_names if n) or "none"
            raise InputError(info.uri, f"has no band named '{band}' (its band names: {known}) that card {card.source} asks for")
    return tuple(indexes)


def read_source_region(info: SourceInfo, bands: tuple[int, ...], region: Region) -> np.ndarray:
    """(len(bands), *region.shape) pixels; bands are 1-based as in the card."""
    if info.kind == "scene":
        return read_region(info.uri, bands, region)
    if info.kind == "slide":
        pixels = read_slide_region(info.uri, info.slide_level, region, info.slide_scale)
    else:
        pixels = read_volume_region(info.uri, region)
    return pixels[[b - 1 for b in bands]]


def source_areas(info: SourceInfo) -> PixelAreas:
    """Physical area per pixel row: m² for scenes, µm² from the slide's MPP, mm³ per voxel."""
    if info.kind == "scene":
        return pixel_areas(info.detail.crs_wkt, info.detail.transform, info.shape[0])
    if info.kind == "slide" and info.working_mpp is not None:
        return PixelAreas("um2", np.full(info.shape[0], info.working_mpp**2))
    if info.kind == "volume":
        value, unit = voxel_volume(info.detail)
        return PixelAreas(unit, np.full(info.shape[0], value))
    return pixel_areas(None, (1, 0, 0, 0, -1, 0), info.shape[0])
