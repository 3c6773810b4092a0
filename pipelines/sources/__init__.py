"""Every kind of image segpipe reads, behind one small protocol, and the registry that picks one.

    source = open_source(uri, card)          # the kind chosen, the file opened and checked
    source.shape, source.count, source.dtype, source.nodata, source.band_names
    source.read(bands, box)                  # (len(bands), *box.shape) pixels
    source.pixel_areas()                     # physical area per pixel row, and its unit
    source.background_mask()                 # where there is something to segment, if the source knows better than nodata
    source.labels_output                     # the output its labels are written as by default

A source kind is one module in this package with a `Source` subclass and one `SourceKind`
entry in KINDS. The registry chooses the kind by, in this order:
  1. a store format read in place, by its suffix (`.zarr`): nothing else can read it;
  2. the model card: a 3D card reads volumes, a card with `input.mpp` (µm per pixel) slides;
  3. the suffix (`.nii.gz` a volume, `.svs` a slide, ...);
  4. the content, where several kinds claim the suffix (a `.tif` with a CRS is a scene, without
     one a plain image) or none does (anything GDAL opens).
Nothing outside this package asks which kind a source is.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from pipelines import storage
from pipelines.areas import PixelAreas, pixel_areas
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.tiling import Box


class Source:
    """An image opened for segmentation. Subclasses are frozen dataclasses that set these
    attributes; the defaults below hold for sources without georeferencing or physical size."""

    kind: ClassVar[str]
    labels_output: ClassVar[str]
    """The name of the output (pipelines.outputs) the labels of this kind are written as by default."""
    uri: str
    shape: tuple[int, ...]
    """Spatial shape: (H, W), or (D, H, W) for volumes."""
    count: int
    """Bands (channels)."""
    dtype: str
    """The dtype `read` returns."""
    nodata: float | None
    """The value `read` puts where a band has no data (NaN for float data), or None."""
    band_names: tuple[str | None, ...] = ()
    crs_wkt: str | None = None
    transform: tuple[float, ...] | None = None
    """Affine coefficients (a, b, c, d, e, f) from pixel to map coordinates, for georeferenced sources."""
    pixel_size: tuple[tuple[float, str], ...] | None = None
    """(size, unit) per spatial axis where the source has a physical pixel size (OME-Zarr metadata)."""
    in_place_store: str | None = None
    """A Zarr array (channel, *spatial) the model reads directly: no ingest."""
    processing_level: str | None = None
    """The product level the file is tagged with (Sentinel-2 "L1C", "L2A"), when it says."""
    full_resolution_factor: float = 1.0
    """Full-resolution pixels per pixel segmented (a slide read from a coarser level: its
    downsample), for outputs in the coordinates of the full-resolution image."""
    units_note: str | None = None
    """How the file's own scale and offset meet the card's input.scale, where they had to be
    reconciled (pipelines.sources.scene.card_units)."""

    @property
    def stem(self) -> str:
        return image_stem(self.uri)

    @property
    def regions_transform(self) -> tuple[float, ...] | None:
        """From a pixel segmented to the coordinates regions (--regions) are drawn in: the map's
        for georeferenced sources; else the full-resolution image's pixels (a slide's level 0,
        where QuPath draws its annotations, as the class polygons are written back)."""
        if self.crs_wkt is not None or self.full_resolution_factor == 1.0:
            return self.transform
        factor = self.full_resolution_factor
        return (factor, 0.0, 0.0, 0.0, factor, 0.0)

    def read(self, bands: tuple[int, ...], box: Box) -> np.ndarray:
        """(len(bands), *box.shape) pixels; bands are 1-based as in the card."""
        raise NotImplementedError

    def as_stored(self) -> Source:
        """This source read as the values its file stores, for a label file: the same source,
        but for a palette image, whose indices are class ids (image.ImageSource)."""
        return self

    def pixel_areas(self) -> PixelAreas:
        """Physical area (volume) of one pixel in each row along the first axis."""
        return pixel_areas(None, (1, 0, 0, 0, -1, 0), self.shape[0])

    def holds_data(self, box: Box) -> bool:
        """False where the source stores nothing at all (a sparse file's absent tiles): ingest
        neither reads nor writes there, and it is background."""
        return True

    def notes(self) -> list[str]:
        """One-line notes on how the source is taken, for the user (not errors)."""
        notes = [self.units_note] if self.units_note else []
        if self.pixel_areas().unit == "px":
            return [f"{self.uri} gives no physical pixel size: areas are counted in pixels (px)", *notes]
        return notes

    def background_mask(self) -> np.ndarray | None:
        """A mask of background.FACTOR-sized cells holding something to segment, for sources whose
        background is not marked by nodata (slides: glass); None to take it from nodata at ingest."""
        return None

    @property
    def cheap_to_reread(self) -> bool:
        """Reading a region again costs about what reading it from a Zarr copy would (a GeoTIFF
        on a local disk), so a small image of this source can be read in place by the model and
        the outputs instead of being copied first (flows.run.ImageRun.reads_in_place)."""
        return False

    def reads_windows_alone(self, width: int) -> bool:
        """Reading a window `width` wide decodes little beyond the window: the file's internal
        blocks (tiles, or strips) are no wider than that. Then an image of several blocks can be
        read in place too, block by block, without each block decoding whole rows of the image."""
        return False


class SourcePixels:
    """The card's bands of a source as a read-only (band, *spatial) array, read whole on first
    use: what outputs read as "the image" when the model read a small source in place."""

    def __init__(self, source: Source, bands: tuple[int, ...]):
        self.source, self.bands = source, bands
        self.shape = (len(bands), *source.shape)
        self.dtype = np.dtype(source.dtype)
        self.ndim = len(self.shape)
        self._pixels: np.ndarray | None = None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.asarray(self.source.read(self.bands, Box((0,) * len(self.source.shape), self.source.shape)),
                                      dtype=self.dtype)
        return self._pixels if dtype is None else self._pixels.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self)[key]


@dataclass(frozen=True)
class SourceKind:
    name: str
    open: Callable[[str, ModelCard], Source]
    suffixes: tuple[str, ...] = ()
    """File (or folder) name endings of this kind, lower case."""
    wanted_by_card: Callable[[ModelCard], bool] = lambda card: False
    read_in_place: bool = False
    """A store format the model reads where it is; its suffix decides before the card does."""
    recognises: Callable[[str], bool] | None = None
    """Whether the file's content is of this kind, asked where the suffix does not decide."""


def choose_kind(uri: str, card: ModelCard) -> SourceKind:
    name = uri.rstrip("/").lower()
    if stac.is_stac(name):
        name = name.partition(stac.FRAGMENT)[0]
    by_suffix = [kind for kind in KINDS if name.endswith(kind.suffixes)]
    for kind in by_suffix:
        if kind.read_in_place:
            return kind
    for kind in KINDS:
        if kind.wanted_by_card(card):
            return kind
    if len(by_suffix) == 1:
        return by_suffix[0]
    candidates = by_suffix or [kind for kind in KINDS if kind.recognises]
    # None recognising it: the first kind opens it and says what is wrong.
    return next((kind for kind in candidates if kind.recognises and kind.recognises(uri)), candidates[0])


def open_source(uri: str | Path, card: ModelCard) -> Source:
    """Open `uri` as the kind the registry chooses and check it against the card's bands."""
    uri = str(uri).rstrip("/")
    if not storage.is_remote(uri) and Path(uri).is_file() and Path(uri).stat().st_size == 0:
        raise InputError(uri, "is empty (0 bytes): a copy or download that did not finish?")
    source = choose_kind(uri, card).open(uri, card)
    if len(source.shape) != card.spatial_dims:  # the model would fail on the tiles' shape mid-run
        what = {2: "a 2D image", 3: "a 3D volume"}.get(len(source.shape), f"{len(source.shape)}D")
        wanted = "volumes" if card.spatial_dims == 3 else "2D images"
        raise InputError(uri, f"is {what} ({' x '.join(map(str, source.shape[::-1]))}) but model card {card.source} "
                              f"segments {wanted} (spatial_dims: {card.spatial_dims})")
    bands = resolve_bands(source, card)
    if max(bands) > source.count or min(bands) < 1:
        raise InputError(uri, f"has {source.count} band(s) but model card {card.source} needs bands {list(bands)}")
    return source


def image_stem(uri: str) -> str:
    """The image's name without its format suffix (a STAC item's: its id)."""
    if stac.is_stac(uri):
        return stac.item_stem(uri)
    name = Path(uri.rstrip("/")).name
    for suffix in _STEM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def resolve_bands(source: Source, card: ModelCard) -> tuple[int, ...]:
    """The card's bands as 1-based indexes of this source; names match its band names (any case)."""
    names = [(name or "").lower() for name in source.band_names]
    indexes = []
    for band in card.bands:
        if isinstance(band, int):
            indexes.append(band)
        elif band.lower() in names:
            indexes.append(names.index(band.lower()) + 1)
        else:
            known = ", ".join(n for n in source.band_names if n) or "none"
            raise InputError(source.uri, f"has no band named '{band}' (its band names: {known}) that card {card.source} asks for")
    return tuple(indexes)


def local_copy(uri: str) -> str:
    """Readers that need a seekable local file get an s3:// object copied once into a cache
    folder keyed by its URI and ETag (GDAL reads scenes over /vsis3/ directly)."""
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


# Last: the kind modules import the protocol and helpers above.
from pipelines.sources import stac  # noqa: E402


def _kinds() -> tuple[SourceKind, ...]:
    from pipelines.sources import image, scene, slide, volume, zarr_image

    return (zarr_image.KIND, stac.KIND, volume.KIND, slide.KIND, scene.KIND, image.KIND)


KINDS: tuple[SourceKind, ...] = _kinds()
ARCHIVE_SUFFIXES = tuple(dict.fromkeys(s for kind in KINDS if not kind.read_in_place for s in kind.suffixes))
"""The files discovery lists in an archive folder or prefix."""
ARCHIVE_FOLDER_SUFFIXES = tuple(dict.fromkeys(s for kind in KINDS if kind.read_in_place for s in kind.suffixes))
"""The folders discovery lists there: stores read in place (Zarr)."""
_STEM_SUFFIXES = sorted({".ome.zarr", *(s for kind in KINDS for s in kind.suffixes)},
                        key=len, reverse=True)


def list_archive(archive: str | Path) -> list[str]:
    """The images of an archive: a folder, an s3:// prefix or a glob (pipelines.storage.list_images),
    or a STAC catalogue, collection or item collection (its items). STAC documents among the
    files are read for what they are (stac.items_among)."""
    if stac.is_stac(str(archive)):
        return stac.list_items(str(archive))
    listed = storage.list_images(archive, ARCHIVE_SUFFIXES, ARCHIVE_FOLDER_SUFFIXES)
    return stac.items_among([uri for uri in listed if not SENTINEL2_BAND_FILE.search(uri)])


# A Sentinel-2 product's band files (T32UQD_20240101T103421_B02.jp2, ..._B8A_20m.jp2, L1C and L2A
# naming): one band each, which a card of several bands would refuse one by one. Archives leave
# them out; nothing_found_note says how to stack them.
SENTINEL2_BAND_FILE = re.compile(r"_B(0[1-9]|1[0-2]|8A)(_[126]0m)?\.jp2$", re.IGNORECASE)


def left_out_note(archive: str | Path) -> str | None:
    """What an archive's listing left out that looks like images: hidden files (a leading dot)
    and a Sentinel-2 product's one-band files."""
    archive = str(archive)
    if stac.is_stac(archive):
        return None
    hidden = storage.list_images(archive, ARCHIVE_SUFFIXES, ARCHIVE_FOLDER_SUFFIXES, hidden=True)
    bands = [uri for uri in storage.list_images(archive, (".jp2",), ()) if SENTINEL2_BAND_FILE.search(uri)]
    parts = []
    if hidden:
        parts.append(f"{len(hidden)} hidden file(s) ({hidden[0].rsplit('/', 1)[-1]}{', ...' if len(hidden) > 1 else ''}: "
                     "a name starting with a dot, as macOS's ._ companions and copies in progress have)")
    if bands:
        parts.append(f"{len(bands)} Sentinel-2 band file(s) ({bands[0].rsplit('/', 1)[-1]}, ...: one band each; "
                     "stack a product's bands into one image, gdalbuildvrt -separate -resolution highest scene.vrt "
                     "B02.jp2 B03.jp2 ... in the card's band order, or give its STAC item)")
    return f"{archive}: left out {' and '.join(parts)}" if parts else None


def nothing_found_note(archive: str | Path) -> str:
    """Why an archive gave no image, for a run that found none: the folder is listed in itself
    only (not recursively), by suffix; a pattern matched nothing; a STAC document lists no item."""
    archive = str(archive)
    if stac.is_stac(archive):
        return f"{archive} lists no STAC item"
    if storage.has_glob_characters(archive) and not storage.is_folder(archive):
        return f"the pattern {archive} matches no file"
    readable = ", ".join((*ARCHIVE_SUFFIXES, *ARCHIVE_FOLDER_SUFFIXES))
    left_out = left_out_note(archive)
    if left_out:
        return f"{left_out}, and holds no other image"
    folders = storage.subfolders(archive)
    if not folders:
        return f"{archive} holds no image segpipe reads (it lists {readable} files in the folder)"
    shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
    return (f"{archive} holds no image segpipe reads in the folder itself ({readable}), only {len(folders)} "
            f"subfolder(s) ({shown}), which are not looked into: name their images with a pattern, such as "
            f"'{storage.join(archive, '**', '*.tif')}'")


# A Zarr store's metadata document: Zarr v3's, or v2's (an OME-Zarr 0.4 image keeps its
# multiscales in .zattrs; a plain array has .zarray; a group always has .zgroup).
ZARR_METADATA_DOCUMENTS = ("zarr.json", ".zattrs", ".zarray", ".zgroup")


def zarr_metadata_document(uri: str) -> str:
    for name in ZARR_METADATA_DOCUMENTS:
        document = storage.join(uri, name)
        if storage.exists(document):
            return document
    if not storage.exists(uri):
        raise InputError(uri, "no such file or Zarr store")
    raise InputError(uri, "is not a Zarr store: it has no zarr.json (Zarr v3), .zarray or .zgroup (Zarr v2)")


def source_identity(uri: str) -> dict:
    """What makes an image the same image tomorrow, for its manifest key: its URI, size and
    modification time or ETag (a Zarr store's by its root metadata document; a STAC item's by
    its id and assets)."""
    if stac.is_stac(uri):
        return stac.stac_identity(uri)
    uri = uri.rstrip("/")
    size, version = storage.stat(zarr_metadata_document(uri) if uri.endswith(".zarr") else uri)
    return {"uri": uri if storage.is_remote(uri) else str(Path(uri).resolve()), "size": size, "version": version}
