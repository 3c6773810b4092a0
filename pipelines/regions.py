"""Class areas per region: how much of each class lies in each farm field, district or annotation.

Regions come from a vector file (GeoPackage or GeoJSON) of polygons; the labels from the
segmentation (a zarr.Array or numpy array of uint8 class ids, 255 = nodata).

Pixel membership rule: a pixel belongs to a region when the pixel's centre lies inside the
region's polygon (in the raster's CRS). This is GDAL's rasterisation with all_touched=False,
done per region, so that overlapping regions each count all of their own pixels, and a pixel
is never split between regions by area. A region outside the raster gets zero counts; one half
outside counts the pixels it covers.

Coordinates:
- regions and raster both have a CRS: the polygons are reprojected vertex by vertex into the
  raster's CRS (edges stay straight lines in the raster's CRS);
- neither has one: the polygons are in pixel coordinates (x = column, y = row, the image's
  top-left corner at (0, 0)) of the full-resolution image, as annotations are drawn on a slide
  (QuPath: level 0); the caller's transform maps the labels' pixels to them
  (Source.regions_transform: a slide segmented at a coarser level is scaled up). A
  GeoJSON file without a "crs" member counts as having none here, although GDAL reads it as
  lon/lat (RFC 7946): slide annotation tools write pixel coordinates in such files;
- one has a CRS and the other not: an InputError, since nothing says how they line up.

Only each region's bounding-box window of the labels is read, in strips of bounded size, so
memory depends on neither the image nor the region size.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyproj
import shapely
from affine import Affine
from rasterio.features import rasterize

from pipelines.errors import InputError

ID_FIELD_CANDIDATES = ("id", "name")
POLYGON_TYPES = ("Polygon", "MultiPolygon")
# Labels read and rasterised at once for one region: 16 Mpx is 16 MB of labels plus the mask.
MAX_STRIP_PIXELS = 1 << 24


@dataclass(frozen=True)
class RegionSet:
    source: str
    ids: tuple[str, ...]
    geometries: tuple
    """shapely Polygons / MultiPolygons, one per id, in the CRS of `crs_wkt`."""
    crs_wkt: str | None
    crs_is_implied: bool = False
    """True for a GeoJSON file that declares no CRS: lon/lat by RFC 7946, but pixel
    coordinates when the raster has no CRS either."""


@dataclass(frozen=True)
class RegionClassCounts:
    region: str
    counts: np.ndarray
    """int64 pixels per class (length num_classes); nodata pixels are not counted."""
    areas: np.ndarray
    """float64 area per class: the sum over rows of (class pixels in the row) x (row's pixel area)."""
    pixels: int
    """Valid (not nodata) pixels of the region: counts.sum()."""


def load_regions(path: str | Path, id_field: str | None = None, layer: str | None = None) -> RegionSet:
    """The polygons of one layer of a vector file, with one unique id each.

    id_field None: a field named "id" or "name" when there is one, else the feature id (FID).
    Features with an empty or missing geometry are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    import pyogrio.errors
    import pyogrio.raw

    layer = _single_layer(path, layer)
    try:
        info = pyogrio.read_info(path, layer=layer)
        meta, fids, wkb, field_values = pyogrio.raw.read(path, layer=layer, return_fids=True, force_2d=True)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as err:
        raise InputError(path, f"cannot be read as a vector file ({err})") from None
    if wkb is None:
        raise InputError(path, f"layer {info['layer_name']!r} has no geometries")

    fields = [str(name) for name in meta["fields"]]
    if id_field is None:
        id_field = next((name for name in ID_FIELD_CANDIDATES if name in fields), None)
    elif id_field not in fields:
        raise InputError(path, f"no field {id_field!r}; the fields are {fields}")
    raw_ids = fids if id_field is None else field_values[fields.index(id_field)]

    geometries = shapely.from_wkb(wkb)
    present = ~(shapely.is_missing(geometries) | shapely.is_empty(geometries))
    if not present.any():
        raise InputError(path, "no polygon features (all geometries are empty)")
    kinds = Counter(shapely.get_type_id(geometries[present]).tolist())
    wrong = {shapely.GeometryType(kind).name for kind in kinds} - {name.upper() for name in POLYGON_TYPES}
    if wrong:
        raise InputError(path, f"regions must be polygons, found {sorted(wrong)} geometries")

    ids = tuple(_id_text(value) for value in np.asarray(raw_ids)[present])
    if None in ids:
        raise InputError(path, f"a region has no value in the id field {id_field!r}")
    duplicates = sorted(value for value, count in Counter(ids).items() if count > 1)
    if duplicates:
        source_of_ids = f"field {id_field!r}" if id_field else "FID"
        raise InputError(path, f"duplicate region ids in {source_of_ids}: {duplicates[:10]}")

    crs_is_implied = info["driver"] == "GeoJSON" and not _geojson_declares_crs(path)
    crs_wkt = pyproj.CRS.from_user_input(meta["crs"]).to_wkt() if meta["crs"] else None
    return RegionSet(str(path), ids, tuple(geometries[present]), crs_wkt, crs_is_implied)


def region_class_counts(
    regions: RegionSet,
    labels,
    raster_crs_wkt: str | None,
    transform: tuple[float, ...] | None,
    num_classes: int,
    row_areas: np.ndarray,
    nodata_label: int = 255,
    max_strip_pixels: int = MAX_STRIP_PIXELS,
) -> list[RegionClassCounts]:
    """Pixels and area of each class inside each region, in the order of `regions.ids`.

    `transform` is the raster's GDAL-order affine (a, b, c, d, e, f); None means pixel
    coordinates (only together with no CRS on either side).
    """
    height, width = labels.shape
    row_areas = np.asarray(row_areas, dtype=np.float64)
    if row_areas.shape != (height,):
        raise ValueError(f"row_areas has shape {row_areas.shape}, the labels have {height} rows")
    geometries = _in_raster_coordinates(regions, raster_crs_wkt)
    pixel_to_raster = Affine.identity() if transform is None else Affine(*transform[:6])
    results = []
    for region, geometry in zip(regions.ids, geometries):
        if not np.isfinite(shapely.bounds(geometry)).all():
            raise InputError(regions.source, f"region {region!r} cannot be projected into the raster's CRS")
        rows, cols = _pixel_window(geometry, pixel_to_raster, height, width)
        per_row = np.zeros((rows.stop - rows.start, num_classes), dtype=np.int64)
        strip_height = max(1, max_strip_pixels // max(1, cols.stop - cols.start))
        for strip_start in range(rows.start, rows.stop, strip_height):
            strip = slice(strip_start, min(strip_start + strip_height, rows.stop))
            per_row[strip.start - rows.start : strip.stop - rows.start] = _class_counts_per_row(
                labels, geometry, pixel_to_raster, strip, cols, num_classes, nodata_label
            )
        counts = per_row.sum(axis=0)
        areas = row_areas[rows] @ per_row
        results.append(RegionClassCounts(region, counts, areas, int(counts.sum())))
    return results


def outside_raster_note(
    regions: RegionSet, raster_crs_wkt: str | None, transform: tuple[float, ...] | None, height: int, width: int
) -> str | None:
    """A note when no region of the file overlaps the raster at all (every region's rows count
    0 pixels): the usual sign of regions in another place or CRS than the user thinks (lat/lon
    swapped, a GeoJSON in a projected CRS that declares none). None when one overlaps."""
    geometries = _in_raster_coordinates(regions, raster_crs_wkt)
    pixel_to_raster = Affine.identity() if transform is None else Affine(*transform[:6])
    corners = [pixel_to_raster * corner for corner in ((0, 0), (width, 0), (width, height), (0, height))]
    footprint = shapely.Polygon(corners)
    finite = [geometry for geometry in geometries if np.isfinite(shapely.bounds(geometry)).all()]
    if any(shapely.intersects(geometry, footprint) for geometry in finite):
        return None

    def extent(bounds) -> str:
        minx, miny, maxx, maxy = bounds
        return f"x {minx:.6g} to {maxx:.6g}, y {miny:.6g} to {maxy:.6g}"

    where = "in the image's CRS" if raster_crs_wkt else "in pixels"
    spanned = f"the regions span {extent(shapely.total_bounds(finite))}, " if finite else ""
    return (f"no region of {regions.source} overlaps the image: {spanned}the image {extent(footprint.bounds)} "
            f"({where}); every region counts 0 pixels. Check the regions' coordinates and CRS")


def _single_layer(path: Path, layer: str | None) -> str | None:
    """The layer to read: the one asked for, or the only one; a file of several needs a name."""
    import pyogrio.errors

    try:
        names = [str(name) for name, _ in pyogrio.list_layers(path)]
    except pyogrio.errors.DataSourceError as err:
        raise InputError(path, f"cannot be read as a vector file ({err})") from None
    if layer is None:
        if len(names) > 1:
            raise InputError(path, f"has several layers, name one of {names}")
        return None
    if layer not in names:
        raise InputError(path, f"no layer {layer!r}; the layers are {names}")
    return layer


def _geojson_declares_crs(path: Path) -> bool:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # GDAL read it anyway (e.g. GeoJSON text sequences): nothing declared at the top
    return isinstance(document, dict) and "crs" in document


def _id_text(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    return str(value)


def _in_raster_coordinates(regions: RegionSet, raster_crs_wkt: str | None) -> tuple:
    regions_have_crs = regions.crs_wkt is not None and not (regions.crs_is_implied and raster_crs_wkt is None)
    if regions_have_crs != (raster_crs_wkt is not None):
        which = (
            "the regions have a CRS, the raster has none"
            if regions_have_crs
            else "the raster has a CRS, the regions have none"
        )
        raise InputError(regions.source, f"{which}: cannot line them up")
    if not regions_have_crs:
        return regions.geometries
    source, target = pyproj.CRS.from_wkt(regions.crs_wkt), pyproj.CRS.from_wkt(raster_crs_wkt)
    if source == target:
        return regions.geometries
    to_raster = pyproj.Transformer.from_crs(source, target, always_xy=True)
    return tuple(shapely.transform(geometry, to_raster.transform, interleaved=False) for geometry in regions.geometries)


def _pixel_window(geometry, pixel_to_raster: Affine, height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of every pixel whose centre can lie in the geometry, within the image
    (empty slices for a region outside it)."""
    minx, miny, maxx, maxy = shapely.bounds(geometry)
    raster_to_pixel = ~pixel_to_raster
    corners = [raster_to_pixel @ (x, y) for x in (minx, maxx) for y in (miny, maxy)]
    cols = [col for col, _ in corners]
    rows = [row for _, row in corners]
    col_start, col_stop = max(0, math.floor(min(cols))), min(width, math.ceil(max(cols)))
    row_start, row_stop = max(0, math.floor(min(rows))), min(height, math.ceil(max(rows)))
    if col_start >= col_stop or row_start >= row_stop:
        return slice(0, 0), slice(0, 0)
    return slice(row_start, row_stop), slice(col_start, col_stop)


def _class_counts_per_row(
    labels, geometry, pixel_to_raster: Affine, rows: slice, cols: slice, num_classes: int, nodata_label: int
) -> np.ndarray:
    """(rows, num_classes) pixel counts of the region's pixels in one window of the labels."""
    window_shape = (rows.stop - rows.start, cols.stop - cols.start)
    window_transform = pixel_to_raster @ Affine.translation(cols.start, rows.start)
    inside = rasterize(
        [(geometry, 1)], out_shape=window_shape, transform=window_transform, fill=0, all_touched=False, dtype="uint8"
    ).astype(bool)
    window = np.asarray(labels[rows, cols])
    counted = inside & (window != nodata_label)
    row_in_window, _ = np.nonzero(counted)
    classes = window[counted].astype(np.int64)
    if classes.size and classes.max() >= num_classes:
        raise ValueError(f"label {classes.max()} found, but there are {num_classes} classes (nodata is {nodata_label})")
    flat = np.bincount(row_in_window * num_classes + classes, minlength=window_shape[0] * num_classes)
    return flat.reshape(window_shape[0], num_classes)
