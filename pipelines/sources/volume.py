"""3D volumes: inspect a NIfTI file or a multi-page TIFF stack and read regions of it (labels
go back as NIfTI on the source grid: pipelines.outputs.nifti_labels).

Axis convention. segpipe arrays are (D, H, W) (channels first when there are any: (C, D, H, W)),
with W varying fastest in memory. NIfTI-1/2 (https://nifti.nimh.nih.gov/nifti-1/documentation/
nifti1fields) stores voxels with the first index i varying fastest, then j, then k, and
nibabel presents them as an (i, j, k) array. segpipe maps

    D = k,  H = j,  W = i

so a (D, H, W) C-order array has exactly the byte order of the NIfTI data block: a slab of D
planes is one contiguous stretch of the file. This is also the (z, y, x) order of SimpleITK's
GetArrayFromImage and of a TIFF stack (pages = D, rows = H, columns = W).

The affine in VolumeInfo maps a voxel index (d, h, w, 1) to world millimetres. For NIfTI it is
nibabel's best affine (sform when sform_code > 0, else qform, else the pixdim fallback) with
its first three columns reordered (k, j, i): world = A_nifti @ (w, h, d, 1) = A @ (d, h, w, 1).
World space is NIfTI's RAS+; lengths are converted to mm from the header's xyzt_units (unknown
units are taken as mm, as NIfTI readers do). A TIFF stack has no orientation or origin: its
affine is diag(spacing D, H, W) with 1 on any axis whose spacing is unknown.

Only local files: nibabel's array proxy and tifffile's page reader need seekable files. Every
call opens and closes its own handles, so readers on different threads never share one.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import tifffile
import zarr
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from pipelines.areas import PixelAreas
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.sources import Source, SourceKind, image_stem, local_copy
from pipelines.sources.tiff_errors import is_tiff_read_error
from pipelines.tiling import Box

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")

# Millimetres per NIfTI xyzt spatial unit (nibabel's names); "unknown" is read as mm.
NIFTI_UNIT_MM = {"unknown": 1.0, "mm": 1.0, "meter": 1000.0, "micron": 1e-3}

# Millimetres per ImageJ 'unit' (ImageJ writes µ escaped as \u00B5 in its description).
IMAGEJ_UNIT_MM = {
    "mm": 1.0,
    "millimeter": 1.0,
    "cm": 10.0,
    "m": 1000.0,
    "meter": 1000.0,
    "micron": 1e-3,
    "um": 1e-3,
    "\u00b5m": 1e-3,
    "\u03bcm": 1e-3,
    "\\u00b5m": 1e-3,
    "nm": 1e-6,
    "inch": 25.4,
}

# Millimetres per TIFF ResolutionUnit (TIFF 6.0, tag 296): 2 = inch, 3 = centimetre; 1 = none.
TIFF_RESOLUTION_UNIT_MM = {2: 25.4, 3: 10.0}

# Axes tifffile may give the page sequence of a stack, in order of preference: Z (ImageJ and
# OME slices), Q (tifffile's own shaped series), I (a plain sequence of pages).
TIFF_DEPTH_AXES = ("Z", "Q", "I")
TIFF_CHANNEL_AXES = ("C", "S")

NIFTI_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


@dataclass(frozen=True)
class VolumeInfo:
    uri: str
    shape: tuple[int, int, int]
    """(D, H, W); for NIfTI (k, j, i) of nibabel's (i, j, k) shape."""
    channels: int
    dtype: str
    """The dtype read_volume_box returns (NIfTI scl_slope/scl_inter applied)."""
    affine: list[list[float]]
    """4x4, voxel index (d, h, w, 1) -> world mm (see the module docstring)."""
    spacing: tuple[float, float, float] | None
    """mm per voxel along D, H, W; None when any of them is unknown."""
    format: Literal["nifti", "tiff"]

    @property
    def stem(self) -> str:
        return image_stem(self.uri)


def volume_format(path: str | Path) -> Literal["nifti", "tiff"]:
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    raise InputError(path, "unsupported volume format (expected .nii, .nii.gz, .tif or .tiff)")


def inspect_volume(path: str | Path) -> VolumeInfo:
    """Shape, channels, dtype, affine and spacing of a volume; InputError for a file that is
    missing, of an unsupported type, corrupt or truncated."""
    fmt = volume_format(path)
    if not Path(path).is_file():
        raise InputError(path, "no such file")
    return _inspect_nifti(str(path)) if fmt == "nifti" else _inspect_tiff(str(path))


