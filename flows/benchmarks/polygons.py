"""Class polygons (`--vector`) against the image size: the time per megapixel should not grow
with the side.

    python -m flows.benchmarks.polygons [--sides 1500,3000,6000] [--block 2048] [--classes 3]

Each label map is smooth noise cut into `--classes` classes of equal share (regions of every
size, the largest spanning the image with thousands of holes), held in a sharded in-memory Zarr
array of `--block`-pixel shards, as the finalize stage reads the labels. Prints, per side, the
regions found (checked against scipy's count of 4-connected components), the seconds and the
seconds per megapixel, and the ratio of the last to the first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def label_map(side: int, classes: int, seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((side, side)).astype(np.float32), 6)
    return np.digitize(noise, np.quantile(noise, np.linspace(0, 1, classes + 1)[1:-1])).astype(np.uint8)


def measure(side: int, block: int, classes: int) -> dict:
    import zarr
    from scipy import ndimage

    from pipelines.polygons import class_polygons

    labels = label_map(side, classes)
    array = zarr.create_array(store=zarr.storage.MemoryStore(), shape=labels.shape, dtype="uint8",
                              chunks=(min(256, block),) * 2, shards=(block, block))
    array[:] = labels
    components = sum(ndimage.label(labels == c)[1] for c in range(classes))
    started = time.perf_counter()
    regions = sum(1 for _ in class_polygons(array))
    seconds = time.perf_counter() - started
    if regions != components:
        raise SystemExit(f"{side}²: {regions} polygons for {components} connected regions")
    return {"side": side, "regions": regions, "seconds": seconds, "per_mpx": seconds / (side * side / 1e6)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="1500,3000,6000")
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=3)
    args = parser.parse_args(argv)
    rows = [measure(int(side), args.block, args.classes) for side in args.sides.split(",")]
    for row in rows:
        print(f"{row['side']:>6}²  {row['regions']:>8} regions  {row['seconds']:7.1f} s  {row['per_mpx']:.2f} s/Mpx")
    print(f"s/Mpx at {rows[-1]['side']}² / at {rows[0]['side']}²: {rows[-1]['per_mpx'] / rows[0]['per_mpx']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
