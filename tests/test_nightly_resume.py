"""Nightly runs that are killed come back: kill -9 of a Ray worker mid-block, and of the
driver mid-run; the finished run's outputs and statistics are byte-identical to those of an
uninterrupted run, and only unfinished blocks are segmented again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from flows.archive_flow import run_night
from flows.options import RunOptions
from flows.synthetic import write_small_net_card, write_tiled_scene

SIDE = 1536
BLOCK = 128
RUN_ID = "resume-night"
BLOCKS = (SIDE // BLOCK) ** 2


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("resume")
    images = folder / "archive"
    images.mkdir()
    write_tiled_scene(images / "big.tif", SIDE)
    return images, write_small_net_card(folder, tile=128)


def run_flow(archive: tuple[Path, Path], out: Path, workers: int | None = None) -> dict:
    """The night; on a machine of one CPU actor's worth of cores its model runs in the driver,
    unless `workers` asks for Ray actors."""
    images, card = archive
    return run_night(str(images), str(card), str(out), RunOptions(block=BLOCK, run_id=RUN_ID, workers=workers))


@pytest.fixture(scope="module")
def clean_run(ray_cluster, prefect_server, archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    report = run_flow(archive, out)
    assert report["done"] == ["big"] and report["blocks"]["big"] == {"total": BLOCKS, "resumed": 0}
    return out


def outputs(out: Path) -> dict[str, bytes]:
    """Every output and statistics file of a finished root, by relative path."""
    files = [out / "big" / "labels.tif", out / "big" / "preview.png", *sorted((out / "stats").rglob("*.parquet"))]
    return {str(path.relative_to(out)): path.read_bytes() for path in files}


def block_records(out: Path) -> list[Path]:
    return list((out / ".work").glob("big-*/blocks/*.json"))


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def busy_actor_processes() -> list[psutil.Process]:
    """Ray worker processes running a block right now (Ray names them after the method)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "SegmentationActor.segment" in command:
            found.append(process)
    return found


def test_kill_9_of_a_ray_worker_mid_block_resumes_to_byte_identical_outputs(clean_run, archive, tmp_path):
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_a_busy_worker() -> None:
        wait_for(lambda: len(block_records(out)) >= 5, 120, "the first blocks")
        wait_for(lambda: busy_actor_processes(), 30, "a busy actor")
        victim = busy_actor_processes()[0]
        killed.append(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    report = run_flow(archive, out, workers=1)  # on a Ray actor, whose bytes equal the clean run's
    killer.join(timeout=5)
    assert killed, "a worker was killed mid-block"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert report["done"] == ["big"] and report["failed"] == {}
    assert outputs(out) == outputs(clean_run)


def test_kill_9_of_the_driver_mid_run_then_resume_redoes_only_unfinished_blocks(clean_run, archive, tmp_path):
    import prefect.settings
    import ray

    images, card = archive
    out = tmp_path / "out"
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                   "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    driver = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(images), "--model", str(card), "--out", str(out),
         "--block", str(BLOCK), "--run-id", RUN_ID],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(block_records(out)) >= 20, 180, "the driver's first blocks")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done_before = len(block_records(out))
    assert 20 <= done_before < BLOCKS, "killed mid-run"
    assert not (out / "big").exists() and not list((out / ".manifest").glob("*.json")), "nothing marked done"

    report = run_flow(archive, out)
    assert report["done"] == ["big"]
    assert report["blocks"]["big"] == {"total": BLOCKS, "resumed": done_before}, "only unfinished blocks ran again"
    assert outputs(out) == outputs(clean_run)
    assert not (out / ".work").exists() or not any((out / ".work").iterdir()), "work folder removed when done"
