"""One view over every kind of source: a georeferenced scene, a whole-slide image, a volume.

`inspect_source` decides the kind from the model card and the file (a 3D card reads volumes;
slide formats, or a card that asks for a resolution in µm per pixel, read slides; anything else
is a scene for GDAL) and `read_source_region` returns (band, *region) pixels of any of them, so
ingest, segmentation and statistics do not care which kind they are working on.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipelines import storage
from pipelines.areas import PixelAreas, pixel_areas
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.rasters import RasterInfo, check_bands, inspect_raster, read_region
from pipelines.slides import SlideInfo, choose_level, inspect_slide, read_slide_region, working_shape
from pipelines.tiling import Region
from pipelines.volumes import VolumeInfo, inspect_volume, read_volume_region, voxel_volume

ZARR_SUFFIXES = (".zarr", ".zarr/")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
VOLUME_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SourceInfo:
    uri: str
    kind: str
    """"scene", "slide", "volume" or "zarr" (an existing (channel, *spatial) Zarr or OME-Zarr array, used in place)."""
    shape: tuple[int, ...]
    """Spatial shape: (H, W), or (D, H, W) for volumes."""
    count: int
    dtype: str
    nodata: float | None
    detail: RasterInfo | SlideInfo | VolumeInfo | ZarrImage
    slide_level: int = 0
    slide_scale: float = 1.0
    band_names: tuple[str | None, ...] = ()

    @property
    def stem(self) -> str:
        return image_stem(self.uri)

    @property
    def working_mpp(self) -> float | None:
        """Slides: µm per pixel of the image the model sees (level and resampling applied)."""
        if self.kind != "slide" or self.detail.mpp_x is None:
            return None
        return self.detail.mpp_x * self.detail.level_downsamples[self.slide_level] * self.slide_scale


def image_stem(uri: str) -> str:
    """The image's name without its format suffix (the name of its output folder)."""
    name = Path(uri.rstrip("/")).name
    for suffix in (".ome.zarr", ".zarr") + VOLUME_SUFFIXES + SLIDE_SUFFIXES + (".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def inspect_source(uri: str | Path, card: ModelCard) -> SourceInfo:
    uri = str(uri).rstrip("/")
    lower = uri.lower()
    if lower.endswith(".zarr"):
        image = open_zarr_image(uri, card.spatial_dims)
        info = SourceInfo(uri, "zarr", image.shape[1:], image.shape[0], image.dtype, None, image)
    elif card.spatial_dims == 3 or lower.endswith(VOLUME_SUFFIXES):
        volume = inspect_volume(local_copy(uri))
        info = SourceInfo(uri, "volume", volume.shape, volume.channels, volume.dtype, None, volume)
    elif lower.endswith(SLIDE_SUFFIXES) or card.mpp is not None:
        slide = inspect_slide(local_copy(uri))
        level, scale = choose_level(slide, card.mpp)
        shape = working_shape(slide, level, scale)
        info = SourceInfo(uri, "slide", shape, 3, "uint8", None, slide, level, scale, ("red", "green", "blue"))
    else:
        raster = inspect_raster(uri)
        shape = (raster.height, raster.width)
        info = SourceInfo(
            uri, "scene", shape, raster.count, raster.pixel_dtype, raster.pixel_nodata, raster, band_names=raster.band_names
        )
    check_bands(info, resolve_bands(info, card), card.source)
    return info


def local_copy(uri: str) -> str:
    """Slide and volume readers need a seekable local file: an s3:// object is copied once into
    a cache folder keyed by its URI and ETag (GDAL reads scenes over /vsis3/ directly)."""
    if not storage.is_remote(uri):
        return uri
    size, version = storage.stat(uri)
    key = hashlib.sha256(f"{uri}|{size}|{version}".encode()).hexdigest()[:24]
    target = Path(tempfile.gettempdir()) / "segpipe-cache" / key / Path(uri).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        storage.get_file(uri, partial)
        partial.replace(target)
    return str(target)


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
        return read_region(info.detail, bands, region)
    if info.kind == "slide":
        pixels = read_slide_region(info.detail.uri, info.slide_level, region, info.slide_scale)
    elif info.kind == "zarr":
        array = zarr.open_array(info.detail.array_path, mode="r")
        return np.asarray(array[([b - 1 for b in bands], *region.slices())])
    else:
        pixels = read_volume_region(info.detail.uri, region)
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
    if info.kind == "zarr" and info.detail.unit:
        return PixelAreas(f"{info.detail.unit}{len(info.shape)}", np.full(info.shape[0], float(np.prod(info.detail.pixel_size))))
    return pixel_areas(None, (1, 0, 0, 0, -1, 0), info.shape[0])


UNIT_SYMBOLS = {"micrometer": "um", "millimeter": "mm", "nanometer": "nm", "centimeter": "cm", "meter": "m"}


@dataclass(frozen=True)
class ZarrImage:
    array_path: str
    shape: tuple[int, ...]
    """(channel, *spatial)."""
    dtype: str
    pixel_size: tuple[float, ...] = ()
    unit: str | None = None
    """Symbol of the spatial unit of pixel_size (e.g. um), when the OME-Zarr metadata gives one."""


def open_zarr_image(uri: str, spatial_dims: int) -> ZarrImage:
    """A plain Zarr array (channel, *spatial), or the full-resolution array of an OME-Zarr image
    (NGFF 0.4 or 0.5 `multiscales`, its level-0 scale and units giving the pixel size)."""
    try:
        node = zarr.open(uri, mode="r")
    except Exception as exc:
        raise InputError(uri, f"not a readable Zarr store ({exc})") from exc
    pixel_size, unit, array_path = (), None, uri
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise InputError(uri, "is a Zarr group without OME-Zarr multiscales metadata")
        image = multiscales[0]
        level0 = image["datasets"][0]
        node = node[level0["path"]]
        array_path = f"{uri}/{level0['path']}"
        axes = image.get("axes", [])
        space = [a for a in axes if isinstance(a, dict) and a.get("type") == "space"]
        scales = next((t["scale"] for t in level0.get("coordinateTransformations", []) if t["type"] == "scale"), None)
        if space and scales:
            pixel_size = tuple(scales[-len(space):])
            unit = UNIT_SYMBOLS.get(space[-1].get("unit"))
    shape = tuple(node.shape)
    if len(shape) == spatial_dims:
        raise InputError(uri, f"has no channel axis: segpipe reads (channel, *spatial) arrays, this one is {shape}")
    if len(shape) != spatial_dims + 1:
        raise InputError(uri, f"has shape {shape}; a {spatial_dims}D model card needs (channel, *spatial)")
    return ZarrImage(array_path, shape, str(node.dtype), pixel_size, unit)
