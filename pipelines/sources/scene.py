"""Scenes: GeoTIFF / COG and anything else GDAL reads with a CRS, through rasterio.

Only URIs cross function boundaries: a rasterio handle is not thread-safe, so every reader
thread opens its own.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipelines.areas import PixelAreas, pixel_areas
from pipelines.errors import InputError, unreadable_window
from pipelines.model_card import ModelCard, processing_level
from pipelines.sources import Source, SourceKind
from pipelines.storage import exists, is_remote, rasterio_env
from pipelines.tiling import Box

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
    block_shape: tuple[int, int] = (1, 1)
    """(rows, cols) of the file's internal blocks (tiles or strips)."""
    processing_level: str | None = None
    """From a PROCESSING_LEVEL (or processing:level) metadata tag, e.g. "L1C"."""
    driver: str = ""
    """GDAL's driver of the file ("GTiff", "JP2OpenJPEG", ...)."""

    @functools.cached_property
    def absent_blocks(self) -> frozenset[tuple[int, int]]:
        """(block row, block col) of the blocks a sparse GeoTIFF does not store: no data there.
        Looked up when first needed, not when the file is opened: a header claiming 10^12 pixels
        is refused (--max-pixels) before its millions of blocks are walked."""
        with rasterio_env(self.uri), rasterio.open(self.uri) as src:
            return absent_blocks(src)

    @property
    def scaled(self) -> bool:
        return any(s != 1 for s in self.scales) or any(o != 0 for o in self.offsets)

    @property
    def pixel_dtype(self) -> str:
        """What read_region returns: float32 once scale/offset are applied."""
        return "float32" if self.scaled else self.dtype

    @property
    def pixel_nodata(self) -> float | None:
        """The value read_window puts in masked or nodata pixels. A sparse file without a nodata
        value has 0 as its nodata: GDAL reads the blocks it does not store as 0."""
        if self.scaled:
            return float("nan") if (self.nodata is not None or self.has_mask or self.absent_blocks) else None
        if (self.has_mask or self.absent_blocks) and self.nodata is None:
            return 0
        return self.nodata

    def holds_data(self, box: Box) -> bool:
        """False when every block of the file under `box` is absent (sparse)."""
        if not self.absent_blocks:
            return True
        (row0, col0), (row1, col1) = box.start, box.stop
        rows, cols = self.block_shape
        return any((r, c) not in self.absent_blocks
                   for r in range(row0 // rows, -(-row1 // rows)) for c in range(col0 // cols, -(-col1 // cols)))


# Files of up to this many blocks have their absent blocks looked up while they are open anyway.
FEW_BLOCKS = 1024


def inspect_raster(uri: str | Path) -> RasterInfo:
    uri = str(uri)
    if not exists(uri):
        raise InputError(uri, "no such file")
    try:
        with rasterio_env(uri), rasterio.open(uri) as src:
            if src.crs is None:
                raise InputError(uri, "has no coordinate reference system: a scene must be georeferenced")
            info = RasterInfo(
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
                block_shape=tuple(src.block_shapes[0]),
                processing_level=tagged_processing_level(src.tags()),
                driver=src.driver,
            )
            rows, cols = info.block_shape
            if -(-info.height // rows) * -(-info.width // cols) <= FEW_BLOCKS:  # cheap now, an open later
                info.__dict__["absent_blocks"] = absent_blocks(src)
            return info
    except RasterioError as exc:
        if not is_remote(uri) and Path(uri).is_dir():  # GDAL reads some folders (Arc/Info grids): it did not
            raise InputError(uri, "is a folder, neither an image nor a Zarr store: " + folder_hint(Path(uri))) from exc
        raise InputError(uri, f"not a readable raster ({exc})") from exc


def folder_hint(folder: Path) -> str:
    """What to do with a folder given as one image: the formats that are folders segpipe does not
    read say how to convert them."""
    if folder.suffix.upper() == ".SAFE":
        return ("a Sentinel-2 .SAFE product: stack its band files into one image (gdalbuildvrt -separate -resolution highest "
                "scene.vrt B02.jp2 B03.jp2 ..., in the card's band order) or give its STAC item")
    names = [p.name.lower() for p in itertools.islice(folder.iterdir(), 1000)]
    if any(name.endswith(".dcm") for name in names) or "dicomdir" in names:
        return "a DICOM series: convert it to NIfTI first (dcm2niix -z y -o OUT FOLDER), then segment the .nii.gz"
    return "`segpipe run` segments the images in a folder"


def tagged_processing_level(tags: dict) -> str | None:
    """The value of a PROCESSING_LEVEL / processing:level tag (any spelling), as "L1C", "L2A"."""
    for key, value in tags.items():
        if re.sub(r"[^a-z]", "", key.lower()) == "processinglevel" and value:
            return processing_level(value)
    return None


def absent_blocks(src) -> frozenset[tuple[int, int]]:
    """The blocks a sparse GeoTIFF does not store in any band (GDAL's SPARSE_OK files: a header
    may describe 100000 x 100000 pixels of which a few tiles exist). Other formats: none."""
    if src.driver != "GTiff":
        return frozenset()
    rows, cols = src.block_shapes[0]
    bands = [1] if src.interleaving and src.interleaving.name == "PIXEL" else list(range(1, src.count + 1))
    return frozenset(
        (r, c) for r in range(-(-src.height // rows)) for c in range(-(-src.width // cols))
        if not any(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=b) for b in bands)
    )


def read_window(info: RasterInfo, bands: tuple[int, ...], box: Box) -> np.ndarray:
    """Read bands x box (2D) of the scene: the file's scale and offset applied, masked and
    nodata pixels set to info.pixel_nodata. Raises InputError on a corrupt or truncated file.
    A whole small local scene read again in this process comes from WHOLE_READS."""
    whole = box.start == (0, 0) and box.stop == (info.height, info.width)
    if not whole or is_remote(info.uri):
        return decode_window(info, bands, box)
    try:
        stat = os.stat(info.uri)
    except OSError:  # gone or unreadable: decoding says so in its words
        return decode_window(info, bands, box)
    key = (info.uri, tuple(bands), stat.st_size, stat.st_mtime_ns, info.pixel_nodata, info.scales, info.offsets)
    pixels = WHOLE_READS.get(key)
    if pixels is None:
        pixels = decode_window(info, bands, box)
        WHOLE_READS.put(key, pixels)
    return pixels.copy()  # the kept array stays as read, whatever a caller does with its copy


class RecentReads:
    """The last whole reads of small local scenes, up to `limit_bytes` together (the least
    recently used dropped first; a read of more than a quarter of that is not kept).

    A small image read in place is read whole by three stages of a run: ingest (its mask), the
    model (its context) and finalize (the preview). Decoding a 512² RGB GeoTIFF takes 4 ms, a
    tenth of what a night spends on such an image beside the model; kept, it is decoded once.
    The key holds the file's size and modification time: a file replaced meanwhile is read anew."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.kept: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            pixels = self.kept.get(key)
            if pixels is not None:
                self.kept.move_to_end(key)
            return pixels

    def put(self, key: tuple, pixels: np.ndarray) -> None:
        if pixels.nbytes > self.limit_bytes // 4:
            return
        with self.lock:
            if key in self.kept:
                return
            self.kept[key] = pixels
            self.bytes += pixels.nbytes
            while self.bytes > self.limit_bytes:
                self.bytes -= self.kept.popitem(last=False)[1].nbytes


# Two batches of small images in flight (flows.archive_flow: 4096² pixels each) fit: 100 MB of
# 8-bit RGB.
WHOLE_READS = RecentReads(128 << 20)


def decode_window(info: RasterInfo, bands: tuple[int, ...], box: Box) -> np.ndarray:
    """read_window from the file itself."""
    (row0, col0), (row1, col1) = box.start, box.stop
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
        raise unreadable_window(info.uri, box, exc) from exc
    if info.scaled:
        shape = (-1, 1, 1)
        scales = np.array([info.scales[b - 1] for b in bands], dtype=np.float32).reshape(shape)
        offsets = np.array([info.offsets[b - 1] for b in bands], dtype=np.float32).reshape(shape)
        pixels = pixels.astype(np.float32) * scales + offsets
    if invalid is not None:
        pixels[:, invalid] = info.pixel_nodata
    return pixels


@dataclass(frozen=True)
class SceneSource(Source):
    info: RasterInfo
    units_note: str | None = None
    kind = "scene"
    labels_output = "labels-cog"

    @property
    def uri(self) -> str:
        return self.info.uri

    @property
    def shape(self) -> tuple[int, int]:
        return self.info.height, self.info.width

    @property
    def count(self) -> int:
        return self.info.count

    @property
    def dtype(self) -> str:
        return self.info.pixel_dtype

    @property
    def nodata(self) -> float | None:
        return self.info.pixel_nodata

    @property
    def band_names(self) -> tuple[str | None, ...]:
        return self.info.band_names

    @property
    def crs_wkt(self) -> str | None:
        return self.info.crs_wkt

    @property
    def transform(self) -> tuple[float, ...]:
        return self.info.transform

    @property
    def processing_level(self) -> str | None:
        return self.info.processing_level

    def read(self, bands: tuple[int, ...], box: Box) -> np.ndarray:
        return read_window(self.info, bands, box)

    @property
    def cheap_to_reread(self) -> bool:
        # A GeoTIFF on a local disk; not JPEG 2000 (each read decodes again) nor object storage
        # (each read is requests), nor a sparse file (its absent blocks read as the store's fill).
        return self.info.driver == "GTiff" and not is_remote(self.uri) and not self.info.absent_blocks

    def reads_windows_alone(self, width: int) -> bool:
        return self.info.block_shape[1] <= width

    def holds_data(self, box: Box) -> bool:
        return self.info.holds_data(box)

    def pixel_areas(self) -> PixelAreas:
        """m²: the pixel area for a projected CRS, each row's geodesic area for a geographic one."""
        return pixel_areas(self.info.crs_wkt, self.info.transform, self.info.height)


def open_scene(uri: str, card: ModelCard) -> SceneSource:
    from pipelines.sources import resolve_bands

    info = inspect_raster(uri)
    bands = resolve_bands(SceneSource(info), card) if info.scaled else ()
    info, units = in_card_units(info, bands, card)
    return SceneSource(info, units_note=units)


def in_card_units(info: RasterInfo, bands: tuple[int, ...], card: ModelCard) -> tuple[RasterInfo, str | None]:
    """The scene read in the units card_units chooses for the card's bands, and its note."""
    if not bands:
        return info, None
    scales = [info.scales[band - 1] if info.scales else 1.0 for band in bands]
    offsets = [info.offsets[band - 1] if info.offsets else 0.0 for band in bands]
    applied, note = card_units(info.uri, scales, offsets, card)
    if note is None:
        return info, None
    new_scales, new_offsets = list(info.scales), list(info.offsets)
    for band, (scale, offset) in zip(bands, applied):
        new_scales[band - 1], new_offsets[band - 1] = scale, offset
    return dataclasses.replace(info, scales=tuple(new_scales), offsets=tuple(new_offsets)), note


def card_units(uri: str, scales: list[float], offsets: list[float], card: ModelCard
               ) -> tuple[list[tuple[float, float]], str | None]:
    """The (scale, offset) to apply to the raw values of each of the card's bands, given the
    file's own (GDAL's band scale and offset: a GeoTIFF's tags, a netCDF's scale_factor and
    add_offset) and the card's input.scale; and a note when they were changed.

    A file declaring scale 0.0001 and offset -0.1 holds reflectance as DN x 0.0001 - 0.1 (the
    Sentinel-2 offset of processing baseline 04.00, as EOPF's products and GDAL carry it), and a
    card of `input.scale: 0.0001` turns raw DN into reflectance too: applying both gave the
    model values 10,000 times too small. When the card's scale is the
    file's, the bands are read in the card's units (raw values plus the offset over the scale:
    DN - 1000), so that the card's scale gives the file's reflectance, offset included. A card of
    scale 1 takes the file's values as they are (scale and offset applied), and so does any card
    for a file of scale 1 (an offset in raw units). Any other pair is refused: nothing says which
    of the two scales the model was trained on."""
    declared = list(zip(scales, offsets))
    if all(scale == 1 for scale in scales) or card.scale == 1:  # an offset in raw units, or physical values wanted
        return declared, None
    described = ", ".join(sorted({f"scale {scale:g} and offset {offset:g}" for scale, offset in declared}))
    if not all(math.isclose(scale, card.scale, rel_tol=1e-6) for scale in scales):
        raise InputError(uri, f"declares {described} for the bands model card {card.source} reads (its values are "
                              f"raw x scale + offset), but the card scales raw values by {card.scale:g} itself: "
                              f"both applied, the model would see values of another range than it was trained "
                              f"on. Use a card of input.scale 1 for the file's values, or of input.scale equal "
                              f"to the file's scale")
    shifts = [offset / scale for scale, offset in declared]
    taken = "read as " + ("; ".join(f"raw value {'-' if shift < 0 else '+'} {abs(shift):g}"
                                    for shift in sorted({shift for shift in shifts if shift})) or "raw values")
    note = (f"{uri} declares {described} for the card's bands: {taken} so that the card's input.scale "
            f"{card.scale:g} gives the file's values, offset included")
    return [(1.0, shift) for shift in shifts], note


def georeferenced(uri: str) -> bool:
    """Whether GDAL opens the file and finds a coordinate reference system in it."""
    try:
        with rasterio_env(uri), rasterio.open(uri) as src:
            return src.crs is not None
    except RasterioError:
        return False


# .vrt: GDAL's virtual rasters, the usual way to stack bands kept in files of their own (Sentinel-2's
# JPEG 2000 bands: gdalbuildvrt -separate); .jp2: JPEG 2000 orthophotos. Both listed in archives
# with the GeoTIFFs (a Sentinel-2 product's one-band .jp2 files are not: sources.SENTINEL2_BAND_FILE).
KIND = SourceKind("scene", open_scene, suffixes=(".tif", ".tiff", ".vrt", ".jp2"), recognises=georeferenced)
