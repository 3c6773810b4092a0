"""Peak resident memory of `segpipe segment` on a small and a huge image, same model.

    python -m flows.benchmarks.memory [--small 4096] [--large 32768] [--workdir DIR]

Both images tile the real Sentinel-2 demo scene (8-bit RGB); the model is a small random
conv net. Prints the peak RSS of the whole process tree (driver, Ray, workers) for each run
and their ratio: host memory should depend on tile x batch x block, not on the image.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from flows.benchmarks.measure import gib, python_module, run_sampled
from flows.synthetic import write_small_net_card, write_tiled_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=4096)
    parser.add_argument("--large", type=int, default=32768)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, help="where the scenes and outputs go (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    card = write_small_net_card(workdir)
    peaks = {}
    for side in (args.small, args.large):
        started = time.perf_counter()
        scene = write_tiled_scene(workdir / f"scene{side}.tif", side)
        print(f"{side}^2 scene written in {time.perf_counter() - started:.0f} s", flush=True)
        out = workdir / f"out{side}"
        shutil.rmtree(out, ignore_errors=True)
        measured = run_sampled(python_module(
            "flows.cli", "segment", str(scene), "--model", str(card), "--out", str(out),
            "--block", str(args.block), "--device", "cpu",
        ))
        peaks[side] = measured.peak_rss
        print(f"{side}^2 ({side * side / 1e6:,.0f} Mpx): segpipe segment {measured.seconds:.0f} s, "
              f"peak RSS {gib(measured.peak_rss)} ({side * side / 1e6 / measured.seconds:.2f} Mpx/s)", flush=True)
        scene.unlink()
        shutil.rmtree(out, ignore_errors=True)
    print(f"peak RSS ratio {args.large}^2 / {args.small}^2: {peaks[args.large] / peaks[args.small]:.2f}")


if __name__ == "__main__":
    main()