def read_volume_box(path: str | Path, box: Box) -> np.ndarray:
    """The voxels of box (D, H, W) as a (C, d, h, w) array, without loading the whole volume.

    NIfTI: nibabel's array proxy reads only the bytes of the box. A .nii.gz has no random
    access (unless the optional indexed_gzip package is installed), so the stream is decompressed
    from its start up to the box; memory stays bounded by the box either way.
    TIFF: only the pages (and strips or tiles) that intersect the box are read.
    InputError for an unreadable file; IndexError for a box outside the volume (a caller bug).
    """
    fmt = volume_format(path)
    path = str(path)
    if fmt == "nifti":
        return _read_nifti_box(path, box)
    return _read_tiff_box(path, box)


def voxel_volume(info: VolumeInfo) -> tuple[float, str]:
    """Volume of one voxel and its unit: mm³ from the spacing, else one voxel (the source's note
    says so)."""
    if info.spacing is not None:
        return float(math.prod(info.spacing)), "mm3"
    return 1.0, "px"


# NIfTI ---------------------------------------------------------------------------------------


def swap_voxel_axes(affine: np.ndarray) -> np.ndarray:
    """Reorder the voxel-axis columns (i, j, k) <-> (k, j, i); the translation column stays.
    The permutation is its own inverse, so this converts in both directions."""
    return affine[:, [2, 1, 0, 3]]


def _nifti_extra_index(shape: tuple[int, ...], path: str) -> tuple:
    """Index of the non-spatial NIfTI axes that selects the channels.

    A 4th axis (time, echoes, components) is read as channels; a 5D image with a singleton 4th
    axis holds vector components on the 5th (NIfTI's intent-vector layout).
    """
    if len(shape) == 3:
        return ()
    if len(shape) == 4:
        return (slice(None),)
    if len(shape) == 5 and shape[3] == 1:
        return (0, slice(None))
    raise InputError(path, f"NIfTI shape {shape} is not a 3D volume with optional channels")


def _load_nifti(path: str) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except NIFTI_READ_ERRORS as exc:
        raise InputError(path, f"not a readable NIfTI file ({exc})") from exc
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise InputError(path, f"is a {type(image).__name__}, not a NIfTI image")
    return image


def _inspect_nifti(path: str) -> VolumeInfo:
    image = _load_nifti(path)
    header = image.header
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3:
        raise InputError(path, f"NIfTI shape {shape} is not a 3D volume")
    extra = _nifti_extra_index(shape, path)
    _check_nifti_complete(path, header, shape)

    unit_mm = NIFTI_UNIT_MM.get(header.get_xyzt_units()[0], 1.0)
    zooms = header.get_zooms()[:3]
    world_mm = np.diag([unit_mm, unit_mm, unit_mm, 1.0]) @ image.affine
    try:  # one voxel tells the dtype after scl_slope/scl_inter
        dtype = np.asarray(image.dataobj[(0, 0, 0, *extra)]).dtype
    except NIFTI_READ_ERRORS as exc:
        raise InputError(path, f"cannot read voxel data ({exc})") from exc
    return VolumeInfo(
        uri=path,
        shape=(shape[2], shape[1], shape[0]),
        channels=1 if not extra else shape[-1],
        dtype=str(dtype),
        affine=swap_voxel_axes(world_mm).tolist(),
        spacing=tuple(float(z) * unit_mm for z in reversed(zooms)) if all(zooms) else None,
        format="nifti",
    )


def _check_nifti_complete(path: str, header, shape: tuple[int, ...]) -> None:
    """Truncation check without reading the data: the file (or the gzip stream) must hold the
    header's vox_offset plus every voxel.

    For gzip (RFC 1952) the last 4 bytes (ISIZE) are the uncompressed size mod 2^32; when they
    match, the stream is complete. When they do not (a truncated file, or a stream of several
    gzip members) the stream is decompressed in 1 MiB pieces to count its bytes.
    """
    expected = int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    if not path.lower().endswith(".gz"):
        size = os.path.getsize(path)
        if size < expected:
            raise InputError(path, f"truncated: {size} bytes, the header describes {expected}")
        return
    with open(path, "rb") as raw:
        raw.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", raw.read(4))
    if isize == expected % 2**32:
        return
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while piece := stream.read(2**20):
                size += len(piece)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(path, f"truncated or corrupt gzip stream ({exc})") from exc
    if size < expected:
        raise InputError(path, f"truncated: {size} bytes uncompressed, the header describes {expected}")


