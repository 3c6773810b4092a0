"""Whole-slide images (SVS, NDPI, MRXS, generic tiled TIFF): inspect a slide, read regions of
one pyramid level at a model's resolution, find the tissue.

tiffslide (pure Python, reads through fsspec) opens what it can; openslide opens the rest
(MRXS, and other vendor formats of https://openslide.org/formats/). Only paths cross function
boundaries: a slide handle is not thread-safe, so every call opens its own (a few ms for a
TIFF-based slide).

Coordinates: a Box is (y, x) in pixels of one level. openslide and tiffslide take the
top-left corner in level-0 (x, y) and the size at the level; the conversion lives here only.
A *working image* is a level resampled by `scale` (the card's µm/px over the level's µm/px):
working pixel (i, j) is the area average of the level's pixels in the box
[i * scale, (i + 1) * scale) x [j * scale, (j + 1) * scale), and pixels outside the slide are
white (glass), as openslide draws transparent pixels over a white background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import openslide
import tifffile
import tiffslide

from pipelines.areas import PixelAreas
from pipelines.background import FACTOR
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.sources import Source, SourceKind, local_copy
from pipelines.tiling import Box

# A level whose µm/px is within 1% of the card's is used as it is: scanners round their MPP
# (0.499 vs 0.5) and resampling by 1.002 would only blur.
MPP_TOLERANCE = 0.01

# Tissue detection reads a whole level in strips; past this many pixels the slide needs a pyramid.
MAX_DETECTION_PIXELS = 1 << 26

# Saturation bounds for the Otsu threshold: Otsu always splits in two, so a slide that is all
# tissue or all glass would be cut in half; glass stays below 0.05, H&E tissue is above 0.15.
MIN_TISSUE_SATURATION = 0.05
MAX_TISSUE_SATURATION = 0.15

_MICRONS_PER_RESOLUTION_UNIT = {
    tifffile.RESUNIT.CENTIMETER: 10_000.0,
    tifffile.RESUNIT.INCH: 25_400.0,
}


@dataclass(frozen=True)
class SlideInfo:
    uri: str
    level_dimensions: tuple[tuple[int, int], ...]
    """(width, height) per level, as openslide orders them; level 0 is the full resolution."""
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    """µm per pixel at level 0, or None when the slide does not say."""
    mpp_y: float | None
    vendor: str


def _open(uri: str):
    """A tiffslide handle, else an openslide handle; InputError naming both causes when neither opens.

    tiffslide parses lazily, so its levels are read here: a file it cannot make sense of fails
    now and goes to openslide, not later in the middle of a read.
    """
    try:
        slide = tiffslide.TiffSlide(uri)
    except Exception as exc:  # tifffile raises anything from ValueError to IndexError on bad files
        tiff_error = exc
    else:
        try:
            slide.level_dimensions, slide.properties  # noqa: B018 (forces the lazy parse)
            return slide
        except Exception as exc:
            slide.close()
            tiff_error = exc
    try:
        return openslide.OpenSlide(uri)
    except (openslide.OpenSlideError, OSError) as open_error:
        raise InputError(
            uri, f"not a readable slide (tiffslide: {tiff_error!r}; openslide: {open_error})"
        ) from open_error


def _property_float(properties, *names: str) -> float | None:
    for name in names:
        value = properties.get(name)
        if value not in (None, ""):
            return float(value)
    return None


def _tiff_resolution_mpp(uri: str) -> tuple[float | None, float | None]:
    """µm/px from the TIFF 6.0 XResolution / YResolution / ResolutionUnit tags of the first page."""
    try:
        with tifffile.TiffFile(uri) as tif:
            tags = tif.pages[0].tags
            unit = tags.get("ResolutionUnit")
            x_res, y_res = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or x_res is None or y_res is None:
                return None, None
            microns = _MICRONS_PER_RESOLUTION_UNIT.get(unit.value)
            x_per_unit, y_per_unit = Fraction(*x_res.value), Fraction(*y_res.value)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return None, None
    if microns is None or x_per_unit <= 0 or y_per_unit <= 0:
        return None, None
    return microns / float(x_per_unit), microns / float(y_per_unit)


def inspect_slide(uri: str | Path) -> SlideInfo:
    """Levels and pixel size of a slide.

    MPP comes from openslide.mpp-x / tiffslide.mpp-x, else aperio.MPP (Aperio ImageDescription),
    else an OME-TIFF's PhysicalSizeX/Y, else the TIFF resolution tags when their unit is
    centimetre or inch; None when none says.
    """
    uri = str(uri)
    if "://" not in uri and not Path(uri).exists():
        raise InputError(uri, "no such file")
    with _open(uri) as slide:
        properties = slide.properties
        mpp_x = _property_float(properties, "openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP")
        mpp_y = _property_float(properties, "openslide.mpp-y", "tiffslide.mpp-y", "aperio.MPP")
        vendor = properties.get("openslide.vendor") or properties.get("tiffslide.vendor") or "unknown"
        info = SlideInfo(
            uri=uri,
            level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in slide.level_downsamples),
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            vendor=str(vendor),
        )
    if info.mpp_x is None and "://" not in uri:
        mpp_x, mpp_y = _ome_mpp(uri)
        if mpp_x is None:
            mpp_x, mpp_y = _tiff_resolution_mpp(uri)
        info = SlideInfo(info.uri, info.level_dimensions, info.level_downsamples, mpp_x, mpp_y, info.vendor)
    return info


def _ome_mpp(uri: str) -> tuple[float | None, float | None]:
    """µm/px from an OME-TIFF's PhysicalSizeX / PhysicalSizeY: the pyramidal OME-TIFFs that QuPath
    and bfconvert write say their pixel size there only (tiffslide does not read it)."""
    from pipelines.sources.image import ome_channels_and_size

    try:
        with tifffile.TiffFile(uri) as tif:
            if not tif.is_ome:
                return None, None
            _, size = ome_channels_and_size(tif)
    except Exception:  # noqa: BLE001 - unreadable or odd OME-XML: the other sources of the MPP are tried
        return None, None
    return (size[1], size[0]) if size else (None, None)


def choose_level(info: SlideInfo, target_mpp: float | None) -> tuple[int, float]:
    """(level, scale) for a model that wants target_mpp µm/px (None: the slide's own pixels).

    The level is the coarsest whose µm/px is at most target_mpp (1% tolerance), so the model never
    sees pixels upsampled from a coarser level; scale = target / level µm/px is what
    read_slide_box still has to resample by (1.0 when the level matches). A target finer than
    level 0 gives level 0 and a scale below 1. Pixels are taken as square (mpp_x).
    """
    if target_mpp is None:
        return 0, 1.0
    if info.mpp_x is None:
        raise InputError(
            info.uri,
            "has no microns-per-pixel metadata (openslide.mpp-x, aperio.MPP, OME PhysicalSizeX or TIFF resolution) "
            f"but the model card needs {target_mpp} µm/px",
        )
    level_mpps = [info.mpp_x * downsample for downsample in info.level_downsamples]
    fine_enough = [i for i, mpp in enumerate(level_mpps) if mpp <= target_mpp * (1 + MPP_TOLERANCE)]
    level = max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0
    scale = target_mpp / level_mpps[level]
    return level, 1.0 if abs(scale - 1.0) <= MPP_TOLERANCE else scale


def working_shape(info: SlideInfo, level: int, scale: float = 1.0) -> tuple[int, int]:
    """(height, width) of the working image: the level resampled by scale, a partial last pixel kept."""
    width, height = info.level_dimensions[level]
    return math.ceil(height / scale - 1e-9), math.ceil(width / scale - 1e-9)


def _read_level(slide, info: SlideInfo, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """(y1 - y0, x1 - x0, 3) uint8 RGB of one level; outside the level and transparent pixels are white."""
    width, height = info.level_dimensions[level]
    out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    if cy0 >= cy1 or cx0 >= cx1:
        return out
    downsample = info.level_downsamples[level]
    # ceil keeps int(location / downsample), which tiffslide takes as the level coordinate, from
    # falling one pixel short when downsample is not an integer.
    location = (math.ceil(cx0 * downsample), math.ceil(cy0 * downsample))
    image = slide.read_region(location, level, (cx1 - cx0, cy1 - cy0))
    with image:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    # openslide returns un-premultiplied RGBA: composite over white as its own viewers do.
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = np.rint(rgb).astype(np.uint8)
    return out


def _box_bounds(start: int, stop: int, scale: float) -> np.ndarray:
    return np.arange(start, stop + 1, dtype=np.float64) * scale


def _area_average(pixels: np.ndarray, bounds: np.ndarray, origin: int, axis: int) -> np.ndarray:
    """Mean of `pixels` along `axis` over each box [bounds[k], bounds[k + 1]) of source coordinates.

    The running sum of a piecewise-constant signal is piecewise linear, so its value at a
    fractional coordinate is exact by interpolation and each box mean is a difference of two sums.
    """
    values = np.moveaxis(pixels.astype(np.float64), axis, 0)
    cumulative = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(values, axis=0)])
    position = bounds - origin
    whole = np.clip(np.floor(position).astype(np.int64), 0, values.shape[0] - 1)
    fraction = (position - whole)[(slice(None),) + (None,) * (values.ndim - 1)]
    integral = cumulative[whole] + fraction * values[whole]
    means = (integral[1:] - integral[:-1]) / np.diff(bounds)[(slice(None),) + (None,) * (values.ndim - 1)]
    return np.moveaxis(means, 0, axis)


def _read_working(slide, info: SlideInfo, level: int, box: Box, scale: float) -> np.ndarray:
    (y0, x0), (y1, x1) = box.start, box.stop
    if scale == 1.0:
        return _read_level(slide, info, level, y0, x0, y1, x1)
    ys, xs = _box_bounds(y0, y1, scale), _box_bounds(x0, x1, scale)
    sy0, sx0 = math.floor(ys[0]), math.floor(xs[0])
    source = _read_level(slide, info, level, sy0, sx0, math.ceil(ys[-1]), math.ceil(xs[-1]))
    averaged = _area_average(_area_average(source, ys, sy0, axis=0), xs, sx0, axis=1)
    return np.clip(np.rint(averaged), 0, 255).astype(np.uint8)


def read_slide_box(uri: str, level: int, box: Box, scale: float = 1.0) -> np.ndarray:
    """(3, h, w) uint8 RGB of `box` (y, x) of the working image (level resampled by scale).

    scale 1.0 reads the level's own pixels; otherwise each pixel is the area average of its box
    of level pixels (see the module docstring). Raises InputError on a corrupt or truncated file.
    """
    uri = str(uri)
    info = inspect_slide(uri)
    if not 0 <= level < len(info.level_dimensions):
        raise InputError(uri, f"has {len(info.level_dimensions)} level(s), no level {level}")
    try:
        with _open(uri) as slide:
            pixels = _read_working(slide, info, level, box, scale)
    except InputError:
        raise
    except Exception as exc:  # decoders raise their own types (ValueError, OSError, RuntimeError...)
        where = f"level {level} pixels {box.start}-{box.stop}"
        raise InputError(uri, f"cannot read {where} ({exc})") from exc
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu (1979): the cut of a [0, 1] histogram that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[np.argmax(between) + 1])


def _detection_level(info: SlideInfo, cell: float, max_pixels: int) -> int:
    """The coarsest level with at least one pixel per cell, among the levels small enough to read whole."""
    small = [i for i, (w, h) in enumerate(info.level_dimensions) if w * h <= max_pixels]
    if not small:
        width, height = info.level_dimensions[-1]
        raise InputError(
            info.uri,
            f"has no pyramid level small enough for tissue detection (coarsest level {width}x{height}, "
            f"more than {max_pixels} pixels); write it with a pyramid",
        )
    fine_enough = [i for i in small if info.level_downsamples[i] <= cell]
    if fine_enough:
        return max(fine_enough, key=lambda i: info.level_downsamples[i])
    return min(small, key=lambda i: info.level_downsamples[i])


def tissue_mask(
    uri: str,
    factor: int,
    level: int = 0,
    scale: float = 1.0,
    max_pixels: int = MAX_DETECTION_PIXELS,
) -> np.ndarray:
    """Where the slide has tissue, one cell per factor x factor pixels of the working image.

    The working image is `level` resampled by `scale` (as read_slide_box reads it), so the
    mask has shape background.mask_shape(working_shape(...), factor) and plugs into
    background.tiles_with_data(grid, mask, factor). Each cell is the mean colour of its
    footprint, read from the coarsest pyramid level that still has a pixel per cell (at most
    max_pixels, read in strips); a cell is tissue when its HSV saturation exceeds the Otsu
    threshold (clamped to [MIN, MAX]_TISSUE_SATURATION). An opening removes isolated specks and a
    one-cell dilation keeps the tissue's edges, which averaging with glass has paled.
    """
    uri = str(uri)
    info = inspect_slide(uri)
    if not 0 <= level < len(info.level_dimensions):
        raise InputError(uri, f"has {len(info.level_dimensions)} level(s), no level {level}")
    cell = factor * scale * info.level_downsamples[level]  # in level-0 pixels
    detection = _detection_level(info, cell, max_pixels)
    cell_at_detection = cell / info.level_downsamples[detection]
    rows, cols = working_shape(info, level, scale)
    shape = (-(-rows // factor), -(-cols // factor))
    strip = max(1, int(4096 // cell_at_detection))
    saturation = np.empty(shape, dtype=np.float64)
    for row in range(0, shape[0], strip):
        stop = min(row + strip, shape[0])
        rgb = read_slide_box(uri, detection, Box((row, 0), (stop, shape[1])), cell_at_detection)
        brightest, darkest = rgb.max(axis=0).astype(np.float64), rgb.min(axis=0)
        saturation[row:stop] = np.where(brightest > 0, (brightest - darkest) / np.maximum(brightest, 1), 0.0)
    threshold = min(max(_otsu_threshold(saturation), MIN_TISSUE_SATURATION), MAX_TISSUE_SATURATION)
    from scipy import ndimage  # here: a command that reads no slide does not pay for scipy's import

    tissue = ndimage.binary_opening(saturation > threshold, structure=np.ones((3, 3), dtype=bool))
    return ndimage.binary_dilation(tissue, structure=np.ones((3, 3), dtype=bool))


SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


@dataclass(frozen=True)
class SlideSource(Source):
    """A slide at the resolution the card asks for: pyramid `level` resampled by `scale`."""

    uri: str
    info: SlideInfo
    level: int
    scale: float
    kind = "slide"
    labels_output = "ome-zarr-image"
    count = 3
    dtype = "uint8"
    nodata = None
    band_names = ("red", "green", "blue")

    @property
    def shape(self) -> tuple[int, int]:
        return working_shape(self.info, self.level, self.scale)

    @property
    def working_mpp(self) -> float | None:
        """µm per pixel of the image the model sees (level and resampling applied)."""
        if self.info.mpp_x is None:
            return None
        return self.info.mpp_x * self.info.level_downsamples[self.level] * self.scale

    @property
    def pixel_size(self) -> tuple[tuple[float, str], ...] | None:
        return ((self.working_mpp, "µm"),) * 2 if self.working_mpp else None

    @property
    def full_resolution_factor(self) -> float:
        return self.info.level_downsamples[self.level] * self.scale

    def read(self, bands: tuple[int, ...], box: Box) -> np.ndarray:
        pixels = read_slide_box(self.info.uri, self.level, box, self.scale)
        return pixels[[b - 1 for b in bands]]

    def pixel_areas(self) -> PixelAreas:
        if self.working_mpp is None:
            return super().pixel_areas()
        return PixelAreas("um2", np.full(self.shape[0], self.working_mpp**2))

    def background_mask(self) -> np.ndarray:
        """Glass has no nodata value: tissue detection marks what to segment."""
        return tissue_mask(self.info.uri, FACTOR, self.level, self.scale)


def open_slide(uri: str, card: ModelCard) -> SlideSource:
    info = inspect_slide(local_copy(uri))
    level, scale = choose_level(info, card.mpp)
    return SlideSource(uri, info, level, scale)


KIND = SourceKind("slide", open_slide, suffixes=SLIDE_SUFFIXES, wanted_by_card=lambda card: card.mpp is not None)
