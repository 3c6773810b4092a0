"""Seam-free stitching: labels do not depend on blocks or workers, equal a whole-image
reference computation, and the halo, TTA, background skipping and 3D paths do what they say."""

import itertools

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr
from torch import nn

from flows.cli import main
from flows.options import RunOptions
from flows.stages import segment_store
from pipelines.blending import gaussian_weights
from pipelines.model_card import load_card
from pipelines.tiling import TileGrid
from pipelines.zarr_stores import NODATA_LABEL
from segworkers.tile_models import load_tile_model


def conv_net(dims: int, in_channels: int, classes: int, same: bool = True, kernel: int = 3, seed: int = 0) -> nn.Module:
    """A small random conv net: output of the input's size, or (valid convolutions) smaller by 3 x (kernel - 1)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    padding = kernel // 2 if same else 0
    return nn.Sequential(
        conv(in_channels, 8, kernel, padding=padding), nn.ReLU(),
        conv(8, 8, kernel, padding=padding), nn.ReLU(),
        conv(8, classes, kernel, padding=padding),
    ).eval()


def torchscript_card(tmp_path, net, dims, in_channels, classes, tile, overlap=0.25, halo=0, name="net"):
    example = torch.zeros((2, in_channels) + (tile + 2 * halo,) * dims)
    torch.jit.trace(net, example).save(str(tmp_path / f"{name}.ts"))
    card = {
        "name": name, "format": "torchscript", "weights": f"{name}.ts", "spatial_dims": dims,
        "tile": {"size": tile, "overlap": overlap, "halo": halo},
        "input": {"bands": list(range(1, in_channels + 1)), "scale": 1e-3,
                  "mean": [1.5] * in_channels, "std": [0.5] * in_channels},
        "classes": [{"id": i, "name": f"class{i}"} for i in range(classes)],
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(card))
    return tmp_path / f"{name}.yaml"


def reference_labels(card_path, pixels: np.ndarray, batch: int = 4, tta: bool = False,
                     nodata: float | None = None) -> np.ndarray:
    """Every tile of the grid through the model into full-size fp32 sums, argmax: no blocks.
    Pixels that are `nodata` in every band reach the model as the bands' means (0 normalised)."""
    card = load_card(card_path)
    model = load_tile_model(card, "cpu", 2)
    dims = pixels.ndim - 1
    shape = pixels.shape[1:]
    scale = (-1,) + (1,) * dims
    x = (pixels.astype(np.float32) * np.float32(card.scale) - np.asarray(card.mean, np.float32).reshape(scale)) / np.asarray(card.std, np.float32).reshape(scale)
    if nodata is not None:
        x[:, np.all(pixels == nodata, axis=0)] = 0
    tile, halo = card.tile_size, model.halo
    grid = TileGrid(shape, tile, card.overlap)
    pads = [(0, 0)] + [(halo, max(0, tile - s) + halo) for s in shape]
    x = np.pad(x, pads, mode="reflect")
    weights = gaussian_weights((tile,) * dims)
    sums = np.zeros((card.num_classes,) + tuple(max(s, tile) for s in shape), dtype=np.float32)
    flips = [c for r in range(dims + 1) for c in itertools.combinations(range(1, dims + 1), r)] if tta else [()]
    for origin in itertools.product(*grid.origins):
        window = tuple(slice(o, o + tile + 2 * halo) for o in origin)
        probabilities = []
        for axes in flips:
            inputs = np.flip(x[(slice(None), *window)], axes) if axes else x[(slice(None), *window)]
            logits = model(np.repeat(np.ascontiguousarray(inputs)[None], batch, axis=0))[0]
            logits = logits[(slice(None), *(slice((l - tile) // 2, (l - tile) // 2 + tile) for l in logits.shape[1:]))]
            exp = np.exp(logits - logits.max(axis=0))
            p = exp / exp.sum(axis=0)
            probabilities.append(np.flip(p, axes) if axes else p)
        p = np.mean(probabilities, axis=0, dtype=np.float32) if tta else probabilities[0]
        sums[(slice(None), *(slice(o, o + tile) for o in origin))] += p * weights
    return sums[(slice(None), *(slice(0, s) for s in shape))].argmax(axis=0).astype(np.uint8)


@pytest.fixture(scope="module")
def large_scene(sentinel_scene, tmp_path_factory):
    """A 2300 x 2100 real-data scene: the Sentinel-2 scene mirrored out to size, 4 bands."""
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read([1, 2, 3, 4])
    tiled = np.pad(pixels, ((0, 0), (0, 2300 - 200), (0, 2100 - 300)), mode="symmetric")
    path = tmp_path_factory.mktemp("large") / "large.tif"
    profile.update(count=4, height=2300, width=2100, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(tiled)
    return path


def segment_labels(scene, card, out, *options):
    assert main(["segment", str(scene), "--model", str(card), "--out", str(out), "--batch", "4", *options]) == 0
    with rasterio.open(out / scene.stem / "labels.tif") as labels:
        return labels.read(1)


def test_labels_do_not_depend_on_blocks_or_workers_and_equal_the_reference(ray_cluster, large_scene, tmp_path):
    card = torchscript_card(tmp_path, conv_net(2, 4, 3), 2, 4, 3, tile=128)
    one_block = segment_labels(large_scene, card, tmp_path / "b4096", "--block", "4096", "--workers", "1")
    many_blocks = segment_labels(large_scene, card, tmp_path / "b1024", "--block", "1024", "--workers", "4")
    np.testing.assert_array_equal(many_blocks, one_block)
    with rasterio.open(large_scene) as src:
        reference = reference_labels(card, src.read())
    np.testing.assert_array_equal(one_block, reference)
    assert len(np.unique(one_block)) == 3


def test_images_smaller_than_a_tile_are_padded_and_cropped_back(ray_cluster, sentinel_scene, tmp_path):
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read([1, 2, 3, 4], window=((10, 60), (20, 90)))
    tiny = tmp_path / "tiny.tif"
    profile.update(count=4, height=50, width=70, transform=src.window_transform(((10, 60), (20, 90))))
    with rasterio.open(tiny, "w", **profile) as dst:
        dst.write(pixels)
    card = torchscript_card(tmp_path, conv_net(2, 4, 3), 2, 4, 3, tile=64)
    labels = segment_labels(tiny, card, tmp_path / "out")
    assert labels.shape == (50, 70)
    np.testing.assert_array_equal(labels, reference_labels(card, pixels))


def test_a_model_with_a_halo_gets_its_context(ray_cluster, large_scene, tmp_path):
    """Valid convolutions: the output is 6 px smaller than the input, the card declares halo 3."""
    card = torchscript_card(tmp_path, conv_net(2, 4, 3, same=False), 2, 4, 3, tile=96, halo=3)
    with rasterio.open(large_scene) as src:
        pixels = src.read(window=((0, 700), (0, 500)))
        profile = src.profile
    scene = tmp_path / "crop.tif"
    profile.update(height=700, width=500)
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    labels = segment_labels(scene, card, tmp_path / "out", "--block", "192")
    np.testing.assert_array_equal(labels, reference_labels(card, pixels))


def test_tta_averages_flips(ray_cluster, sentinel_scene, tmp_path):
    with rasterio.open(sentinel_scene) as src:
        pixels = src.read([1, 2, 3, 4])
    pointwise = torchscript_card(tmp_path, conv_net(2, 4, 3, kernel=1), 2, 4, 3, tile=64, name="pointwise")
    plain = segment_labels(sentinel_scene, pointwise, tmp_path / "plain", "--probabilities")
    flipped = segment_labels(sentinel_scene, pointwise, tmp_path / "tta", "--tta", "--probabilities")
    np.testing.assert_array_equal(plain, flipped)  # a flip-equivariant model: TTA changes nothing
    spatial = torchscript_card(tmp_path, conv_net(2, 4, 3, kernel=5, seed=3), 2, 4, 3, tile=64, name="spatial")
    plain_p = zarr.open_array(str(segment_dir(tmp_path, "plain-s", sentinel_scene, spatial) / "probabilities.zarr"))[:]
    tta_p = zarr.open_array(str(segment_dir(tmp_path, "tta-s", sentinel_scene, spatial, "--tta") / "probabilities.zarr"))[:]
    assert np.abs(plain_p.astype(int) - tta_p.astype(int)).max() > 0  # and it does change other models
    tta_labels = rasterio.open(tmp_path / "tta-s" / "sentinel2_scene" / "labels.tif").read(1)
    np.testing.assert_array_equal(tta_labels, reference_labels(spatial, pixels, tta=True))


def segment_dir(tmp_path, name, scene, card, *options):
    segment_labels(scene, card, tmp_path / name, "--probabilities", *options)
    return tmp_path / name / scene.stem


def test_tiles_without_data_are_skipped_and_counted(ray_cluster, large_scene, tmp_path, capsys):
    with rasterio.open(large_scene) as src:
        profile, pixels = src.profile, src.read()
    pixels[:, 300:1500, 200:1900] = 0  # nodata in every band
    scene = tmp_path / "holes.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    card = torchscript_card(tmp_path, conv_net(2, 4, 3), 2, 4, 3, tile=128)
    labels = segment_labels(scene, card, tmp_path / "out", "--block", "1024")
    out = capsys.readouterr().out

    grid = TileGrid((2300, 2100), 128, 0.25)
    valid = ~np.all(pixels == 0, axis=0)
    empty = sum(not valid[r : r + 128, c : c + 128].any() for r, c in itertools.product(*grid.origins))
    assert empty > 50
    assert f"{len(grid) - empty} segmented, {empty} skipped (no valid pixels)" in out
    assert (labels[~valid] == NODATA_LABEL).all()
    reference = reference_labels(card, pixels, nodata=0)
    np.testing.assert_array_equal(labels[valid], reference[valid])


def test_probabilities_are_quantised_means_without_nan(ray_cluster, sentinel_scene, tmp_path):
    card = torchscript_card(tmp_path, conv_net(2, 4, 3), 2, 4, 3, tile=64)
    folder = segment_dir(tmp_path, "p", sentinel_scene, card)
    probabilities = zarr.open_array(str(folder / "probabilities.zarr"))[:]
    labels = rasterio.open(folder / "labels.tif").read(1)
    assert probabilities.dtype == np.uint8 and probabilities.shape == (3, 200, 300)
    total = probabilities.astype(int).sum(axis=0)
    assert total.min() >= 255 - 2 and total.max() <= 255 + 2  # each class rounded by at most 0.5
    best = probabilities.max(axis=0)
    assert (probabilities[labels, np.arange(200)[:, None], np.arange(300)] >= best - 1).all()


@pytest.fixture(scope="module")
def ct_volume(tmp_path_factory):
    """The real CT volume as a (band, D, H, W) Zarr image, HU clipped and offset to be positive."""
    import nibabel as nib

    from training import CT_VOLUME, shared_data

    volume = np.asarray(nib.load(shared_data(CT_VOLUME)).dataobj).astype(np.int16)
    volume = np.transpose(np.clip(volume, -200, 300) + 200, (2, 1, 0))[None].astype(np.uint16)  # (1, D, H, W)
    store = tmp_path_factory.mktemp("ct") / "image.zarr"
    zarr.create_array(store=str(store), data=volume, chunks=(1, 16, 16, 16), attributes={"nodata": None})
    return store, volume


def test_3d_labels_do_not_depend_on_blocks_or_workers_and_equal_the_reference(ray_cluster, ct_volume, tmp_path):
    store, volume = ct_volume
    card_path = torchscript_card(tmp_path, conv_net(3, 1, 4), 3, 1, 4, tile=16, overlap=0.5)
    card = load_card(card_path)
    results = {}
    for block, workers in ((64, 1), (16, 2)):
        options = RunOptions(block=block, device="cpu", workers=workers).resolved(card)
        labels_store = tmp_path / f"labels-{block}.zarr"
        summary = segment_store(card, options, image_store=store, label_store=labels_store)
        results[block] = zarr.open_array(str(labels_store))[:]
        assert summary.class_counts.sum() == volume[0].size
    np.testing.assert_array_equal(results[16], results[64])
    np.testing.assert_array_equal(results[64], reference_labels(card_path, volume))
    assert len(np.unique(results[64])) > 1


def test_crf_postprocessing_from_the_card(ray_cluster, tmp_path):
    """`postprocess: crf` runs the dense CRF on each block's stitched probabilities with a halo:
    on the real nuclei image, a weak random model's labels come out smoother."""
    from training import nuclei_halves

    x, _, _, _ = nuclei_halves()
    pixels = (x[0].numpy() * 200 + 20).clip(1, 255).astype(np.uint8)  # (1, 512, 256)
    scene = tmp_path / "nuclei.tif"
    georeference = {"crs": "EPSG:32719", "transform": rasterio.transform.from_origin(600000, 4700000, 10, 10)}
    with rasterio.open(scene, "w", driver="GTiff", width=256, height=512, count=1, dtype="uint8", **georeference) as dst:
        dst.write(pixels)
    card_path = torchscript_card(tmp_path, conv_net(2, 1, 2, kernel=1, seed=5), 2, 1, 2, tile=64)
    card = yaml.safe_load(card_path.read_text())
    card["input"].update(scale=1 / 255, mean=[0.3], std=[0.2])
    card_path.write_text(yaml.safe_dump(card))
    card["postprocess"] = {"name": "crf", "halo": 24, "intensity_scale": 1.0}
    crf_card = tmp_path / "crf.yaml"
    crf_card.write_text(yaml.safe_dump(card))

    plain = segment_labels(scene, card_path, tmp_path / "plain", "--block", "128")
    smoothed = segment_labels(scene, crf_card, tmp_path / "crf", "--block", "128")
    assert (plain != smoothed).mean() > 0.001

    def boundary_pixels(labels):
        return int((labels[1:] != labels[:-1]).sum() + (labels[:, 1:] != labels[:, :-1]).sum())

    assert boundary_pixels(smoothed) < 0.8 * boundary_pixels(plain)


def test_the_original_unet_gets_its_halo_from_the_registry(ray_cluster, large_scene, tmp_path):
    """The original U-Net's output is 184 px smaller than its input: with a tile of 36 px (input
    220) the tiler reads each tile with the model's declared halo of 92 and stitches exactly."""
    from segworkers import models

    torch.manual_seed(0)
    net = models.create("unet", num_classes=3, in_channels=4, base_features=4)
    assert net.halo == 92 and net.output_size(36 + 2 * 92) == 36
    for layer in net.modules():  # He initialisation keeps a deep random net's output varied
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    card = {
        "name": "unet-original", "format": "registry", "architecture": "unet",
        "architecture_options": {"base_features": 4}, "weights": "unet.pt",
        "tile": {"size": 36, "overlap": 0.25},
        "input": {"bands": [1, 2, 3, 4], "scale": 1e-3, "mean": [1.5] * 4, "std": [0.5] * 4},
        "classes": [{"id": i, "name": f"class{i}"} for i in range(3)],
    }
    card_path = tmp_path / "unet.yaml"
    card_path.write_text(yaml.safe_dump(card))
    with rasterio.open(large_scene) as src:
        pixels, profile = src.read(window=((0, 150), (0, 130))), src.profile
    scene = tmp_path / "crop.tif"
    profile.update(height=150, width=130)
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    labels = segment_labels(scene, card_path, tmp_path / "out", "--block", "72")
    reference = reference_labels(card_path, pixels)
    np.testing.assert_array_equal(labels, reference)
    assert len(np.unique(labels)) > 1
