"""Run a command and sample the resident memory of its whole process tree (a Ray driver's
raylet and workers are its descendants), so that peak RSS covers every process it starts;
optionally sample the GPUs too (memory used, utilisation), since Ray actors allocate on the
GPU from processes that the measuring one cannot ask with torch.cuda."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil


@dataclass(frozen=True)
class GpuSample:
    time: float
    """time.time() when taken, comparable with the windows a measured command reports."""
    memory_used: int
    """Bytes in use, summed over the GPUs."""
    utilisation: float
    """Percent of the last sampling period in which a kernel ran, mean over the GPUs."""


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss: int
    """Largest sum of RSS over the process tree seen while sampling (bytes)."""
    result: dict
    """The JSON object the command printed on its last stdout line, if any."""
    gpu_samples: tuple[GpuSample, ...] = ()
    """GPU samples while the command ran (none without a GPU, or when not asked for)."""
    gpu_memory_before: int | None = None
    """GPU memory in use just before the command started (bytes); None without a GPU."""

    @property
    def peak_gpu_memory(self) -> int | None:
        """The most GPU memory the command added over what was in use before it (bytes)."""
        if self.gpu_memory_before is None or not self.gpu_samples:
            return None
        return max(0, max(s.memory_used for s in self.gpu_samples) - self.gpu_memory_before)

    def gpu_utilisation(self, start: float, stop: float) -> tuple[float, float] | None:
        """Mean and 10th percentile of the utilisation sampled between two time.time() values."""
        inside = [s.utilisation for s in self.gpu_samples if start <= s.time <= stop]
        if not inside:
            return None
        return float(np.mean(inside)), float(np.percentile(inside, 10))


class GpuMonitor:
    """Samples every GPU of the machine in a thread: through NVML (the nvidia-ml-py package)
    when it loads, else by calling `nvidia-smi`. `available` is False on a machine without
    either; it then takes no samples."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.read = self.nvml_reader() or self.nvidia_smi_reader()
        self.available = self.read is not None
        self.samples: list[GpuSample] = []
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    @staticmethod
    def nvml_reader():
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError:  # no driver library, or no device
            return None
        if not handles:
            return None

        def read() -> tuple[int, float]:
            used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles)
            busy = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            return used, float(np.mean(busy))

        return read

    @staticmethod
    def nvidia_smi_reader():
        if shutil.which("nvidia-smi") is None:
            return None
        command = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"]

        def read() -> tuple[int, float]:
            lines = subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout.split("\n")
            rows = [[float(v) for v in line.split(",")] for line in lines if line.strip()]
            return int(sum(mib for mib, _ in rows) * 2**20), float(np.mean([busy for _, busy in rows]))

        try:
            read()
        except (subprocess.SubprocessError, OSError, ValueError):
            return None
        return read

    def memory_used(self) -> int | None:
        return self.read()[0] if self.available else None

    def sample(self) -> None:
        used, busy = self.read()
        self.samples.append(GpuSample(time.time(), used, busy))

    def loop(self) -> None:
        while not self.stopping.is_set():
            started = time.perf_counter()
            self.sample()
            self.stopping.wait(max(0.0, self.interval - (time.perf_counter() - started)))

    def __enter__(self) -> GpuMonitor:
        if self.available:
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.thread:
            self.stopping.set()
            self.thread.join()


def run_sampled(command: list[str], interval: float = 0.1, gpu: GpuMonitor | None = None, stderr=None) -> Measured:
    """Run `command` to its end, sampling its process tree's RSS (and with `gpu`, the GPUs:
    pass a fresh GpuMonitor per command). `stderr` is where the command's stderr goes (default:
    this process's); on failure the error names the command."""
    memory_before = gpu.memory_used() if gpu else None
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    # Read stdout in a thread: a command printing more than the pipe holds would block otherwise.
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    root = psutil.Process(process.pid)
    peak = 0
    with gpu or contextlib.nullcontext():
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
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    lines = [line for line in output[0].strip().splitlines() if line.startswith("{")]
    return Measured(
        time.perf_counter() - start, peak, json.loads(lines[-1]) if lines else {},
        tuple(gpu.samples) if gpu else (), memory_before,
    )


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
