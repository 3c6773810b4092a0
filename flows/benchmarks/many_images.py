"""A night over many images against the model alone on the same tiles, measured in one run.

    python -m flows.benchmarks.many_images [--images 400] [--side 512] [--base 16] [--depth 3]
        [--tile 256] [--overlap 0.25] [--batch 4] [--concurrency 2] [--startup-runs 3] [--keep DIR]

The archive is `--images` crops of `--side`² cut from the real Sentinel-2 demo scene tiled out
(8-bit RGB GeoTIFFs, each crop at another offset); the model is the registry's unet_padded at
`--base` features and `--depth` (random weights, 4 classes). Three measurements:
  model alone   every grid tile of every image, in full batches, through the model in this
                process (on the CPU lanes of segpipe's predictor: as many batches at once as
                the actor has threads, one torch thread each; warm-up excluded): the time the
                night cannot go below
  start-up      `segpipe run` over one image, in a process of its own, less that image's
                model time: starting Ray, Prefect's API, the actors, the model (the median
                of `--startup-runs` such nights, default 3)
  night         `segpipe run` over the archive, in a process of its own (as a user runs it)
The model alone is measured before and after the night, and the mean of the two taken.
Overhead per image = (night - start-up - model time of the images) / images, and the night's
share of the model rate = model time / night.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_archive(folder: Path, images: int, side: int) -> list[Path]:
    """`images` crops of side² from the real scene tiled out, each at another offset."""
    import rasterio

    from flows.synthetic import write_tiled_scene

    folder.mkdir(parents=True, exist_ok=True)
    columns = int(np.ceil(np.sqrt(images)))
    big = write_tiled_scene(folder.parent / "tiled.tif", side * columns // 2 + side)
    paths = []
    with rasterio.open(big) as src:
        profile = {**src.profile, "width": side, "height": side, "blockxsize": min(512, side),
                   "blockysize": min(512, side)}
        for index in range(images):
            row, col = (index // columns) * side // 2, (index % columns) * side // 2
            window = ((row, row + side), (col, col + side))
            profile["transform"] = src.window_transform(window)
            path = folder / f"chip-{index:05d}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
            paths.append(path)
    big.unlink()
    return paths


def write_card(folder: Path, base: int, depth: int, tile: int, overlap: float) -> Path:
    import torch
    import yaml

    from flows.synthetic import rgb_card
    from segworkers import models

    torch.manual_seed(0)
    options = {"base_features": base, "depth": depth}
    torch.save(models.create("unet_padded", num_classes=4, in_channels=3, **options).state_dict(), folder / "net.pt")
    card = rgb_card(f"unet-b{base}-d{depth}", tile, overlap, 4, {
        "format": "registry", "architecture": "unet_padded", "architecture_options": options, "weights": "net.pt"})
    path = folder / "net.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def model_seconds(card_path: Path, images: list[Path], batch: int, threads: int) -> tuple[float, int]:
    """Seconds the model alone takes for every grid tile of `images` (full batches), and the tiles."""
    import rasterio
    import torch

    from pipelines.model_card import load_card
    from pipelines.tiling import TileGrid
    from segworkers.predictor import CpuLanes
    from segworkers.tile_models import load_tile_model

    card = load_card(card_path)
    model = load_tile_model(card, "cpu", 1)
    lanes = CpuLanes(threads)  # as the night runs it: batches on `threads` lanes of one torch thread
    with rasterio.open(images[0]) as src:
        pixels = src.read().astype(np.float32)
    grid = TileGrid(pixels.shape[1:], card.tile_size, card.overlap)
    tiles = len(grid) * len(images)
    values = (pixels * card.scale - np.asarray(card.mean, np.float32)[:, None, None]) / \
        np.asarray(card.std, np.float32)[:, None, None]
    tile = card.tile_size
    batch_input = torch.from_numpy(np.stack([values[:, :tile, :tile]] * batch))
    for _ in lanes.map(model.forward, [batch_input] * threads):  # warm-up, every lane
        pass
    calls = -(-tiles // batch)
    started = time.perf_counter()
    for _ in lanes.map(model.forward, [batch_input] * calls):
        pass
    per_call = (time.perf_counter() - started) / calls
    lanes.close()
    return per_call * tiles / batch, tiles


def night(archive: Path, card: Path, out: Path, concurrency: int, batch: int) -> tuple[float, dict]:
    """`segpipe run` in a process of its own, through the command's own entry point (flows.command,
    as the installed script runs it): (wall seconds, its JSON report)."""
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    environment.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows", "-q", "run", str(archive), "--model", str(card), "--out", str(out),
         "--concurrency", str(concurrency), "--batch", str(batch), "--device", "cpu", "--json"],
        env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"segpipe run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--base", type=int, default=16, help="unet_padded base features (default 16)")
    parser.add_argument("--depth", type=int, default=3, help="unet_padded depth (default 3)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="lanes of the model alone: those of segpipe's CPU actor (default 2)")
    parser.add_argument("--startup-runs", type=int, default=3,
                        help="one-image nights whose median gives the start-up (default 3)")
    parser.add_argument("--keep", type=Path, help="keep the archive and outputs here (default: a temporary folder)")
    args = parser.parse_args(argv)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="segpipe-many-"))
    try:
        archive = folder / "archive"
        images = write_archive(archive, args.images, args.side)
        card = write_card(folder, args.base, args.depth, args.tile, args.overlap)
        model, tiles = model_seconds(card, images, args.batch, args.threads)
        print(f"{args.images} images of {args.side}², unet_padded base {args.base} depth {args.depth}, tile "
              f"{args.tile}, overlap {args.overlap}, batch {args.batch}: {tiles} tiles", flush=True)
        print(f"model alone        {model:8.1f} s  ({tiles / model:.1f} tiles/s, {args.threads} threads)", flush=True)
        single = folder / "single"
        single.mkdir()
        shutil.copy(images[0], single / images[0].name)
        # A one-image night varies by a second or two from run to run on a small machine: the median of a few.
        ones = [night(single, card, folder / f"out-single-{run}", args.concurrency, args.batch)[0]
                for run in range(args.startup_runs)]
        one = float(np.median(ones))
        startup = one - model / len(images)
        print(f"start-up           {startup:8.1f} s  (a night of one image, median of "
              f"{', '.join(f'{seconds:.1f}' for seconds in ones)} s)", flush=True)
        wall, report = night(archive, card, folder / "out", args.concurrency, args.batch)
        assert len(report["done"]) == args.images, report["failed"]
        print(f"night              {wall:8.1f} s  ({args.images / wall:.2f} images/s)", flush=True)
        # The model alone again after the night: this machine's speed drifts by 10-30 % over
        # minutes, and the mean of the two brackets the night.
        again, _ = model_seconds(card, images, args.batch, args.threads)
        print(f"model alone again  {again:8.1f} s  (mean of both {(model + again) / 2:.1f} s: the model time below)",
              flush=True)
        model = (model + again) / 2
        overhead = (wall - startup - model) / args.images
        print(f"overhead per image {overhead:8.3f} s")
        print(f"model / night      {model / wall:8.2f}")
        print(f"model / (night - start-up) {model / (wall - startup):.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