def _check_box(box: Box, shape: tuple[int, ...], path: str) -> None:
    inside = all(0 <= a < b <= n for a, b, n in zip(box.start, box.stop, shape))
    if len(box.start) != 3 or not inside:
        raise IndexError(f"{path}: box {box} is not a non-empty box inside the volume {shape}")


def _read_nifti_box(path: str, box: Box) -> np.ndarray:
    image = _load_nifti(path)
    shape = tuple(int(n) for n in image.shape)
    extra = _nifti_extra_index(shape, path)
    _check_box(box, (shape[2], shape[1], shape[0]), path)
    d, h, w = box.slices()
    try:
        voxels = np.asarray(image.dataobj[(w, h, d, *extra)])
    except NIFTI_READ_ERRORS as exc:
        raise InputError(path, f"cannot read voxels {box.start}-{box.stop} ({exc})") from exc
    if voxels.ndim == 3:
        voxels = voxels[..., np.newaxis]
    return np.ascontiguousarray(voxels.transpose(3, 2, 1, 0))  # (w, h, d, c) -> (c, d, h, w)


# TIFF ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TiffLayout:
    """Where D, H, W and the channels are among the axes of tifffile's series."""

    shape: tuple[int, int, int]
    channels: int
    order: tuple[int, ...]
    """Series axes in (C..., D, H, W) order, for numpy transpose; singleton axes come first."""
    depth_axis: int | None


def _tiff_layout(series, path: str) -> _TiffLayout:
    axes, shape = series.axes, series.shape
    if "Y" not in axes or "X" not in axes:
        raise InputError(path, f"TIFF series axes {axes!r} have no Y and X")
    depth = next((axes.index(a) for a in TIFF_DEPTH_AXES if a in axes and shape[axes.index(a)] > 1), None)
    if depth is None:
        depth = next((axes.index(a) for a in TIFF_DEPTH_AXES if a in axes), None)
    channel_axes = [i for i, a in enumerate(axes) if a in TIFF_CHANNEL_AXES]
    spatial = [i for i in (depth, axes.index("Y"), axes.index("X")) if i is not None]
    others = [i for i in range(len(axes)) if i not in spatial and i not in channel_axes]
    if any(shape[i] > 1 for i in others):
        raise InputError(path, f"TIFF series axes {axes!r} {shape}: only one stack axis is supported")
    d = shape[depth] if depth is not None else 1
    return _TiffLayout(
        shape=(d, shape[axes.index("Y")], shape[axes.index("X")]),
        channels=math.prod(shape[i] for i in channel_axes),
        order=tuple(others + channel_axes + spatial),
        depth_axis=depth,
    )


def _tiff_spacing(tif: tifffile.TiffFile) -> tuple[float | None, float | None, float | None]:
    """mm per voxel along D, H, W, None where unknown.

    ImageJ: the 'unit' and 'spacing' (slice distance) of the ImageJ description, X/YResolution
    in pixels per that unit. Other TIFFs: X/YResolution with ResolutionUnit inch or centimetre;
    TIFF itself has no slice distance.
    """
    page = tif.pages.first
    metadata = tif.imagej_metadata or {}
    if metadata:
        unit_mm = IMAGEJ_UNIT_MM.get(str(metadata.get("unit", "")).lower())
    else:
        unit_mm = TIFF_RESOLUTION_UNIT_MM.get(int(page.tags.valueof("ResolutionUnit", 2)))
    if unit_mm is None:
        return None, None, None

    def per_pixel(tag: str) -> float | None:
        numerator, denominator = page.tags.valueof(tag, (0, 1))
        return unit_mm * denominator / numerator if numerator and denominator else None

    slice_distance = metadata.get("spacing")
    return (
        unit_mm * float(slice_distance) if slice_distance else None,
        per_pixel("YResolution"),
        per_pixel("XResolution"),
    )


class _TifffileProblems(logging.Handler):
    """Collects what tifffile logs, on this thread only, about a broken file.

    tifffile does not raise for a broken chain of pages (a truncated stack) or for inconsistent
    ImageJ metadata: it logs the problem and carries on with fewer pages.
    """

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.thread == self.thread and ("invalid" in message or "corrupted" in message):
            self.messages.append(message)


