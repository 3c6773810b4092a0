"""A real multi-node Ray cluster on this machine, for tests and benchmarks.

    with local_ray_cluster(nodes=2, cpus_per_node=1) as cluster:
        subprocess.run([..., "--ray-address", cluster.address], env=cluster.environment)

The head is started with `ray start --head` and every other node with `ray start --address`,
each its own raylet with its own CPU count, all on 127.0.0.1 and under one private temp
folder, with Ray's token authentication on (a fresh random token; a driver needs
`cluster.environment` to join). On exit the cluster's processes, and only those, are
stopped: `ray stop` would also stop any other Ray instance on the machine (a test session's).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

HOST = "127.0.0.1"
START_TIMEOUT_S = 180
# Ray's worker processes take ports 10002-19999 by default; the head's GCS port must lie outside.
GCS_PORTS = range(6400, 9999)


@dataclass(frozen=True)
class LocalCluster:
    address: str
    """host:port of the head's GCS, for `--ray-address` / RAY_ADDRESS."""
    environment: dict
    """os.environ plus the authentication token: what a driver process joining needs."""
    temp_dir: Path


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def free_gcs_port() -> int:
    for _ in range(100):
        port = GCS_PORTS[secrets.randbelow(len(GCS_PORTS))]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {GCS_PORTS} for the Ray head")


def node_command(cpus: int, object_store_bytes: int, temp_dir: Path, head_port: int | None, join: str | None
                 ) -> list[str]:
    command = [ray_executable(), "start", "--node-ip-address", HOST, "--num-cpus", str(cpus), "--num-gpus", "0",
               "--object-store-memory", str(object_store_bytes), "--temp-dir", str(temp_dir),
               "--disable-usage-stats"]
    if head_port:
        return command + ["--head", "--port", str(head_port), "--include-dashboard", "false"]
    return command + ["--address", join]


def stop_cluster(temp_dir: Path) -> None:
    """Kill every process of the cluster: its daemons name the temp folder on their command
    lines; its workers are the daemons' children (and rename themselves, so only that tells)."""
    daemons = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    processes = set(daemons)
    for daemon in daemons:
        with contextlib.suppress(psutil.Error):
            processes.update(daemon.children(recursive=True))
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(processes), timeout=30)


@contextlib.contextmanager
def local_ray_cluster(nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = 150_000_000,
                      token: str | None = None) -> Iterator[LocalCluster]:
    """`token`: the authentication token (default: a fresh random one). A process that joins
    several clusters one after the other needs them to share one: Ray reads it once."""
    # Short on purpose: Ray puts unix sockets in it, and their paths are limited to ~100 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="segray-", dir="/tmp"))
    token = token or secrets.token_hex(32)
    environment = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    environment.pop("RAY_ADDRESS", None)
    port = free_gcs_port()
    address = f"{HOST}:{port}"
    try:
        for node in range(nodes):
            command = node_command(cpus_per_node, object_store_bytes, temp_dir, port if node == 0 else None, address)
            started = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=START_TIMEOUT_S)
            if started.returncode != 0:
                raise RuntimeError(f"`{' '.join(command)}` failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        yield LocalCluster(address, {**environment, "RAY_ADDRESS": address}, temp_dir)
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
