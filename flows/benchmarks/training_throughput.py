"""Training throughput of `segpipe train` (Ray Train, TorchTrainer) against a plain PyTorch loop
over the same tiles, measured in one run.

    python -m flows.benchmarks.training_throughput [--steps 100] [--workers 1] [--device cpu|cuda]
                                                    [--architecture unet_padded] [--tile 128] [--batch 4]

The data is the real nuclei image stardist ships (512 x 512, with its mask as foreground), the
training pair prepared as `segpipe train` prepares it. Both loops run the same plan: the same
network, seed, tile sampler, augmentation, loss and optimiser, the same torch threads. Ray
Train's figure is the one its workers measure over their training steps (tiles of every worker
per second; start-up and validation left out); the plain loop runs in this process, one
worker, no Ray, no DDP. The plain loop runs first and again last, and the ratio is taken
against the mean of the two, so that drift of the machine shows.
"""

from __future__ import annotations

import argparse
import importlib.resources
import tempfile
from pathlib import Path

import numpy as np


def nuclei_pair(folder: Path) -> tuple[str, str]:
    import tifffile

    images = importlib.resources.files("stardist") / "data" / "images"
    image, mask = folder / "nuclei.tif", folder / "nuclei_mask.tif"
    tifffile.imwrite(image, tifffile.imread(str(images / "img2d.tif")))
    tifffile.imwrite(mask, (tifffile.imread(str(images / "mask2d.tif")) > 0).astype(np.uint8))
    return str(image), str(mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per measurement (default 100)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--architecture", default="unet_padded")
    parser.add_argument("--architecture-options", default="base_features=16,depth=3")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)

    from flows.training_run import (
        RUN_NAME, checkpoint_storage, options_from_values, parse_option_values, prepare_training,
    )
    from segworkers.cluster import ensure_ray
    from segworkers.training import plain_loop_throughput, run_training

    with tempfile.TemporaryDirectory(prefix="segpipe-train-bench-") as folder:
        image, mask = nuclei_pair(Path(folder))
        out = str(Path(folder) / "model")
        options = options_from_values(
            architecture=args.architecture, architecture_options=parse_option_values(args.architecture_options),
            classes="background,nucleus", tile=args.tile, batch=args.batch, epochs=1, steps_per_epoch=args.steps,
            workers=args.workers, device=args.device, validation_tiles=4,
        ).resolved(out)
        _, plan = prepare_training(image, mask, out, options)
        print(f"{args.architecture} ({args.architecture_options}), tile {args.tile}, batch {args.batch}, "
              f"{args.steps} steps, {options.threads} torch thread(s) per worker, {options.device}", flush=True)
        ensure_ray()  # first: its processes take their share of the CPUs in both measurements
        before = plain_loop_throughput(plan, args.steps)
        print(f"plain PyTorch loop, this process       {before:8.2f} tiles/s", flush=True)
        storage_path, _ = checkpoint_storage(out)
        result = run_training(plan, storage_path, options.workers, name=RUN_NAME)
        ray_train = result.metrics["tiles_per_second"]
        print(f"Ray Train, {options.workers} worker(s)                  {ray_train:8.2f} tiles/s", flush=True)
        after = plain_loop_throughput(plan, args.steps)
        print(f"plain PyTorch loop again               {after:8.2f} tiles/s", flush=True)
        baseline = (before + after) / 2
        print(f"Ray Train / plain loop                 {ray_train / baseline:8.2f} "
              f"(per worker {ray_train / options.workers / baseline:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