@contextlib.contextmanager
def _open_tiff(path: str):
    """tifffile.TiffFile that raises InputError for the problems tifffile only logs."""
    problems = _TifffileProblems()
    logging.getLogger("tifffile").addHandler(problems)
    try:
        with tifffile.TiffFile(path) as tif:
            len(tif.pages)  # walks the whole chain of pages
            tif.series  # tifffile checks the ImageJ or shaped metadata against the pages
            if problems.messages:
                raise InputError(path, f"corrupt or truncated TIFF ({problems.messages[0]})")
            yield tif
    finally:
        logging.getLogger("tifffile").removeHandler(problems)


def _inspect_tiff(path: str) -> VolumeInfo:
    try:
        with _open_tiff(path) as tif:
            series = tif.series[0]
            layout = _tiff_layout(series, path)
            spacing = _tiff_spacing(tif)
            dtype = str(series.dtype)
            _check_tiff_complete(tif, series, path)
    except Exception as exc:
        if isinstance(exc, InputError) or not is_tiff_read_error(exc):
            raise
        raise InputError(path, f"not a readable TIFF stack ({exc})") from exc
    return VolumeInfo(
        uri=path,
        shape=layout.shape,
        channels=layout.channels,
        dtype=dtype,
        affine=np.diag([s if s else 1.0 for s in spacing] + [1.0]).tolist(),
        spacing=spacing if all(spacing) else None,
        format="tiff",
    )


def _check_tiff_complete(tif: tifffile.TiffFile, series, path: str) -> None:
    """Every strip or tile of the stack's pages must lie inside the file (a truncated file loses
    the last ones). ImageJ stacks keep only the first page's offsets: their data is contiguous,
    so the end of the data block is checked instead."""
    size = tif.filehandle.size
    if series.dataoffset is not None:
        end = series.dataoffset + series.size * series.dtype.itemsize
        if end > size:
            raise InputError(path, f"truncated: {size} bytes, the stack's data ends at byte {end}")
        return
    for page in series.pages:
        if page is None:
            continue
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise InputError(path, f"truncated: {size} bytes, page {page.index} ends at byte {max(ends)}")


def _read_tiff_box(path: str, box: Box) -> np.ndarray:
    try:
        with _open_tiff(path) as tif:
            series = tif.series[0]
            layout = _tiff_layout(series, path)
            _check_box(box, layout.shape, path)
            d, h, w = box.slices()
            index = [slice(None)] * len(series.axes)
            index[series.axes.index("Y")], index[series.axes.index("X")] = h, w
            if layout.depth_axis is not None:
                index[layout.depth_axis] = d
            # tifffile's Zarr view decodes only the pages, strips or tiles the index touches.
            with series.aszarr() as store:
                voxels = zarr.open_array(store, mode="r")[tuple(index)]
    except Exception as exc:
        if isinstance(exc, InputError) or not is_tiff_read_error(exc):
            raise
        raise InputError(path, f"cannot read voxels {box.start}-{box.stop} ({exc})") from exc
    voxels = voxels.transpose(layout.order)
    return np.ascontiguousarray(voxels.reshape(layout.channels, *box.shape))


@dataclass(frozen=True)
class VolumeSource(Source):
    uri: str
    info: VolumeInfo
    """Of the local file (a copy, for an s3:// volume)."""
    kind = "volume"
    labels_output = "nifti-labels"
    nodata = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape

    @property
    def count(self) -> int:
        return self.info.channels

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def affine(self) -> list[list[float]]:
        """4x4, voxel index (d, h, w, 1) -> world mm."""
        return self.info.affine

    def read(self, bands: tuple[int, ...], box: Box) -> np.ndarray:
        return read_volume_box(self.info.uri, box)[[b - 1 for b in bands]]

    def pixel_areas(self) -> PixelAreas:
        """mm³ per voxel, the same for every slice."""
        value, unit = voxel_volume(self.info)
        return PixelAreas(unit, np.full(self.shape[0], value))


def open_volume(uri: str, card: ModelCard) -> VolumeSource:
    return VolumeSource(uri, inspect_volume(local_copy(uri)))


KIND = SourceKind("volume", open_volume, suffixes=NIFTI_SUFFIXES, wanted_by_card=lambda card: card.spatial_dims == 3)
