"""Throughput and peak memory of tiled inference, one model, tile and overlap, one image.

    python -m flows.benchmarks.stitching [--side 4096] [--tile 256] [--overlap 0.25] [--batch 4]

Prints Mpx/s (of tile pixels for the model alone, of image pixels otherwise) and the peak RSS
of each part, each run in its own process tree:
  model     the model alone on full batches of tiles
  pipeline  segpipe's stitching: the image already in Zarr, blocks on Ray actors, Gaussian
            blending in fp32 per block, labels written to Zarr
  monai     MONAI sliding_window_inference with the same model, tile, overlap and Gaussian
            mode (sigma 1/8), output on the CPU as a user with a large image must keep it
The model is unet_padded (base 16, depth 3; random weights) over the real Sentinel-2 scene
tiled out to the image size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from flows.benchmarks.measure import gib, python_module, run_sampled
from flows.benchmarks.scenes import write_tiled_scene

THREADS = 2


def write_unet_card(folder: Path, tile: int, overlap: float) -> Path:
    from segworkers import models

    torch.manual_seed(0)
    net = models.create("unet_padded", num_classes=4, in_channels=3, base_features=16, depth=3)
    torch.save(net.state_dict(), folder / "unet.pt")
    card = {
        "name": "unet-bench", "format": "registry", "architecture": "unet_padded",
        "architecture_options": {"base_features": 16, "depth": 3}, "weights": "unet.pt",
        "tile": {"size": tile, "overlap": overlap},
        "input": {"bands": [1, 2, 3], "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3},
        "classes": [{"id": i, "name": f"class{i}"} for i in range(4)],
    }
    path = folder / "unet.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def model_alone(card_path: Path, tile: int, batch: int, seconds: float = 10.0) -> dict:
    from pipelines.model_card import load_card
    from segworkers.tile_models import load_tile_model

    model = load_tile_model(load_card(card_path), "cpu", THREADS)
    inputs = np.random.default_rng(0).standard_normal((batch, 3, tile, tile), dtype=np.float32)
    model(inputs)  # warm-up
    started, tiles = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        model(inputs)
        tiles += batch
    return {"mpx_per_s": tiles * tile * tile / 1e6 / (time.perf_counter() - started)}


def pipeline(card_path: Path, scene: Path, batch: int, workdir: Path) -> dict:
    import ray

    from flows.image_run import ingest, plan_image, resolve_settings, segment
    from pipelines.model_card import load_card

    ray.init(num_cpus=THREADS, include_dashboard=False, logging_level="ERROR")
    card = load_card(card_path)
    settings = resolve_settings(card, batch=batch, device="cpu")
    run = plan_image(scene, card, settings, workdir / "pipeline-out", card.digest())
    ingest(run)
    started = time.perf_counter()
    summary = segment(run)
    seconds = time.perf_counter() - started
    return {"mpx_per_s": summary.class_counts.sum() / 1e6 / seconds, "tiles": summary.tiles}


def monai_sliding_window(card_path: Path, scene: Path, tile: int, overlap: float, batch: int) -> dict:
    import rasterio
    from monai.inferers import sliding_window_inference

    from pipelines.model_card import load_card
    from segworkers.tile_models import build_torch_module

    torch.set_num_threads(THREADS)
    card = load_card(card_path)
    net = build_torch_module(card).eval()
    with rasterio.open(scene) as src:
        image = torch.from_numpy(src.read().astype(np.float32))[None]
    image = (image / 255 - 0.5) / 0.25
    started = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            image, roi_size=(tile, tile), sw_batch_size=batch, predictor=net, overlap=overlap,
            mode="gaussian", sigma_scale=0.125, sw_device="cpu", device="cpu",
        )
        labels = logits.argmax(1)
    seconds = time.perf_counter() - started
    return {"mpx_per_s": labels.numel() / 1e6 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--part", choices=("model", "pipeline", "monai"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        card, scene = args.workdir / "unet.yaml", args.workdir / "scene.tif"
        result = {
            "model": lambda: model_alone(card, args.tile, args.batch),
            "pipeline": lambda: pipeline(card, scene, args.batch, args.workdir),
            "monai": lambda: monai_sliding_window(card, scene, args.tile, args.overlap, args.batch),
        }[args.part]()
        print(json.dumps(result))
        return

    workdir = Path(tempfile.mkdtemp(prefix="segpipe-stitching-"))
    write_unet_card(workdir, args.tile, args.overlap)
    write_tiled_scene(workdir / "scene.tif", args.side)
    print(f"unet_padded (base 16, depth 3), {args.side}^2 RGB, tile {args.tile}, overlap {args.overlap}, "
          f"batch {args.batch}, {THREADS} threads, CPU")
    figures = {}
    for part in ("model", "pipeline", "monai"):
        measured = run_sampled(python_module(
            "flows.benchmarks.stitching", "--part", part, "--workdir", str(workdir), "--side", str(args.side),
            "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch", str(args.batch),
        ))
        figures[part] = measured.result["mpx_per_s"]
        print(f"{part:9s} {figures[part]:8.2f} Mpx/s   peak RSS {gib(measured.peak_rss)}", flush=True)
    stride = round(args.tile * (1 - args.overlap))
    recompute = (args.tile / stride) ** 2
    print(f"each pixel is computed about {recompute:.2f} times: ideal stitched rate {figures['model'] / recompute:.2f} Mpx/s")
    print(f"pipeline / ideal {figures['pipeline'] / (figures['model'] / recompute):.2f}, "
          f"pipeline / monai {figures['pipeline'] / figures['monai']:.2f}")


if __name__ == "__main__":
    main()
