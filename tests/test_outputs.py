"""Outputs that keep their meaning in the field's tools: labels.tif validated as a COG (rio-cogeo,
strict) with its classes named, slides' OME-Zarr rendering as RGB, NIfTI labels with their
intent and label tables, class polygons (GeoParquet, GeoPackage, QuPath GeoJSON) that do not
depend on blocks or workers, a confidence raster, and areas in human units."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import zarr
from rio_cogeo.cogeo import cog_validate

from flows.cli import main
from flows.synthetic import write_small_net_card, write_tiled_scene
from pipelines.model_card import default_colour, load_card
from pipelines.polygons import class_polygons
from pipelines.stats import read_table

L1C = load_card("s2-cloud-l1c")


def class_areas(root: Path, image: str) -> dict[str, float]:
    rows = read_table(root / "stats", "image_class").to_pylist()
    return {row["class_name"]: row["area"] for row in rows if row["image"] == image}


@pytest.fixture(scope="module")
def scene_outputs(ray_cluster, sentinel_scene, tmp_path_factory) -> Path:
    """The demo scene with every output of a scene, in small blocks (the polygons cross them)."""
    out = tmp_path_factory.mktemp("outputs")
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud-l1c", "--out", str(out), "--vector",
                 "--confidence", "--outputs", "labels,preview,polygons-gpkg", "--block", "128"]) == 0
    return out


def test_labels_tif_is_a_strict_cog_with_named_classes_and_its_provenance(scene_outputs):
    labels = scene_outputs / "sentinel2_scene" / "labels.tif"
    valid, errors, warnings = cog_validate(str(labels), strict=True)
    assert valid and not errors and not warnings, (errors, warnings)
    with rasterio.open(labels) as dataset:
        colours = dataset.colormap(1)
        assert [colours[c.id] for c in L1C.classes] == [(*c.color, 255) for c in L1C.classes]
        assert colours[255] == (0, 0, 0, 0), "nodata is transparent"
        tags = dataset.tags()
    assert tags["SEGPIPE_MODEL"] == "s2-cloud-l1c" and tags["SEGPIPE_MODEL_VERSION"] == L1C.version
    assert tags["SEGPIPE_MODEL_DIGEST"] == L1C.digest() and tags["SEGPIPE_RUN_ID"] and tags["SEGPIPE_SEGPIPE_VERSION"]
    band = ElementTree.parse(f"{labels}.aux.xml").getroot().find("PAMRasterBand")
    assert [c.text for c in band.find("CategoryNames")] == ["clear", "cloud", "shadow"]
    table = band.find("GDALRasterAttributeTable")
    assert [f.find("Name").text for f in table.findall("FieldDefn")] == ["Value", "Class", "Red", "Green", "Blue", "Alpha"]
    rows = [[f.text for f in row] for row in table.findall("Row")]
    assert rows == [[str(c.id), c.name, *map(str, c.color), "255"] for c in L1C.classes]


@pytest.mark.parametrize("shape", [(400, 600), (513, 3000)])
def test_overviews_reach_a_single_tile_at_any_size(shape, ray_cluster, tmp_path):
    height, width = shape
    big = write_tiled_scene(tmp_path / "big.tif", max(shape))
    scene = tmp_path / "scene.tif"
    with rasterio.open(big) as src:
        profile = dict(src.profile, height=height, width=width)
        pixels = src.read(window=((0, height), (0, width)))
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    card = write_small_net_card(tmp_path, tile=64)
    assert main(["segment", str(scene), "--model", str(card), "--out", str(tmp_path / "out")]) == 0
    labels = tmp_path / "out" / "scene" / "labels.tif"
    assert cog_validate(str(labels), strict=True)[0]
    with rasterio.open(labels) as dataset:
        coarsest = dataset.overviews(1)[-1]
    assert max(height, width) / coarsest <= 512 < max(height, width) / (coarsest // 2)


def test_polygons_sum_to_the_statistics_and_read_in_geopandas_and_duckdb(scene_outputs):
    import duckdb
    import geopandas as gpd

    folder = scene_outputs / "sentinel2_scene"
    frame = gpd.read_parquet(folder / "classes.parquet")
    with rasterio.open(folder / "labels.tif") as labels:
        assert frame.crs == labels.crs
        bounds = labels.bounds
    assert frame.geometry.is_valid.all() and (frame.geometry.geom_type == "Polygon").all()
    assert frame.total_bounds[0] >= bounds.left and frame.total_bounds[2] <= bounds.right
    expected = class_areas(scene_outputs, "sentinel2_scene")
    for name, area in frame.groupby("class_name")["area"].sum().items():
        assert area == pytest.approx(expected[name])
        assert frame[frame.class_name == name].geometry.area.sum() == pytest.approx(expected[name])
    assert set(frame.class_name) == {name for name, area in expected.items() if area}
    package = gpd.read_file(folder / "classes.gpkg")
    assert len(package) == len(frame) and package.crs == frame.crs
    assert package.geometry.area.sum() == pytest.approx(frame.geometry.area.sum())
    [count] = duckdb.sql(f"SELECT COUNT(*), SUM(area) FROM read_parquet('{folder / 'classes.parquet'}')").fetchall()
    assert count[0] == len(frame) and count[1] == pytest.approx(sum(expected.values()))


def test_polygons_do_not_depend_on_blocks_or_workers(ray_cluster, tmp_path):
    scene = write_tiled_scene(tmp_path / "scene.tif", 768)
    card = write_small_net_card(tmp_path, tile=64)
    files = {}
    for block, workers in ((256, "1"), (2048, "2"), (128, "2")):
        out = tmp_path / f"b{block}-w{workers}"
        assert main(["segment", str(scene), "--model", str(card), "--out", str(out), "--vector", "--block",
                     str(block), "--workers", workers]) == 0
        files[block] = (out / "scene" / "classes.parquet").read_bytes()
    assert files[256] == files[2048] == files[128]


def test_a_region_spanning_four_blocks_is_one_polygon():
    labels = np.full((8, 8), 0, dtype=np.uint8)
    labels[2:6, 2:6] = 1  # the centre square crosses the borders of four 4 x 4 blocks
    labels[0, 7] = 255
    store = zarr.create_array(store={}, shape=labels.shape, dtype="uint8", chunks=(4, 4), fill_value=255)
    store[:] = labels
    regions = list(class_polygons(store))
    squares = [r for r in regions if r.class_id == 1]
    assert len(squares) == 1 and squares[0].pixels == 16
    assert shapely.equals(squares[0].polygon, shapely.box(2, 2, 6, 6))
    assert len(shapely.get_coordinates(squares[0].polygon)) == 5, "no vertices left where the blocks met"
    assert sum(r.pixels for r in regions) == 63
    assert [r.polygon.wkb for r in regions] == [r.polygon.wkb for r in class_polygons(labels, strip_rows=1)]


def test_confidence_is_the_highest_probability_beside_the_labels(scene_outputs):
    folder = scene_outputs / "sentinel2_scene"
    assert cog_validate(str(folder / "confidence.tif"), strict=True)[0]
    with rasterio.open(folder / "confidence.tif") as confidence, rasterio.open(folder / "labels.tif") as labels:
        sure, classes = confidence.read(1), labels.read(1)
        assert confidence.crs == labels.crs and confidence.transform == labels.transform and confidence.nodata == 0
    assert ((sure == 0) == (classes == 255)).all()
    assert sure[classes != 255].min() >= 255 // len(L1C.classes)


def test_slides_render_as_rgb_and_their_polygons_sit_on_level_0(ray_cluster, tmp_path):
    from ome_zarr_models.v05.image import Image

    from test_inputs import constant_card
    from training import SLIDE, shared_data

    card = constant_card(tmp_path, mpp=1.0)
    out = tmp_path / "out"
    assert main(["segment", str(shared_data(SLIDE)), "--model", str(card), "--out", str(out), "--vector",
                 "--tiff"]) == 0
    folder = out / "CMU-1-Small-Region"
    group = zarr.open_group(str(folder / "image.ome.zarr"), mode="r")
    Image.from_zarr(group)
    omero = group.attrs["ome"]["omero"]
    assert [(c["label"], c["color"]) for c in omero["channels"]] == [("red", "FF0000"), ("green", "00FF00"),
                                                                    ("blue", "0000FF")]
    assert all(c["window"]["start"] == 0 and c["window"]["end"] == 255 for c in omero["channels"])
    with rasterio.open(folder / "labels.tif") as labels:
        assert float(labels.tags()["TIFFTAG_XRESOLUTION"]) == pytest.approx(1e4 / 1.0, rel=0.01)  # 1 µm/px

    annotations = json.loads((folder / "classes.geojson").read_text())
    assert annotations["type"] == "FeatureCollection" and annotations["features"]
    feature = annotations["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"] == {"name": "class1", "color": list(default_colour(1))}
    width, height = 2220, 2967  # level 0
    coordinates = np.concatenate([shapely.get_coordinates(shapely.geometry.shape(f["geometry"]))
                                  for f in annotations["features"]])
    assert coordinates[:, 0].max() > width * 0.9 and coordinates[:, 0].max() <= width + 3
    assert coordinates[:, 1].max() <= height + 3


def test_volumes_carry_the_label_intent_and_tables_for_slicer_and_itk_snap(ray_cluster, tmp_path):
    import nibabel as nib

    from test_stitching import conv_net, torchscript_card
    from training import CT_VOLUME, shared_data

    card = torchscript_card(tmp_path, conv_net(3, 1, 2), 3, 1, 2, tile=16)
    out = tmp_path / "out"
    assert main(["segment", str(shared_data(CT_VOLUME)), "--model", str(card), "--out", str(out), "--block",
                 "32"]) == 0
    folder = out / "example_ct_sm"
    assert nib.load(folder / "labels.nii.gz").header.get_intent()[0] == "label"
    slicer = [line.split() for line in (folder / "labels.ctbl").read_text().splitlines() if not line.startswith("#")]
    # The card gives no colours: the classes get the default palette's, distinct ones.
    assert slicer == [[str(i), f"class{i}", *map(str, default_colour(i)), "255"] for i in (0, 1)]
    itksnap = [line for line in (folder / "labels.itksnap.txt").read_text().splitlines() if not line.startswith("#")]
    assert [line.split()[0] for line in itksnap] == ["0", "1"] and itksnap[1].endswith('"class1"')


def test_areas_are_printed_in_human_units(ray_cluster, scene_outputs, capsys):
    assert main(["stats", str(scene_outputs), "--by", "class"]) == 0
    table = capsys.readouterr().out
    assert "km²" in table and "ha" in table and " m2" not in table


def overlaid_pixel_by_pixel(shown: np.ndarray, labels: np.ndarray, classes) -> np.ndarray:
    """The preview's pixels as its first version computed them, for every pixel."""
    from pipelines.outputs.preview import OVERLAY_ALPHA, stretch_pixels

    rgb = stretch_pixels(shown)
    rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb
    palette = np.zeros((256, 3), dtype=np.float32)
    for c in classes:
        palette[c.id] = c.color
    blend = np.where((labels != 255)[..., None], (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * palette[labels], rgb)
    return blend.round().astype(np.uint8)


@pytest.mark.parametrize("bands", [(0, 1, 2), (1,)])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_previews_of_8_and_16_bit_bands_by_table_are_the_pixel_by_pixel_bytes(bands, dtype, tmp_path):
    """8- and 16-bit bands are stretched (and 8-bit ones overlaid) through tables of every
    value: the same bytes as computing each pixel, on the real scene's pixels (with a corner
    without labels) and on degenerate bands (one value; two values; one pixel)."""
    from pipelines.outputs.preview import histogram_percentiles, preview_pixels

    with rasterio.open(write_tiled_scene(tmp_path / "scene.tif", 300)) as src:
        real = np.moveaxis(src.read(), 0, -1)[..., list(bands)].astype(dtype)
    if dtype == "uint16":
        real = real * 256 + 3  # 16-bit values across their range
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, real.shape[:2]).astype(np.uint8)
    labels[:40, :70] = 255
    classes = L1C.classes
    one_value = np.full_like(real, 7)
    two_values = (rng.integers(0, 2, real.shape) * 200).astype(dtype)
    for shown in (real, one_value, two_values, real[:1, :3]):
        labelled = labels[: shown.shape[0], : shown.shape[1]]
        assert np.array_equal(preview_pixels(shown, labelled, classes), overlaid_pixel_by_pixel(shown, labelled, classes))
    # Six values whose 98th percentile numpy interpolates down from the upper neighbour: a
    # different last bit from interpolating up.
    interpolated_down = np.array([151, 234, 91, 25, 52, 18], dtype=dtype)
    for values in (real[..., 0].ravel(), two_values.ravel(), real[:1, :1].ravel(), real[:7, :1].ravel(),
                   interpolated_down):
        assert np.array_equal(histogram_percentiles(np.bincount(values)),
                              np.percentile(values.astype(np.float32), [2, 98]))
