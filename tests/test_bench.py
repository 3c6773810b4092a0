"""The worker-plane benchmark runs end to end on the CPU and prints every figure, with ratios
that follow from the figures it prints; GPU sampling reads nvidia-smi where NVML is missing."""

import json
import os
import re
import stat

import pytest

from flows.benchmarks.measure import GpuMonitor, run_sampled
from flows.benchmarks.worker_plane import available_cores, main

TILE, OVERLAP = 128, 0.25
NUMBER = r"([0-9.]+(?:e[-+]?[0-9]+)?)"
PARTS = ("model alone (tile px)", "segment stage", "end-to-end", "MONAI sliding window")


def printed_number(output: str, pattern: str) -> float:
    found = re.search(pattern, output, re.MULTILINE)
    assert found, f"no match for {pattern!r} in:\n{output}"
    return float(found.group(1))


@pytest.mark.timeout(400)
def test_benchmark_prints_every_figure_on_the_cpu(capsys):
    counts = (1, 4)  # on this 2-core machine: one actor measured, four skipped (one Ray cluster fewer to start)
    assert main(["--model", "tiny-unet", "--device", "cpu", "--side", "512", "--tile", str(TILE), "--overlap",
                 str(OVERLAP), "--batch", "4", "--seconds", "0.5", "--actors", ",".join(map(str, counts)),
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table, report = "\n".join(lines[:-1]), json.loads(lines[-1])

    assert "device:   cpu; GPU: none; CPU: " in table and "torch " in table
    assert "model:    tiny-unet (registry unet_padded" in table
    assert "512² RGB, tile 128, overlap 0.25 (stride 96), batch 4" in table

    rate = {}
    gpu_free = not GpuMonitor().available
    for part in PARTS:
        row = re.search(rf"^{re.escape(part)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER} GiB\s+(\S+(?: GiB)?)\s+(\S+(?: %)?)"
                        rf"\s+(\S+(?: %)?)$", table, re.MULTILINE)
        assert row, f"no row for {part} in:\n{table}"
        rate[part], seconds, rss = (float(row.group(i)) for i in (1, 2, 3))
        assert rate[part] > 0 and seconds > 0 and rss > 0.05  # a Python process with torch holds far more than 50 MiB
        if gpu_free:
            assert row.group(4) == row.group(5) == row.group(6) == "n/a"

    # Each pixel is computed (tile / stride)^2 times: the ideal follows from the model's own rate.
    recompute = (TILE / round(TILE * (1 - OVERLAP))) ** 2
    assert printed_number(table, r"^ideal = model / \(tile / stride\)\^2 = model / ([0-9.]+)") == pytest.approx(recompute, abs=1e-4)
    ideal = printed_number(table, rf"= {NUMBER} Mpx/s$")
    assert ideal == pytest.approx(rate["model alone (tile px)"] / recompute, rel=1e-3)
    for name, numerator, denominator in [
        ("segment/ideal", rate["segment stage"], ideal),
        ("end_to_end/ideal", rate["end-to-end"], ideal),
        ("segment/monai", rate["segment stage"], rate["MONAI sliding window"]),
    ]:
        assert printed_number(table, rf"^{re.escape(name)}\s+{NUMBER}$") == pytest.approx(numerator / denominator, rel=2e-3)

    # CPU actors: every count that fits the cores is measured, the rest named as skipped.
    fitting = [n for n in counts if n <= available_cores()]
    actor_rates = {}
    for n in fitting:
        row = re.search(rf"^\s+{n}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER} GiB\s+{NUMBER}$", table, re.MULTILINE)
        assert row, f"no row for {n} actors in:\n{table}"
        actor_rates[n] = float(row.group(1))
        assert actor_rates[n] > 0
        assert float(row.group(4)) == pytest.approx(actor_rates[n] / actor_rates[fitting[0]], rel=2e-3)
    if len(fitting) < len(counts):
        assert re.search(r"^skipped: .* actors \(more than the machine's \d+ cores\)$", table, re.MULTILINE)

    # The JSON object carries the same figures at full precision.
    figures = report["figures"]
    assert set(figures) == {"model", "segment", "end_to_end", "monai"}
    assert figures["segment"]["mpx_per_s"] == pytest.approx(rate["segment stage"], rel=1e-3)
    assert report["ideal_mpx_per_s"] == pytest.approx(figures["model"]["mpx_per_s"] / recompute)
    assert report["ratios"]["end_to_end/ideal"] == pytest.approx(figures["end_to_end"]["mpx_per_s"] / report["ideal_mpx_per_s"])
    assert [row["actors"] for row in report["actors"]] == fitting
    assert report["details"]["segment"]["tiles"] == 25  # (512 - 128) / 96 + 1 = 5 tiles per axis
    assert set(report["details"]["end-to-end"]["stages"]) == {"ingest", "segment", "finalize", "statistics"}
    if gpu_free:
        assert all(f["peak_gpu_memory_gib"] is None and f["gpu_utilisation_mean"] is None for f in figures.values())


def test_gpu_monitor_reads_nvidia_smi_when_nvml_is_missing(tmp_path, monkeypatch):
    """A stand-in nvidia-smi with two GPUs whose memory grows by 1 MiB (in total) per query:
    the peak over the command is one MiB per sample taken after the baseline query."""
    if GpuMonitor.nvml_reader() is not None:
        pytest.skip("NVML answers on this machine: the nvidia-smi fallback is not used")
    counter = tmp_path / "queries"
    counter.write_text("0")
    script = tmp_path / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
n=$(cat {counter}); echo $((n + 1)) > {counter}
echo "$((1000 + n)), 40"
echo "500, 80"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    monitor = GpuMonitor(interval=0.05)
    assert monitor.available
    measured = run_sampled(["sleep", "0.6"], gpu=monitor)
    samples = measured.gpu_samples
    assert len(samples) >= 3
    assert [s.utilisation for s in samples] == [60.0] * len(samples)
    assert measured.peak_gpu_memory == len(samples) * 2**20
    assert measured.gpu_utilisation(samples[0].time, samples[-1].time) == (60.0, 60.0)
    assert measured.gpu_utilisation(samples[-1].time + 1, samples[-1].time + 2) is None
