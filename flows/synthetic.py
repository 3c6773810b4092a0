"""Made-up inputs for tests and benchmarks: large scenes made by tiling a real image, written
window by window (bounded memory); random networks with their model cards (a small TorchScript
conv net, a tiny registry U-Net, segmentation_models_pytorch's Unet with a ResNet-34 encoder);
and statistics datasets of many nights."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
import torch
import yaml
from torch import nn

from flows.demo_scene import write_sentinel2_scene
from pipelines.model_card import ClassInfo
from pipelines.stats import ImageInfo, RunInfo, begin_run, compact, image_class_table, write_image_rows


def real_rgb_tile() -> tuple[np.ndarray, dict]:
    """The real Sentinel-2 demo scene as 8-bit RGB (bands red, green, blue; 2-98 % stretch)."""
    with tempfile.TemporaryDirectory() as tmp:
        with rasterio.open(write_sentinel2_scene(Path(tmp) / "s2.tif")) as src:
            pixels, profile = src.read([3, 2, 1]).astype(np.float32), src.profile
    low, high = np.percentile(pixels, [2, 98], axis=(1, 2), keepdims=True)
    return np.clip((pixels - low) / (high - low) * 254 + 1, 1, 255).astype(np.uint8), profile


def write_tiled_scene(path: Path, side: int, window: int = 2048) -> Path:
    """A side x side RGB GeoTIFF whose pixels repeat the real scene, mirrored at each repeat."""
    tile, profile = real_rgb_tile()
    mirrored = np.concatenate([tile, tile[:, ::-1]], axis=1)
    mirrored = np.concatenate([mirrored, mirrored[:, :, ::-1]], axis=2)
    period_y, period_x = mirrored.shape[1:]
    profile.update(
        count=3, dtype="uint8", height=side, width=side, nodata=0, tiled=True,
        blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER", num_threads="all_cpus",
    )
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, side, window):
            for col in range(0, side, window):
                rows = np.arange(row, min(row + window, side)) % period_y
                cols = np.arange(col, min(col + window, side)) % period_x
                dst.write(mirrored[:, rows][:, :, cols], window=((row, row + len(rows)), (col, col + len(cols))))
    return path


def write_small_net_card(folder: Path, tile: int = 256, overlap: float = 0.25) -> Path:
    """A 3-layer random conv net (3 bands -> 4 classes) as TorchScript, and its card."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1)
    ).eval()
    torch.jit.trace(net, torch.zeros(1, 3, tile, tile)).save(str(folder / "small-net.ts"))
    card = rgb_card("small-net", tile, overlap, 4, {"format": "torchscript", "weights": "small-net.ts"})
    path = folder / "small-net.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def rgb_card(name: str, tile: int, overlap: float, classes: int, model: dict) -> dict:
    """A card reading an 8-bit RGB scene's bands 1-3, scaled to [0, 1] and standardised."""
    return {
        "name": name, **model, "tile": {"size": tile, "overlap": overlap},
        "input": {"bands": [1, 2, 3], "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3},
        "classes": [{"id": i, "name": f"class{i}"} for i in range(classes)],
    }


def write_tiny_unet_card(folder: Path, tile: int = 256, overlap: float = 0.25) -> Path:
    """The registry's unet_padded (base 16, depth 3; random weights), 3 bands -> 4 classes."""
    from segworkers import models

    torch.manual_seed(0)
    options = {"base_features": 16, "depth": 3}
    net = models.create("unet_padded", num_classes=4, in_channels=3, **options)
    torch.save(net.state_dict(), folder / "tiny-unet.pt")
    card = rgb_card("tiny-unet", tile, overlap, 4, {
        "format": "registry", "architecture": "unet_padded", "architecture_options": options, "weights": "tiny-unet.pt",
    })
    path = folder / "tiny-unet.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def write_smp_unet_card(folder: Path, tile: int = 1024, overlap: float = 0.25, classes: int = 6) -> Path:
    """segmentation_models_pytorch Unet with a ResNet-34 encoder (random weights; the card says
    nothing of pretrained weights, so nothing is downloaded), 3 bands -> `classes`."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    options = {"encoder_name": "resnet34"}
    net = smp.create_model("Unet", in_channels=3, classes=classes, encoder_weights=None, **options)
    torch.save(net.state_dict(), folder / "unet-resnet34.pt")
    card = rgb_card("unet-resnet34", tile, overlap, classes, {
        "format": "smp", "architecture": "Unet", "architecture_options": options, "weights": "unet-resnet34.pt",
    })
    path = folder / "unet-resnet34.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


FIRST_NIGHT = dt.date(2026, 10, 1)
PIXEL_AREA = 100.0  # m², a 10 m pixel


def generate_dataset(stats_root: Path, images: int, classes: int, nights: int, seed: int = 0,
                     side: int = 1000) -> list[ClassInfo]:
    """One run per night over the same `images` (side x side pixels, some nodata), random
    class counts that sum to each image's valid pixels."""
    rng = np.random.default_rng(seed)
    class_infos = [ClassInfo(k, f"class{k:02d}", (k * 11 % 256, k * 53 % 256, k * 97 % 256)) for k in range(classes)]
    for night in range(nights):
        run_date = FIRST_NIGHT + dt.timedelta(days=night)
        run_id = f"night-{run_date.isoformat()}"
        begin_run(stats_root, run_id, run_date)
        info = RunInfo(run_id, run_date, "generated", "1", "0" * 64, 512, 0.25, "gaussian", False)
        tables = []
        for index in range(images):
            valid = int(side * side - rng.integers(0, side * side // 10))
            counts = rng.multinomial(valid, rng.dirichlet(np.full(classes, 0.5)))
            image = ImageInfo(f"scene{index:05d}", f"s3://archive/scene{index:05d}.tif", f"{index:064x}", "m2")
            tables.append(image_class_table(image, info, class_infos, counts, counts * PIXEL_AREA))
        write_image_rows(stats_root, run_id, run_date, "generated", {"image_class": pa.concat_tables(tables)})
        compact(stats_root)
    return class_infos
