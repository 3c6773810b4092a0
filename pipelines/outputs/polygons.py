"""Class polygons (pipelines.polygons) as files: GeoParquet or GeoPackage in map coordinates for
georeferenced sources, QuPath's GeoJSON in full-resolution pixel coordinates for the others.

Each polygon is one connected region of one class with its class id, name and area in the
image's unit (pixels x pixel area, from the unsimplified polygon: they sum to the statistics'
class areas); `simplify` (in pixels) thins the shapes written, not their areas. Files are
written as the regions come, strip by strip: memory holds no whole-image geometry.

GeoParquet follows the OGC GeoParquet 1.1 specification (WKB geometry column, `geo` file
metadata with the CRS as PROJJSON), which GDAL, QGIS, geopandas and DuckDB's spatial extension
read. The same regions give the same bytes whatever the block size and number of workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely import affinity

from pipelines.outputs import Output, OutputContext
from pipelines.polygons import class_polygons

GEOPARQUET_VERSION = "1.1.0"
ROWS_PER_GROUP = 10_000


def regions(context: OutputContext):
    """(class id, polygon in pixels, area in the image's unit) of every region."""
    areas = context.source.pixel_areas()
    simplify = float(context.options.get("simplify", 0) or 0)
    uniform = bool(np.all(areas.row_areas == areas.row_areas[0]))
    for region in class_polygons(context.labels):
        if uniform:
            area = region.pixels * float(areas.row_areas[0])
        else:  # a geographic CRS: each row's pixels have their own area
            area = row_weighted_area(region.polygon, areas.row_areas)
        polygon = shapely.simplify(region.polygon, simplify) if simplify else region.polygon
        yield region.class_id, polygon, area, areas.unit


def row_weighted_area(polygon: shapely.Polygon, row_areas: np.ndarray) -> float:
    """Pixels of the polygon in each row, times that row's pixel area."""
    min_x, min_y, max_x, max_y = (int(v) for v in polygon.bounds)
    total = 0.0
    for row in range(min_y, max_y):
        strip = shapely.box(min_x, row, max_x, row + 1)
        total += round(polygon.intersection(strip).area) * float(row_areas[row])
    return total


def to_map(polygon: shapely.Polygon, transform: tuple[float, ...]) -> shapely.Polygon:
    a, b, c, d, e, f = transform[:6]
    return affinity.affine_transform(polygon, [a, b, d, e, c, f])


SCHEMA = pa.schema([("class_id", pa.int16()), ("class_name", pa.string()), ("area", pa.float64()),
                    ("area_unit", pa.string()), ("geometry", pa.binary())])


def geoparquet_metadata(crs_wkt: str | None) -> dict:
    from pyproj import CRS

    column = {"encoding": "WKB", "geometry_types": ["Polygon"]}
    column["crs"] = CRS.from_wkt(crs_wkt).to_json_dict() if crs_wkt else None
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def write_geoparquet(context: OutputContext, folder: Path) -> None:
    source = context.source
    names = {c.id: c.name for c in context.card.classes}
    schema = SCHEMA.with_metadata({"geo": json.dumps(geoparquet_metadata(source.crs_wkt), sort_keys=True)})
    with pq.ParquetWriter(folder / GEOPARQUET.file, schema, compression="zstd") as writer:
        rows: list[dict] = []
        for class_id, polygon, area, unit in regions(context):
            if source.transform is not None:
                polygon = to_map(polygon, source.transform)
            rows.append({"class_id": class_id, "class_name": names[class_id], "area": area, "area_unit": unit,
                         "geometry": shapely.to_wkb(polygon)})
            if len(rows) == ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))


def write_geopackage(context: OutputContext, folder: Path) -> None:
    import os

    import pyogrio.raw

    source = context.source
    names = {c.id: c.name for c in context.card.classes}
    path = folder / GEOPACKAGE.file
    batch: list[tuple] = []

    def flush(append: bool) -> None:
        geometry = np.array([shapely.to_wkb(row[1]) for row in batch], dtype=object)
        fields = [np.array([row[0] for row in batch], dtype=np.int16),
                  np.array([names[row[0]] for row in batch], dtype=object),
                  np.array([row[2] for row in batch], dtype=np.float64),
                  np.array([row[3] for row in batch], dtype=object)]
        pyogrio.raw.write(str(path), geometry=geometry, field_data=fields,
                          fields=["class_id", "class_name", "area", "area_unit"], crs=source.crs_wkt,
                          geometry_type="Polygon", driver="GPKG", layer="classes", append=append)

    # A fixed timestamp in the GeoPackage's tables: the same regions give the same file.
    previous = os.environ.get("OGR_CURRENT_DATE")
    os.environ["OGR_CURRENT_DATE"] = "2000-01-01T00:00:00.000Z"
    try:
        written = False
        for class_id, polygon, area, unit in regions(context):
            if source.transform is not None:
                polygon = to_map(polygon, source.transform)
            batch.append((class_id, polygon, area, unit))
            if len(batch) == ROWS_PER_GROUP:
                flush(append=written)
                written, batch = True, []
        if batch or not written:
            flush(append=written)
    finally:
        if previous is None:
            os.environ.pop("OGR_CURRENT_DATE", None)
        else:
            os.environ["OGR_CURRENT_DATE"] = previous


def write_qupath_geojson(context: OutputContext, folder: Path) -> None:
    """QuPath's GeoJSON of annotations: one Feature per region, `classification` with the
    class's name and colour, coordinates in pixels of the full-resolution image (a slide's
    level 0), so QuPath puts them on the slide where they belong."""
    classes = {c.id: c for c in context.card.classes}
    factor = context.source.full_resolution_factor
    with open(folder / QUPATH.file, "w") as out:
        out.write('{"type": "FeatureCollection", "features": [')
        for index, (class_id, polygon, area, unit) in enumerate(regions(context)):
            if factor != 1:
                polygon = affinity.scale(polygon, factor, factor, origin=(0, 0))
            feature = {
                "type": "Feature", "geometry": shapely.geometry.mapping(polygon),
                "properties": {"objectType": "annotation",
                               "classification": {"name": classes[class_id].name, "color": list(classes[class_id].color)},
                               "area": area, "area_unit": unit},
            }
            out.write(("," if index else "") + "\n" + json.dumps(feature, separators=(",", ":")))
        out.write("\n]}\n")


GEOPARQUET = Output("polygons-geoparquet", "classes.parquet", write_geoparquet,
                    spatial_dims=(2,), description="class polygons, GeoParquet in map coordinates")
GEOPACKAGE = Output("polygons-gpkg", "classes.gpkg", write_geopackage, spatial_dims=(2,),
                    description="class polygons, GeoPackage in map coordinates")
QUPATH = Output("polygons-geojson", "classes.geojson", write_qupath_geojson, spatial_dims=(2,),
                description="class polygons, QuPath GeoJSON in full-resolution pixels")
