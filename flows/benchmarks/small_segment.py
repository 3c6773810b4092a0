"""One small `segpipe segment`: in a process of its own against a resident server, and the
model alone on the same tiles, measured in one run.

    python -m flows.benchmarks.small_segment [--side 512] [--base 4] [--depth 2] [--tile 256]
        [--overlap 0.25] [--batch 4] [--repeats 5] [--keep DIR]

The image is a side² crop of the real Sentinel-2 demo scene tiled out (8-bit RGB GeoTIFF). The
model is the registry's unet_padded at `--base` features and `--depth` (random weights, 4
classes). Each figure is the median of `--repeats` runs of the command as a user types it
(`segpipe -q segment IMAGE --model CARD --out DIR --device cpu`):
  model alone     the image's grid tiles through the model in this process, warm (the least
                  any segment of it can take)
  own process     SEGPIPE_SERVER=off: Python, the imports, the model and the work
  server start    `segpipe serve --detach` until it listens (paid once)
  served          the same command handed to that server
The outputs of both ways are compared byte for byte.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.benchmarks.many_images import model_seconds, write_archive, write_card

SEGPIPE = Path(sys.executable).parent / "segpipe"


def timed(command: list[str], server: Path | str) -> float:
    environment = {**os.environ, "SEGPIPE_SERVER": str(server)}
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--base", type=int, default=4, help="unet_padded base features (default 4)")
    parser.add_argument("--depth", type=int, default=2, help="unet_padded depth (default 2)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="keep the image and outputs here (default: a temporary folder)")
    args = parser.parse_args(argv)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="segpipe-small-"))
    server = folder / "server" / "segpipe.sock"
    try:
        [image] = write_archive(folder / "archive", 1, args.side)
        card = write_card(folder, args.base, args.depth, args.tile, args.overlap)
        import torch

        model, tiles = model_seconds(card, [image], args.batch, torch.get_num_threads())
        print(f"one {args.side}² image, unet_padded base {args.base} depth {args.depth}, tile {args.tile}, overlap "
              f"{args.overlap}, batch {args.batch}: {tiles} tiles; median of {args.repeats} runs each", flush=True)
        print(f"model alone    {model:6.3f} s  ({torch.get_num_threads()} threads, warm)", flush=True)

        def segment(out: str) -> list[str]:
            return [str(SEGPIPE), "-q", "segment", str(image), "--model", str(card), "--out", str(folder / out),
                    "--device", "cpu", "--batch", str(args.batch)]

        own = [timed(segment(f"own-{run}"), "off") for run in range(args.repeats)]
        print(f"own process    {statistics.median(own):6.3f} s  (runs: {', '.join(f'{s:.2f}' for s in own)})",
              flush=True)
        start = timed([str(SEGPIPE), "serve", "--detach"], server)
        print(f"server start   {start:6.3f} s  (once)", flush=True)
        try:
            served = [timed(segment(f"served-{run}"), server) for run in range(args.repeats)]
        finally:
            timed([str(SEGPIPE), "serve", "--stop"], server)
        print(f"served         {statistics.median(served):6.3f} s  (runs: {', '.join(f'{s:.2f}' for s in served)})")
        print(f"served - model {statistics.median(served) - model:6.3f} s  (goal: at most 2 s)")
        print(f"own - model    {statistics.median(own) - model:6.3f} s")
        different = [name for name in ("labels.tif", "preview.png")
                     if (folder / "own-0" / image.stem / name).read_bytes() !=
                     (folder / "served-0" / image.stem / name).read_bytes()]
        print("outputs        " + (f"DIFFERENT: {', '.join(different)}" if different else
                                   "identical bytes (labels.tif, preview.png)"))
        return 1 if different else 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
