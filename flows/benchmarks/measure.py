"""Run a command and sample the resident memory of its whole process tree (a Ray driver's
raylet and workers are its descendants), so that peak RSS covers every process it starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss: int
    """Largest sum of RSS over the process tree seen while sampling (bytes)."""
    result: dict
    """The JSON object the command printed on its last stdout line, if any."""


def run_sampled(command: list[str], interval: float = 0.1) -> Measured:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(interval)
    out = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return Measured(time.perf_counter() - start, peak, json.loads(lines[-1]) if lines else {})


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
