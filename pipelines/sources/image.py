"""Images without georeferencing: plain TIFF, PNG, JPEG, microscopy OME-TIFF, drone pictures.

Pixel coordinates throughout. The pixel size comes from an OME-TIFF's PhysicalSizeX/Y (with
its units) or the TIFF resolution tags (inch or centimetre); then areas are in µm², else in
pixels. The channels of a multi-channel OME-TIFF have names (its Channel Name attributes), so a
card can ask for them by name. TIFFs are read through tifffile's Zarr view (only the strips or
tiles a window touches); other formats through GDAL (rasterio), whose georeferencing warning
for them is silenced: a one-line note says what the image is taken as instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import rasterio
import tifffile
import zarr
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipelines import storage
from pipelines.areas import PixelAreas
from pipelines.errors import InputError, unreadable_window
from pipelines.model_card import ModelCard
from pipelines.sources import Source, SourceKind, local_copy
from pipelines.sources.tiff_errors import is_tiff_read_error
from pipelines.tiling import Box

# tifffile logs what it finds wrong in a file ("invalid offset to first page") as warnings,
# which Python printed on stderr above segpipe's own one-line error for the same file.
logging.getLogger("tifffile").addHandler(logging.NullHandler())

TIFF_SUFFIXES = (".tif", ".tiff")
SUFFIXES = (".ome.tif", ".ome.tiff", *TIFF_SUFFIXES, ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".vrt", ".jp2")
CHANNEL_AXES = ("C", "S")
MICRONS = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "μm": 1.0, "nm": 1e-3, "pm": 1e-6,
           "in": 25400.0, "inch": 25400.0}
# TIFF 6.0 ResolutionUnit: 2 = inch, 3 = centimetre (1 = no unit: a ratio only).
MICRONS_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 10000.0}


class StackError(InputError):
    """A TIFF of several planes (z, time) given to a 2D card: an image, but not one to segment in 2D."""


@dataclass(frozen=True)
class ImageInfo:
    uri: str
    """The local file read (a copy, for an s3:// image)."""
    shape: tuple[int, int]
    channels: int
    dtype: str
    reader: str
    """"tifffile" or "gdal"."""
    channel_names: tuple[str | None, ...]
    pixel_size_um: tuple[float, float] | None
    """(y, x) µm per pixel, where the file says."""
    axes: str = ""
    """tifffile's axes of the series read (TIFF only)."""
    palette: np.ndarray | None = field(default=None, compare=False)
    """(entries, 3) uint8 colours of a palette image (GIF, PNG or TIFF of colour indices), whose
    one band of indices is read as red, green and blue: a model wants the colours, not the
    order in which the file's writer listed them."""

    alpha: int | None = None
    """The 1-based channel of an alpha channel (RGBA PNG or TIFF): where it is 0 (transparent)
    the pixel is nodata, as GDAL's alpha masks of a scene are."""

    def indices(self) -> ImageInfo:
        """The same file read as its stored values (a palette image's indices): a label file."""
        if self.palette is None:
            return self
        return dataclasses.replace(self, channels=1, channel_names=(None,), palette=None)


def inspect_image(path: str, look_at_alpha: bool = True) -> ImageInfo:
    """What the image holds; an alpha channel is looked at whole (ALPHA_CHECKED_PIXELS) unless
    `look_at_alpha` is False (only whether it is readable is asked)."""
    if not Path(path).is_file():
        raise InputError(path, "no such file")
    info = _inspect_tiff(path) if path.lower().endswith(TIFF_SUFFIXES) else _inspect_gdal(path)
    if look_at_alpha and info.alpha is not None and math.prod(info.shape) <= ALPHA_CHECKED_PIXELS:
        alpha = read_image_box(dataclasses.replace(info, alpha=None), (info.alpha,), Box((0, 0), info.shape))
        if alpha.all():  # opaque everywhere (a picture saved as RGBA): no pixel is nodata
            return dataclasses.replace(info, alpha=None)
    return info


# An alpha channel makes a pixel black in every band nodata; an image up to this size is first
# looked at whole, and one opaque everywhere keeps its black pixels (its alpha says nothing).
ALPHA_CHECKED_PIXELS = 1 << 26


def _inspect_gdal(path: str) -> ImageInfo:
    try:
        with rasterio.open(path) as src:
            if src.count == 1 and src.colorinterp[0] == ColorInterp.palette:
                return ImageInfo(path, (src.height, src.width), 3, "uint8", "gdal", PALETTE_CHANNELS, None,
                                 palette=palette_colours(src.colormap(1).items()))
            alpha = next((i + 1 for i, c in enumerate(src.colorinterp) if c == ColorInterp.alpha), None)
            return ImageInfo(path, (src.height, src.width), src.count, src.dtypes[0], "gdal",
                             tuple(src.descriptions), None, alpha=alpha if src.count > 1 else None)
    except RasterioError as exc:
        raise InputError(path, f"not a readable image ({exc})") from exc


PALETTE_CHANNELS = ("red", "green", "blue")


def palette_colours(entries, divisor: int = 1) -> np.ndarray:
    """(256 or more, 3) uint8 colours from (index, (r, g, b, ...)) entries, each component
    divided by `divisor`; missing entries are black."""
    entries = list(entries)
    colours = np.zeros((max(256, max((k for k, _ in entries), default=0) + 1), 3), dtype=np.uint8)
    for index, colour in entries:
        colours[index] = [c // divisor for c in colour[:3]]
    return colours


def tiff_colour_map_divisor(colour_map: np.ndarray) -> int:
    """What turns a TIFF ColorMap's 16-bit components into 8-bit ones, as GDAL (and so QGIS)
    decides: 257 when every one is a multiple of it (0xABAB), 1 when none exceeds 255 (an 8-bit
    table stored as is), else 256 (0xAB00, as PIL and libtiff write)."""
    if not (colour_map % 257).any():
        return 257
    return 1 if colour_map.max() < 256 else 256


def _inspect_tiff(path: str) -> ImageInfo:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
            if "Y" not in axes or "X" not in axes:
                raise InputError(path, f"TIFF series axes {axes!r} have no Y and X")
            others = {a: n for a, n in zip(axes, shape) if a not in ("Y", "X", *CHANNEL_AXES) and n > 1}
            if others:
                raise StackError(path, f"is a stack ({axes} {shape}): a 2D card reads one plane; a 3D card "
                                       "(spatial_dims: 3) reads it as a volume")
            channels = math.prod(n for a, n in zip(axes, shape) if a in CHANNEL_AXES)
            names, size = ome_channels_and_size(tif) if tif.is_ome else ((), None)
            size = size or _resolution_tags_um(tif.pages[0])
            page = tif.pages[0]
            if channels == 1 and page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                colour_map = np.asarray(page.colormap, dtype=np.int64)
                colours = palette_colours(enumerate(colour_map.T.tolist()), tiff_colour_map_divisor(colour_map))
                return ImageInfo(path, (shape[axes.index("Y")], shape[axes.index("X")]), 3, "uint8", "tifffile",
                                 PALETTE_CHANNELS, size, axes, palette=colours)
            extra = tuple(int(e) for e in (page.extrasamples or ()))
            alpha = (channels - len(extra) + extra.index(2) + 1  # 2: unassociated alpha, RGBA's
                     if 2 in extra and channels > len(extra) else None)
            return ImageInfo(path, (shape[axes.index("Y")], shape[axes.index("X")]), channels, str(series.dtype),
                             "tifffile", names if len(names) == channels else (None,) * channels, size, axes,
                             alpha=alpha)
    except InputError:
        raise
    except Exception as exc:
        if not is_tiff_read_error(exc):
            raise
        raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from exc


def ome_channels_and_size(tif: tifffile.TiffFile) -> tuple[tuple[str | None, ...], tuple[float, float] | None]:
    """Channel names and (y, x) µm per pixel of the first OME image."""
    root = ElementTree.fromstring(tif.ome_metadata)
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels")), None)
    if pixels is None:
        return (), None
    names = tuple(c.get("Name") for c in pixels if c.tag.endswith("}Channel"))
    sizes = []
    for axis in ("Y", "X"):
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in MICRONS:
            return names, None
        sizes.append(float(value) * MICRONS[unit])
    return names, tuple(sizes) if all(s > 0 for s in sizes) else None


def _resolution_tags_um(page) -> tuple[float, float] | None:
    """(y, x) µm per pixel from XResolution / YResolution with ResolutionUnit inch or centimetre."""
    unit = page.tags.get("ResolutionUnit")
    x_res, y_res = page.tags.get("XResolution"), page.tags.get("YResolution")
    if unit is None or x_res is None or y_res is None or int(unit.value) not in MICRONS_PER_RESOLUTION_UNIT:
        return None
    microns = MICRONS_PER_RESOLUTION_UNIT[int(unit.value)]
    per_unit = [Fraction(*tag.value) for tag in (y_res, x_res)]
    if any(p <= 0 for p in per_unit):
        return None
    return tuple(microns / float(p) for p in per_unit)


def read_image_box(info: ImageInfo, bands: tuple[int, ...], box: Box) -> np.ndarray:
    """(len(bands), *box.shape) pixels of the image; bands are 1-based."""
    (row0, col0), (row1, col1) = box.start, box.stop
    if info.palette is not None:
        indices = read_image_box(info.indices(), (1,), box)[0]
        return np.stack([info.palette[indices, b - 1] for b in bands])
    if info.alpha is not None:
        pixels = read_image_box(dataclasses.replace(info, alpha=None), (*bands, info.alpha), box)
        pixels, transparent = pixels[:-1], pixels[-1] == 0
        pixels[:, transparent] = 0  # the source's nodata: every band 0
        return pixels
    try:
        if info.reader == "gdal":
            with rasterio.open(info.uri) as src:
                return src.read(list(bands), window=Window(col0, row0, col1 - col0, row1 - row0))
        with tifffile.TiffFile(info.uri) as tif, tif.series[0].aszarr() as store:
            array = zarr.open_array(store, mode="r")
            index = tuple(slice(row0, row1) if a == "Y" else slice(col0, col1) if a == "X" else slice(None)
                          for a in info.axes)
            pixels = np.asarray(array[index])
    except Exception as exc:
        if not (isinstance(exc, RasterioError) or is_tiff_read_error(exc)):
            raise
        raise unreadable_window(info.uri, box, exc) from exc
    # (..., Y, ..., X, ...) -> (channel, Y, X), channels in the order the file has them
    order = [i for i, a in enumerate(info.axes) if a in CHANNEL_AXES] + [info.axes.index("Y"), info.axes.index("X")]
    others = [i for i in range(len(info.axes)) if i not in order]
    pixels = pixels.transpose(others + order).reshape(info.channels, row1 - row0, col1 - col0)
    return pixels[[b - 1 for b in bands]]


@dataclass(frozen=True)
class ImageSource(Source):
    uri: str
    info: ImageInfo
    kind = "image"
    labels_output = "labels-tiff"

    @property
    def nodata(self) -> float | None:
        """0 in every band where an alpha channel says transparent; else none."""
        return 0 if self.info.alpha is not None else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.info.shape

    @property
    def count(self) -> int:
        return self.info.channels

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def band_names(self) -> tuple[str | None, ...]:
        return self.info.channel_names

    @property
    def pixel_size(self) -> tuple[tuple[float, str], ...] | None:
        return tuple((size, "µm") for size in self.info.pixel_size_um) if self.info.pixel_size_um else None

    def read(self, bands: tuple[int, ...], box: Box) -> np.ndarray:
        return read_image_box(self.info, bands, box)

    def as_stored(self) -> ImageSource:
        """This image read as the values it stores: a palette image's indices (a label file)."""
        return dataclasses.replace(self, info=self.info.indices())

    def pixel_areas(self) -> PixelAreas:
        if self.info.pixel_size_um is None:
            return PixelAreas("px", np.ones(self.shape[0]))
        return PixelAreas("um2", np.full(self.shape[0], math.prod(self.info.pixel_size_um)))

    def notes(self) -> list[str]:
        size = self.info.pixel_size_um
        unit = f"areas in µm² ({size[1]:g} x {size[0]:g} µm pixels)" if size else "areas in pixels"
        return [f"{self.uri} has no georeferencing: segmented in pixel coordinates, {unit}"]


def open_image(uri: str, card: ModelCard) -> ImageSource:
    return ImageSource(uri, inspect_image(local_copy(uri)))


def opens_as_image(uri: str) -> bool:
    """Whether tifffile (TIFF) or GDAL (anything else) reads the file (a stack of planes too: the
    image kind then says why it cannot be segmented in 2D)."""
    try:
        inspect_image(local_copy(uri) if storage.is_remote(uri) else uri, look_at_alpha=False)
    except StackError:
        return True
    except InputError:
        return False
    return True


KIND = SourceKind("image", open_image, suffixes=SUFFIXES, recognises=opens_as_image)
