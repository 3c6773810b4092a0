"""The same archive on one node and on two nodes of a real local Ray cluster.

    python -m flows.benchmarks.cluster_scaling [--images 4] [--side 768] [--block 128]

Each node is a `ray start` raylet with one CPU and runs one CPU actor (workers = nodes). The
flow runs in this process, joining each cluster with `ray_address` as `segpipe run
--ray-address` does; each cluster gets a fresh output root. Prints the wall time of the run,
the speed-up of two nodes over one, and each node's share of the blocks. The driver's own
work (ingest, COG, statistics) runs on this machine's cores beside the nodes, so the speed-up
also shows how much of a run is the driver's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path

from flows.local_cluster import local_ray_cluster
from flows.synthetic import write_small_net_card, write_tiled_scene


def run_on_cluster(nodes: int, archive: Path, card: Path, out: Path, block: int, token: str) -> tuple[float, dict]:
    import ray

    from flows.archive_flow import run_night
    from flows.options import RunOptions

    with local_ray_cluster(nodes=nodes, cpus_per_node=1, token=token) as cluster:
        started = time.perf_counter()
        options = RunOptions(block=block, device="cpu", workers=nodes, run_id=f"nodes-{nodes}",
                             ray_address=cluster.address)
        report = run_night(str(archive), str(card), str(out), options)
        seconds = time.perf_counter() - started
        ray.shutdown()
    if report["failed"]:
        raise RuntimeError(f"images failed on {nodes} node(s): {report['failed']}")
    return seconds, report["blocks_by_node"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="segpipe-cluster-bench-"))
    archive = folder / "archive"
    archive.mkdir()
    for index in range(args.images):
        write_tiled_scene(archive / f"scene{index}.tif", args.side)
    card = write_small_net_card(folder, tile=128)
    # Both clusters share one token: this process's Ray client reads it once.
    token = secrets.token_hex(32)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    blocks = args.images * (-(-args.side // args.block)) ** 2
    print(f"{args.images} images of {args.side}^2 px, block {args.block} ({blocks} blocks), small conv net, "
          f"tile 128, one CPU actor per 1-CPU node, {os.cpu_count()} cores on this machine")
    seconds = {}
    for nodes in (1, 2):
        seconds[nodes], by_node = run_on_cluster(nodes, archive, card, folder / f"out-{nodes}", args.block, token)
        shares = ", ".join(f"node {node[:8]}: {count} blocks ({count / blocks:.0%})"
                           for node, count in sorted(by_node.items(), key=lambda item: -item[1]))
        print(f"{nodes} node{'s' if nodes > 1 else ' '}: {seconds[nodes]:7.1f} s, "
              f"{args.images * args.side ** 2 / 1e6 / seconds[nodes]:.2f} Mpx/s   {shares}", flush=True)
    print(f"speed-up 2 nodes / 1 node: {seconds[1] / seconds[2]:.2f}x")


if __name__ == "__main__":
    main()
