"""Class areas per region on the real segmented Sentinel-2 scene, checked against a brute force
that tests every pixel centre of the image with shapely; regions given in lon/lat (reprojected),
in the raster's CRS, and in pixel coordinates; the vector files that cannot be used."""

import json

import geopandas as gpd
import numpy as np
import pyproj
import pytest
import rasterio
import shapely
import zarr
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box

from pipelines.areas import pixel_areas
from pipelines.errors import InputError
from pipelines.model_card import load_card
from pipelines.regions import load_regions, region_class_counts

NODATA = 255

# Regions drawn in pixel coordinates (x = column, y = row) of the scene; vertices avoid the
# half-integer positions of pixel centres so that no centre lies on an edge.
PIXEL_REGIONS = {
    "notched-with-hole": Polygon(
        [(10.2, 12.3), (90.7, 12.3), (90.7, 40.1), (40.4, 40.1), (40.4, 95.9), (10.2, 95.9)],
        holes=[[(20.1, 20.2), (30.3, 20.2), (30.3, 60.7), (20.1, 60.7)]],
    ),
    "overlap-a": Polygon([(60.3, 60.2), (140.8, 70.4), (130.1, 150.6), (55.2, 140.9)]),
    "overlap-b": box(100.4, 100.3, 180.2, 170.8),
    "half-outside": box(-50.3, 150.2, 35.6, 250.4),
    "two-parts": MultiPolygon([box(150.2, 10.1, 170.3, 30.4), box(175.1, 35.2, 190.9, 60.3)]),
    "far-away": box(1000.1, 1000.2, 1100.3, 1100.4),
}


@pytest.fixture(scope="module")
def scene(segmented_scene):
    with rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif") as src:
        transform = tuple(src.transform)[:6]
        return {
            "labels": src.read(1),
            "crs": src.crs,
            "transform": transform,
            "row_areas": pixel_areas(src.crs.to_wkt(), transform, src.height).row_areas,
            "num_classes": load_card("s2-cloud").num_classes,
        }


def pixel_to_crs(geometry, transform):
    a, b, c, d, e, f = transform
    return shapely.transform(
        geometry, lambda xy: np.column_stack([c + a * xy[:, 0] + b * xy[:, 1], f + d * xy[:, 0] + e * xy[:, 1]])
    )


def reproject(geometry, source, target):
    transformer = pyproj.Transformer.from_crs(source, target, always_xy=True)
    return shapely.transform(geometry, transformer.transform, interleaved=False)


def brute_force_counts(polygon, labels, transform, num_classes):
    """Class counts of the pixels whose centre shapely finds inside the polygon (all pixels tested)."""
    a, b, c, d, e, f = transform
    rows, cols = np.mgrid[0 : labels.shape[0], 0 : labels.shape[1]] + 0.5
    inside = shapely.contains_xy(polygon, c + a * cols + b * rows, f + d * cols + e * rows)
    counted = labels[inside & (labels != NODATA)]
    return np.bincount(counted, minlength=num_classes)


def write_regions(path, ids, geometries, crs, **fields):
    gpd.GeoDataFrame({"region": list(ids), **fields}, geometry=list(geometries), crs=crs).to_file(path)
    return path


def assert_matches_brute_force(results, raster_polygons, scene):
    assert [r.region for r in results] == list(raster_polygons)
    for result, polygon in zip(results, raster_polygons.values()):
        expected = brute_force_counts(polygon, scene["labels"], scene["transform"], scene["num_classes"])
        np.testing.assert_array_equal(result.counts, expected, err_msg=result.region)
        assert result.counts.dtype == np.int64 and result.pixels == expected.sum()
        np.testing.assert_allclose(result.areas, expected * 100.0, rtol=1e-12)


