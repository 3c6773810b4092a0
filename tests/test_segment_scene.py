"""`segpipe segment` on the real Sentinel-2 scene with the real ukis-csmask U-Net."""

import itertools

import numpy as np
import onnxruntime as ort
import pyarrow.compute as pc
import rasterio
from PIL import Image

from flows.cli import main
from pipelines.blending import gaussian_weights
from pipelines.model_card import load_card
from pipelines.stats import read_stats
from pipelines.tiling import TileGrid
from pipelines.zarr_stores import NODATA_LABEL


def test_labels_are_a_cog_with_the_source_georeferencing(sentinel_scene, segmented_scene):
    labels_path = segmented_scene / "sentinel2_scene" / "labels.tif"
    with rasterio.open(sentinel_scene) as src, rasterio.open(labels_path) as out:
        assert out.crs == src.crs
        assert out.transform == src.transform
        assert (out.height, out.width) == (src.height, src.width)
        assert out.count == 1 and out.dtypes[0] == "uint8"
        assert out.nodata == NODATA_LABEL
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert set(np.unique(out.read(1))) <= {0, 1, 2}


def test_parquet_counts_sum_to_valid_pixels_and_match_a_recount(sentinel_scene, segmented_scene):
    with rasterio.open(sentinel_scene) as src:
        pixels = src.read()
        valid_pixels = int((~np.all(pixels == src.nodata, axis=0)).sum())
    labels = rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif").read(1)
    stats = read_stats(segmented_scene / "stats").to_pylist()
    assert [row["class_name"] for row in stats] == ["clear", "cloud", "shadow"]
    assert sum(row["pixel_count"] for row in stats) == valid_pixels
    for row in stats:
        assert row["pixel_count"] == int((labels == row["class_id"]).sum())
        assert row["area_unit"] == "m2"
        assert row["area"] == row["pixel_count"] * 100.0  # 10 m pixels
        assert row["model"] == "s2-cloud" and row["image"] == "sentinel2_scene"


def test_labels_equal_a_whole_image_reference_of_the_same_model(sentinel_scene, segmented_scene):
    """Stitched labels equal a plain computation: every tile through onnxruntime into
    full-size fp32 sums with Gaussian weights, argmax."""
    card = load_card("s2-cloud")
    with rasterio.open(sentinel_scene) as src:
        pixels = src.read().astype(np.float32)
    mean = np.asarray(card.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(card.std, dtype=np.float32)[:, None, None]
    x = (pixels * np.float32(card.scale) - mean) / std
    height, width = x.shape[1:]
    grid = TileGrid((height, width), 256, card.overlap)
    x = np.pad(x, ((0, 0), (0, max(0, 256 - height)), (0, max(0, 256 - width))), mode="reflect")
    session = ort.InferenceSession(str(card.weights), providers=["CPUExecutionProvider"])
    weights = gaussian_weights((256, 256))
    sums = np.zeros((3, x.shape[1], x.shape[2]), dtype=np.float32)
    for row, col in itertools.product(*grid.origins):
        tile = x[None, :, row : row + 256, col : col + 256]
        batch = np.repeat(tile, 4, axis=0)  # the pipeline's batch size
        logits = session.run(None, {"input": batch})[0][0]
        exp = np.exp(logits - logits.max(axis=0))
        sums[:, row : row + 256, col : col + 256] += exp / exp.sum(axis=0) * weights
    reference = sums[:, :height, :width].argmax(axis=0)
    labels = rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif").read(1)
    np.testing.assert_array_equal(labels, reference)


def test_preview_shows_the_image_with_a_legend(sentinel_scene, segmented_scene):
    preview = Image.open(segmented_scene / "sentinel2_scene" / "preview.png")
    assert preview.mode == "RGB"
    assert preview.width == 300 and preview.height > 200  # the legend sits under the image
    legend = np.asarray(preview)[200:]
    card = load_card("s2-cloud")
    for c in card.classes:
        assert (legend == c.color).all(axis=-1).any(), f"legend has no swatch for {c.name}"


def test_labels_do_not_depend_on_the_block_size(ray_cluster, sentinel_scene, segmented_scene, tmp_path):
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", str(tmp_path), "--block", "256"]) == 0
    small_blocks = rasterio.open(tmp_path / "sentinel2_scene" / "labels.tif").read(1)
    one_block = rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif").read(1)
    np.testing.assert_array_equal(small_blocks, one_block)


def test_nodata_pixels_get_the_nodata_label_and_are_not_counted(ray_cluster, sentinel_scene, tmp_path):
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    pixels[:, 50:120, 30:90] = 0  # nodata in every band
    scene = tmp_path / "holes.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    assert main(["segment", str(scene), "--model", "s2-cloud", "--out", str(tmp_path / "out")]) == 0
    labels = rasterio.open(tmp_path / "out" / "holes" / "labels.tif").read(1)
    assert (labels[50:120, 30:90] == NODATA_LABEL).all()
    assert (labels != NODATA_LABEL).sum() == 200 * 300 - 70 * 60
    stats = read_stats(tmp_path / "out" / "stats")
    assert pc.sum(stats["pixel_count"]).as_py() == 200 * 300 - 70 * 60
