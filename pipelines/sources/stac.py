"""STAC: satellite archives catalogued as SpatioTemporal Asset Catalog JSON (https://stacspec.org).

An *item* is one image whose bands are separate assets (one COG per band, often at different
resolutions). The card's bands are found among the item's assets by name: the card's band
names (input.band_names, or its bands when it names them) against the asset keys and the
names and common names of the assets' `eo:bands` / `bands` (any case). Each asset is read in
place, window by window, through GDAL (a COG on s3:// or https is not copied); assets on
another grid than the first band's are resampled onto it (nearest neighbour), as the demo's
20 m SWIR bands are onto its 10 m grid.

A catalogue, a collection (their `item` and `child` links, followed recursively) or an item
collection (a FeatureCollection, e.g. a saved search) lists its items: `segpipe run
catalog.json` segments each. An item inside an item collection has no file of its own: it is
addressed as `<collection file>#<item id>`. An image is keyed by its item id and the hrefs,
sizes and ETags or modification times of the assets it reads, so a re-processed asset is
segmented again. An item whose assets are missing or unreadable fails alone, in one line.

Plain JSON: no STAC library is needed to read it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from pipelines import storage
from pipelines.areas import PixelAreas, pixel_areas
from pipelines.errors import InputError
from pipelines.model_card import ModelCard, processing_level
from pipelines.sources import Source, SourceKind
from pipelines.sources.scene import GDAL_OPTIONS, card_units
from pipelines.storage import rasterio_env
from pipelines.tiling import Box

SUFFIXES = (".json",)
FRAGMENT = "#"
MAX_DEPTH = 16


def read_json(uri: str) -> dict:
    try:
        document = json.loads(storage.read_bytes(uri))
    except FileNotFoundError as exc:
        raise InputError(uri, "no such file") from exc
    except (OSError, ValueError) as exc:
        raise InputError(uri, f"not readable JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise InputError(uri, "not a STAC document (a JSON object)")
    return document


def resolve(href: str, base: str) -> str:
    """An href relative to the document at `base`, as a local path or a URI."""
    if urlsplit(href).scheme and len(urlsplit(href).scheme) > 1:
        return href
    if storage.is_remote(base):
        return urljoin(base, href)
    if Path(href).is_absolute():
        return href
    return str(Path(posixpath.normpath(str(Path(base).parent / href))))


def stac_kind(document: dict) -> str:
    if document.get("type") == "Feature":
        return "item"
    if document.get("type") == "FeatureCollection":
        return "item-collection"
    if document.get("type") in ("Catalog", "Collection"):
        return document["type"].lower()
    raise InputError(document.get("id", "?"), "is no STAC item, collection, catalogue or item collection")


def list_items(uri: str, depth: int = 0) -> list[str]:
    """The items a STAC document holds, as URIs (an item collection's as `<file>#<id>`)."""
    if depth > MAX_DEPTH:
        raise InputError(uri, f"STAC links nest deeper than {MAX_DEPTH} levels (a loop?)")
    document = read_json(uri)
    try:
        kind = stac_kind(document)
    except InputError as exc:
        raise InputError(uri, exc.reason) from None
    if kind == "item":
        return [uri]
    if kind == "item-collection":
        return [f"{uri}{FRAGMENT}{fragment}" for fragment in feature_fragments(document.get("features", []))]
    found = []
    for link in document.get("links", []):
        target = resolve(link.get("href", ""), uri)
        if link.get("rel") == "item":
            found.append(target)
        elif link.get("rel") == "child":
            found += list_items(target, depth + 1)
    return found


def feature_fragments(features: list) -> list[str]:
    """How each item of an item collection is addressed after the `#`: its id, or where that is
    missing or not unique (a saved search across collections), `<id>@<position>` (`@<position>`)."""
    ids = [feature.get("id") if isinstance(feature, dict) else None for feature in features]
    return [str(item_id) if item_id is not None and ids.count(item_id) == 1
            else f"{'' if item_id is None else item_id}{POSITION}{position}" for position, item_id in enumerate(ids)]


POSITION = "@"


def read_item(uri: str) -> tuple[dict, str]:
    """An item and the document its hrefs are relative to."""
    path, _, fragment = uri.partition(FRAGMENT)
    document = read_json(path)
    if fragment:
        features = document.get("features", [])
        fragments = feature_fragments(features)
        if fragment not in fragments:
            raise InputError(uri, f"item collection {path} has no item {fragment!r}")
        item = features[fragments.index(fragment)]
        if not isinstance(item, dict) or item.get("type") != "Feature" or item.get("id") is None:
            raise InputError(uri, f"item {fragments.index(fragment)} of item collection {path} is no STAC item "
                                  "(a Feature with an id)")
        return item, path
    try:
        kind = stac_kind(document)
    except InputError as exc:
        raise InputError(uri, exc.reason) from None
    if kind != "item":
        items = list_items(uri)
        if len(items) != 1:
            raise InputError(uri, f"a STAC {kind} of {len(items)} items: `segpipe run` segments each of them")
        return read_item(items[0])
    if document.get("id") is None:
        raise InputError(uri, "STAC item has no id")
    return document, path


def asset_bands(asset: dict) -> list[dict]:
    """The band descriptions of an asset: STAC 1.1 `bands`, or the eo extension's `eo:bands`."""
    return asset.get("bands") or asset.get("eo:bands") or []


def band_assets(item: dict, base: str, names: list[str]) -> list[tuple[str, int, str]]:
    """(href, 1-based band in the asset, name) of each band name, looked up among the asset keys
    and the assets' band names and common names (any case)."""
    found = []
    for name in names:
        wanted = name.lower()
        match = None
        for key, asset in item.get("assets", {}).items():
            if "href" not in asset:
                continue
            bands = asset_bands(asset)
            if key.lower() == wanted:
                match = (resolve(asset["href"], base), 1, name)
                break
            for index, band in enumerate(bands, start=1):
                aliases = {str(band.get(field, "")).lower() for field in ("name", "common_name", "eo:common_name")}
                if wanted in aliases:
                    match = (resolve(asset["href"], base), index, name)
                    break
            if match:
                break
        if match is None:
            known = sorted(item.get("assets", {}))
            raise InputError(item.get("id", "?"), f"STAC item has no asset for band {name!r} (its assets: "
                                                  f"{', '.join(known) or 'none'})")
        found.append(match)
    return found


@dataclass(frozen=True)
class AssetBand:
    href: str
    band: int
    name: str
    scale: float = 1.0
    offset: float = 0.0
    """Applied to the raw values read (pipelines.sources.scene.card_units: from the asset file's own
    scale and offset, not the item's raster:bands)."""


@dataclass(frozen=True)
class StacItemSource(Source):
    uri: str
    item_id: str
    bands_read: tuple[AssetBand, ...]
    """The assets read, in the card's band order."""
    grid_shape: tuple[int, int]
    """The first band's asset's grid: (height, width), CRS and transform; the others are resampled onto it."""
    grid_crs_wkt: str
    grid_transform: tuple[float, ...]
    pixel_dtype: str
    pixel_nodata: float | None
    level: str | None = None
    units_note: str | None = None
    raw_nodata: float | None = None
    """The assets' nodata value as stored, where their values are read scaled (pixel_nodata is NaN then)."""
    kind = "stac"
    labels_output = "labels-cog"

    @property
    def stem(self) -> str:
        return self.item_id

    @property
    def crs_wkt(self) -> str:
        return self.grid_crs_wkt

    @property
    def transform(self) -> tuple[float, ...]:
        return self.grid_transform

    @property
    def dtype(self) -> str:
        return self.pixel_dtype

    @property
    def nodata(self) -> float | None:
        return self.pixel_nodata

    @property
    def processing_level(self) -> str | None:
        return self.level

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid_shape

    @property
    def count(self) -> int:
        return len(self.bands_read)

    @property
    def band_names(self) -> tuple[str | None, ...]:
        return tuple(band.name for band in self.bands_read)

    def read(self, bands: tuple[int, ...], box: Box) -> np.ndarray:
        (row0, col0), (row1, col1) = box.start, box.stop
        window = Window(col0, row0, col1 - col0, row1 - row0)
        planes = []
        for band in (self.bands_read[b - 1] for b in bands):
            try:
                with rasterio_env(band.href), rasterio.Env(**GDAL_OPTIONS), rasterio.open(band.href) as src:
                    if (src.height, src.width) == self.grid_shape and tuple(src.transform)[:6] == self.transform:
                        planes.append(src.read(band.band, window=window))
                    else:
                        with WarpedVRT(src, crs=src.crs, transform=rasterio.Affine(*self.transform),
                                       width=self.grid_shape[1], height=self.grid_shape[0],
                                       resampling=Resampling.nearest) as vrt:
                            planes.append(vrt.read(band.band, window=window))
            except RasterioError as exc:
                raise InputError(band.href, f"cannot read band {band.name!r} of STAC item {self.item_id} "
                                            f"({exc})") from exc
            if (band.scale, band.offset) != (1.0, 0.0):
                raw = planes[-1]
                planes[-1] = raw.astype(np.float32) * np.float32(band.scale) + np.float32(band.offset)
                if self.raw_nodata is not None:
                    planes[-1][raw == self.raw_nodata] = np.nan
        return np.stack(planes).astype(self.dtype, copy=False)

    def pixel_areas(self) -> PixelAreas:
        return pixel_areas(self.crs_wkt, self.transform, self.grid_shape[0])


def open_stac(uri: str, card: ModelCard) -> StacItemSource:
    item, base = read_item(uri)
    names = [b for b in card.bands if isinstance(b, str)] or list(card.band_names)
    found = band_assets(item, base, names)
    reference = found[0][0]
    grid, dtypes, declared = None, [], []
    for href, band, name in found:
        if not storage.exists(href):
            raise InputError(href, f"no such file: the asset of band {name!r} of STAC item {item.get('id')}")
        try:
            with rasterio_env(href), rasterio.open(href) as src:
                if src.crs is None:
                    raise InputError(href, f"asset of band {name!r} of STAC item {item.get('id')} has no CRS")
                if band > src.count:
                    raise InputError(href, f"has {src.count} band(s), STAC item {item.get('id')} says band {band} "
                                           f"is {name!r}")
                dtypes.append(src.dtypes[band - 1])
                declared.append((src.scales[band - 1], src.offsets[band - 1]))
                if href == reference:
                    grid = ((src.height, src.width), src.crs.to_wkt(), tuple(src.transform)[:6], src.nodata)
        except RasterioError as exc:
            raise InputError(href, f"cannot open the asset of band {name!r} of STAC item {item.get('id')} "
                                   f"({exc})") from exc
    shape, crs_wkt, transform, nodata = grid
    properties = item.get("properties", {})
    level = properties.get("processing:level") or _level_from_product_type(properties.get("s2:product_type"))
    applied, units = card_units(uri, [scale for scale, _ in declared], [offset for _, offset in declared], card)
    bands = tuple(AssetBand(*f, *units_of) for f, units_of in zip(found, applied))
    if any((band.scale, band.offset) != (1.0, 0.0) for band in bands):  # float32, nodata as NaN (as scenes)
        return StacItemSource(uri, str(item.get("id")), bands, shape, crs_wkt, transform, "float32",
                              None if nodata is None else float("nan"), processing_level(level), units, nodata)
    return StacItemSource(uri, str(item.get("id")), bands, shape, crs_wkt, transform,
                          str(np.result_type(*dtypes)), nodata, processing_level(level), units)


def item_stem(uri: str) -> str:
    """An item's name: its id after the fragment (with its position where the id is not unique),
    else its file's name."""
    path, _, fragment = uri.partition(FRAGMENT)
    return fragment or Path(path).name.removesuffix(".json")


def _level_from_product_type(product_type) -> str | None:
    """Sentinel-2 product types: S2MSI1C is Level-1C, S2MSI2A Level-2A."""
    if not product_type or not str(product_type).upper().startswith("S2MSI"):
        return None
    return str(product_type).upper().removeprefix("S2MSI")


def stac_identity(uri: str) -> dict:
    """What identifies an item's image: its id, and each of its data assets by href, size and
    ETag or modification time (assets with the role "data", or all when none has roles)."""
    item, base = read_item(uri)
    assets = item.get("assets", {})
    with_roles = {key: asset for key, asset in assets.items() if "data" in asset.get("roles", [])}
    identity = []
    for key, asset in sorted((with_roles or assets).items()):
        href = resolve(asset.get("href", ""), base)
        size, version = storage.stat(href)
        identity.append([key, href, size, version])
    return {"item": item.get("id"), "assets": identity}


CATALOGUE_FILES = ("catalog.json", "collection.json")


def items_among(uris: list[str]) -> list[str]:
    """An archive's listing with its STAC documents taken for what they are: a folder whose
    root holds catalog.json (or collection.json) is that catalogue, its items the images; other
    JSON files are items (item collections and catalogues: their items) or, when they are no
    STAC, sidecars that are no image; the asset files of the items found are bands of those
    items, not images of their own."""
    catalogues = sorted((u for u in uris if Path(u.rstrip("/")).name.lower() in CATALOGUE_FILES),
                        key=lambda u: (u.count("/"), CATALOGUE_FILES.index(Path(u).name.lower())))
    if catalogues:
        return list_items(catalogues[0])
    images, assets = [], set()
    for uri in uris:
        if not is_stac(uri):
            images.append(uri)
            continue
        try:
            items = list_items(uri)
        except InputError:
            continue  # JSON that is no STAC: a sidecar of some image, not an image
        for item_uri in items:
            images.append(item_uri)
            try:
                item, base = read_item(item_uri)
            except InputError:
                continue  # segmenting it says what is wrong with it
            assets |= {storage.absolute(resolve(asset["href"], base)) for asset in item.get("assets", {}).values()
                       if isinstance(asset, dict) and "href" in asset}
    return [uri for uri in images if is_stac(uri) or storage.absolute(uri) not in assets]


def is_stac(uri: str) -> bool:
    """A STAC document, or an item inside an item collection (`<file>.json#<item id>`)."""
    return uri.partition(FRAGMENT)[0].lower().endswith(SUFFIXES)


KIND = SourceKind("stac", open_stac, suffixes=SUFFIXES)