def test_lon_lat_regions_are_reprojected_and_match_a_brute_force(scene, tmp_path):
    raster_crs = scene["crs"]
    lon_lat = {
        name: reproject(pixel_to_crs(p, scene["transform"]), raster_crs, "EPSG:4326")
        for name, p in PIXEL_REGIONS.items()
    }
    path = write_regions(tmp_path / "fields.geojson", lon_lat, lon_lat.values(), "EPSG:4326")

    regions = load_regions(path, id_field="region")
    assert pyproj.CRS.from_wkt(regions.crs_wkt) == pyproj.CRS("EPSG:4326")
    results = region_class_counts(
        regions, scene["labels"], raster_crs.to_wkt(), scene["transform"], scene["num_classes"], scene["row_areas"]
    )

    # the reference polygon in the raster's CRS: the lon/lat vertices projected back
    raster_polygons = {name: reproject(p, "EPSG:4326", raster_crs) for name, p in lon_lat.items()}
    assert_matches_brute_force(results, raster_polygons, scene)
    by_name = {r.region: r for r in results}
    assert by_name["far-away"].pixels == 0 and by_name["half-outside"].pixels > 0
    overlap = brute_force_counts(
        raster_polygons["overlap-a"].intersection(raster_polygons["overlap-b"]),
        scene["labels"],
        scene["transform"],
        scene["num_classes"],
    )
    assert overlap.sum() > 0, "the overlapping regions share pixels, and each counts them"


def test_regions_in_the_raster_crs_from_a_geopackage_read_in_strips_from_zarr_with_nodata(scene, tmp_path):
    raster_polygons = {name: pixel_to_crs(p, scene["transform"]) for name, p in PIXEL_REGIONS.items()}
    path = write_regions(tmp_path / "districts.gpkg", raster_polygons, raster_polygons.values(), scene["crs"].to_wkt())
    # the scene's labels have no nodata: mark a block as nodata, across several regions
    with_nodata = scene["labels"].copy()
    with_nodata[50:120, 30:90] = NODATA
    labels = zarr.create_array(zarr.storage.MemoryStore(), shape=with_nodata.shape, chunks=(64, 64), dtype="uint8")
    labels[:] = with_nodata

    regions = load_regions(path, id_field="region")
    for strip_pixels in (1 << 24, 500):  # one window per region, and strips of a few rows
        results = region_class_counts(
            regions,
            labels,
            scene["crs"].to_wkt(),
            scene["transform"],
            scene["num_classes"],
            scene["row_areas"],
            max_strip_pixels=strip_pixels,
        )
        assert_matches_brute_force(results, raster_polygons, {**scene, "labels": with_nodata})


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_pixel_coordinate_regions_without_crs_on_both_sides(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(180, 210), dtype=np.uint8)
    labels[rng.random(labels.shape) < 0.1] = NODATA
    row_areas = np.linspace(1.0, 2.0, labels.shape[0])  # unequal rows: areas must weight each row

    gpkg = write_regions(tmp_path / "annotations.gpkg", PIXEL_REGIONS, PIXEL_REGIONS.values(), None)
    # GeoJSON as slide annotation tools write it: pixel coordinates and no "crs" member
    features = [
        {"type": "Feature", "properties": {"name": n}, "geometry": shapely.geometry.mapping(p)}
        for n, p in PIXEL_REGIONS.items()
    ]
    geojson = tmp_path / "annotations.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    for path in (gpkg, geojson):
        regions = load_regions(path, id_field="region" if path.suffix == ".gpkg" else None)
        results = region_class_counts(regions, labels, None, None, 4, row_areas)
        assert [r.region for r in results] == list(PIXEL_REGIONS)
        for result, polygon in zip(results, PIXEL_REGIONS.values()):
            rows, cols = np.mgrid[0 : labels.shape[0], 0 : labels.shape[1]] + 0.5
            counted = shapely.contains_xy(polygon, cols, rows) & (labels != NODATA)
            np.testing.assert_array_equal(result.counts, np.bincount(labels[counted], minlength=4))
            expected_areas = [row_areas[np.nonzero(counted & (labels == k))[0]].sum() for k in range(4)]
            np.testing.assert_allclose(result.areas, expected_areas, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_a_crs_on_one_side_only_is_refused(scene, tmp_path):
    projected = write_regions(tmp_path / "projected.gpkg", ["a"], [box(0, 0, 10, 10)], scene["crs"].to_wkt())
    with pytest.raises(InputError, match="projected.gpkg.*raster has none"):
        region_class_counts(load_regions(projected), scene["labels"], None, None, 3, scene["row_areas"])
    bare = write_regions(tmp_path / "bare.gpkg", ["a"], [box(0, 0, 10, 10)], None)
    with pytest.raises(InputError, match="bare.gpkg.*regions have none"):
        region_class_counts(
            load_regions(bare), scene["labels"], scene["crs"].to_wkt(), scene["transform"], 3, scene["row_areas"]
        )


def test_ids_come_from_the_id_field_or_a_default(tmp_path):
    squares = [box(0, 0, 1, 1), None, box(2, 2, 3, 3), Polygon()]
    codes = ["F-17", "F-18", "F-19", "F-20"]
    path = write_regions(
        tmp_path / "farms.gpkg", ["north", "gone", "south", "empty"], squares, "EPSG:32719", code=codes
    )
    assert load_regions(path, id_field="code").ids == ("F-17", "F-19"), "features without a geometry are skipped"
    named = gpd.GeoDataFrame(
        {"name": ["x", "y"], "size": [1, 2]}, geometry=[box(0, 0, 1, 1), box(1, 1, 2, 2)], crs="EPSG:32719"
    )
    named.to_file(tmp_path / "named.geojson")
    assert load_regions(tmp_path / "named.geojson").ids == ("x", "y")
    numbered = gpd.GeoDataFrame({"id": [40, 41]}, geometry=[box(0, 0, 1, 1), box(1, 1, 2, 2)], crs="EPSG:32719")
    numbered.to_file(tmp_path / "numbered.gpkg")
    assert load_regions(tmp_path / "numbered.gpkg").ids == ("40", "41")
    anonymous = gpd.GeoDataFrame({"size": [1, 2]}, geometry=[box(0, 0, 1, 1), box(1, 1, 2, 2)], crs="EPSG:32719")
    anonymous.to_file(tmp_path / "anonymous.gpkg")
    regions = load_regions(tmp_path / "anonymous.gpkg")
    assert regions.ids == ("1", "2"), "GeoPackage FIDs start at 1"
    assert len(regions.geometries) == 2 and regions.source.endswith("anonymous.gpkg")


def test_unusable_vector_files_are_input_errors(scene, segmented_scene, tmp_path):
    def refused(path, match, **kwargs):
        with pytest.raises(InputError, match=match) as caught:
            load_regions(path, **kwargs)
        assert path.name in str(caught.value)

    refused(tmp_path / "missing.gpkg", "no such file")
    (tmp_path / "notes.geojson").write_text("these are not regions")
    refused(tmp_path / "notes.geojson", "cannot be read as a vector file")
    refused(segmented_scene / "sentinel2_scene" / "labels.tif", "cannot be read as a vector file")
    refused(
        write_regions(tmp_path / "wells.gpkg", ["a", "b"], [Point(1, 2), Point(3, 4)], "EPSG:32719"),
        "must be polygons.*POINT",
    )
    mixed = write_regions(
        tmp_path / "roads.geojson", ["a", "b"], [box(0, 0, 1, 1), LineString([(0, 0), (5, 5)])], "EPSG:32719"
    )
    refused(mixed, "must be polygons.*LINESTRING")
    refused(write_regions(tmp_path / "void.gpkg", ["a"], [None], "EPSG:32719"), "no polygon features")
    fields = write_regions(
        tmp_path / "fields.gpkg", ["a", "b"], [box(0, 0, 1, 1), box(1, 1, 2, 2)], "EPSG:32719", crop=["wheat", "rye"]
    )
    refused(fields, r"no field 'parcel'; the fields are \['region', 'crop'\]", id_field="parcel")
    twice = write_regions(tmp_path / "twice.gpkg", ["a", "b", "a"], [box(0, 0, 1, 1)] * 3, "EPSG:32719")
    refused(twice, r"duplicate region ids.*\['a'\]", id_field="region")
