"""The nightly flow at its limits: two runs on one output root, a read-only or full output
file system, and an archive of hundreds of small images (memory and the next night's skip)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# Imported at collection, not inside a test: importing Prefect's flow machinery creates its
# console log handler on the sys.stderr of that moment, which must not be a test's capsys.
from flows.archive_flow import run_night
from flows.options import RunOptions
from flows.cli import main

REPO = Path(__file__).resolve().parents[1]
CARD = "s2-cloud"
SMALL_IMAGES = int(os.environ.get("SEGPIPE_TEST_SMALL_IMAGES", "300"))


def archive_of_copies(scene: Path, folder: Path, count: int) -> list[str]:
    folder.mkdir()
    names = [f"scene_{i}" for i in range(count)]
    for name in names:
        shutil.copy(scene, folder / f"{name}.tif")
    return names


def quiet_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(overrides)
    return env


def valid_pixels_of(path: Path) -> np.ndarray:
    """Brute force, from the source itself: a pixel is valid unless every band is nodata."""
    import rasterio

    with rasterio.open(path) as src:
        pixels = src.read()
        return ~np.all(pixels == src.nodata, axis=0)


def wait_for_lock_holder(lock: Path, pid: int, process: subprocess.Popen, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the first run ended (rc {process.returncode}) before it was seen holding the lock"
        try:
            holder = json.loads(lock.read_text())
            if holder.get("pid") == pid:
                return holder
        except (FileNotFoundError, ValueError):
            pass  # not created yet, or caught between truncate and write
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named pid {pid}")


def test_two_runs_at_once_on_one_output_root_the_second_is_refused(
        ray_cluster, prefect_server, sentinel_scene, tmp_path, capsys):
    import ray
    from prefect.settings import PREFECT_API_URL

    archive, out = tmp_path / "archive", tmp_path / "out"
    # Twelve images keep the first run on the lock for seconds: with three, it sometimes finished
    # before the second one, in this process, had gone through Prefect's flow start (about 2 s).
    names = archive_of_copies(sentinel_scene, archive, 12)
    args = ["run", str(archive), "--model", CARD, "--out", str(out), "--concurrency", "1"]
    env = quiet_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address, PREFECT_API_URL=PREFECT_API_URL.value())
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_lock_holder(out / ".segpipe.lock", first.pid, first)
        assert main(args) == 2
        refused = capsys.readouterr()
        assert first.poll() is None, "the refusal must have happened while the first run was still writing"
        errors = [line for line in refused.err.splitlines() if line.startswith("segpipe: error:")]
        assert len(errors) == 1, refused.err  # (Prefect's own log lines go to stderr as well)
        assert "another segpipe run is writing to this output root" in errors[0]
        assert f'"pid": {first.pid}' in errors[0] and holder["run_id"] in errors[0]
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, f"first run failed:\n{stdout}\n{stderr}"
    assert f"{len(names)} done, 0 skipped" in stdout
    for name in names:
        assert (out / name / "labels.tif").is_file()
    assert len(list((out / ".manifest").glob("*.json"))) == len(names)

    assert main(args) == 0, "the root is free again once the first run has finished"
    again = capsys.readouterr().out
    assert f"0 done, {len(names)} skipped (already done), 0 failed" in again
    report = json.loads((out / "runs" / f"{holder['run_id']}.json").read_text())  # the run id's over both attempts
    assert sorted(report["done"]) == sorted(names) and report["skipped"] == [] and report["failed"] == {}
    assert [(a["done"], a["skipped"]) for a in report["attempts"]] == [(len(names), 0), (0, len(names))]


def run_on_a_small_tmpfs(archive: Path, root: Path, size_kib: int, read_only: bool, tmp_path: Path) -> str:
    """`segpipe run` in its own user+mount namespace with a tmpfs of `size_kib` on `root`;
    the tmpfs vanishes with the namespace, so the shell lists it before it exits."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged user+mount namespaces (unshare -rm) are not available here")
    root.mkdir()
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    env = quiet_env(PREFECT_HOME=str(prefect_home))
    for name in ("RAY_ADDRESS", "PREFECT_API_URL"):  # their own local Ray cluster and ephemeral Prefect API
        env.pop(name, None)
    # The command as its script runs it (flows.command): Prefect's server started before the imports.
    command = [sys.executable, "-m", "flows", "run", str(archive), "--model", CARD, "--out", str(root)]
    r = shlex.quote(str(root))
    script = (
        f"mount -t tmpfs -o size={size_kib}k tmpfs {r} || exit 90; "
        + (f"mount -o remount,ro {r} || exit 91; " if read_only else "")
        + f"{shlex.join(command)}; echo EXIT=$?; "
        f"echo '== manifest'; ls -1 {r}/.manifest 2>/dev/null; "
        f"echo '== labels'; find {r} -name labels.tif; "
        f"echo '== stats'; find {r}/stats -name '*.parquet' 2>/dev/null; "
        f"echo '== report'; cat {r}/runs/*.json 2>/dev/null; echo; "
        f"echo '== df'; df -k {r}"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"namespace shell failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout + "\n== stderr\n" + result.stderr


def section(output: str, name: str) -> list[str]:
    """The non-empty lines the namespace shell printed under its `== name` header."""
    lines = output.splitlines()
    start = lines.index(f"== {name}") + 1
    stop = next((i for i in range(start, len(lines)) if lines[i].startswith("== ")), len(lines))
    return [line for line in lines[start:stop] if line.strip()]


def test_a_read_only_output_root_is_a_clear_error_and_nothing_is_marked_done(sentinel_scene, tmp_path):
    archive = tmp_path / "archive"
    archive_of_copies(sentinel_scene, archive, 2)
    root = tmp_path / "root"
    output = run_on_a_small_tmpfs(archive, root, 1024, read_only=True, tmp_path=tmp_path)
    print(output)
    assert "EXIT=2" in output
    errors = [line for line in output.splitlines() if line.startswith("segpipe: error:")]
    assert errors, output
    assert "read-only" in errors[0] and str(root) in errors[0]
    assert section(output, "manifest") == [] and section(output, "labels") == []


def test_a_full_disk_fails_the_images_clearly_and_marks_nothing_done(sentinel_scene, tmp_path):
    archive = tmp_path / "archive"
    names = archive_of_copies(sentinel_scene, archive, 2)
    root = tmp_path / "root"
    # The scene (200 x 300, one block) is read in place, not copied: the disk fills up when an
    # image's outputs are written (its preview alone is over 100 KB), after the lock, the run's
    # registration and the work folders (64 KiB) fitted.
    output = run_on_a_small_tmpfs(archive, root, 128, read_only=False, tmp_path=tmp_path)
    print(output)
    assert section(output, "manifest") == [] and section(output, "labels") == []
    assert section(output, "stats") == [], "no statistics rows for images that failed"
    if "EXIT=2" in output:  # the lock file or run registration itself could not be written
        errors = [line for line in output.splitlines() if line.startswith("segpipe: error:")]
        assert errors and "no space left" in errors[0].lower(), output
        return
    assert "EXIT=1" in output
    # The run's own summary (printed only when the run ends normally, not on an uncaught error)
    assert f"0 done, 0 skipped (already done), {len(names)} failed" in output
    failed = [line for line in output.splitlines() if line.strip().startswith("failed ")]
    assert len(failed) == len(names), output
    for name in names:
        line = next(line for line in failed if f"{name}.tif" in line)
        assert "no space left" in line.lower(), line
    report = json.loads("\n".join(section(output, "report")))
    assert report["done"] == [] and sorted(report["failed"]) == sorted(str(archive / f"{n}.tif") for n in names)
    assert all("no space left" in why.lower() for why in report["failed"].values())


def write_small_crops(scene: Path, folder: Path, count: int, size: int = 64) -> list[Path]:
    """`count` size x size crops of the scene at different offsets, with its bands, CRS and
    nodata, each with the transform of its own window."""
    import rasterio
    from affine import Affine

    folder.mkdir()
    paths = []
    with rasterio.open(scene) as src:
        pixels = src.read()
        rows, cols = src.height - size + 1, src.width - size + 1
        for i in range(count):
            row, col = (i * 37) % rows, (i * 53) % cols
            # the crop's upper-left corner moves by (col, row) pixels of the scene's grid
            profile = dict(src.profile, width=size, height=size, transform=src.transform @ Affine.translation(col, row),
                           tiled=False, compress="deflate")
            profile.pop("blockxsize", None), profile.pop("blockysize", None)
            path = folder / f"crop_{i:04d}_r{row}_c{col}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(pixels[:, row : row + size, col : col + size])
            paths.append(path)
    return paths


class RssSampler:
    """This process's resident memory every `period_s`, with how many images were done then."""

    def __init__(self, manifest: Path, period_s: float = 0.5):
        import psutil

        self.process, self.manifest, self.period_s = psutil.Process(), manifest, period_s
        self.samples: list[tuple[float, int, int]] = []  # (seconds, rss bytes, images done)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        start = time.monotonic()
        while True:
            done = len(os.listdir(self.manifest)) if self.manifest.is_dir() else 0
            self.samples.append((time.monotonic() - start, self.process.memory_info().rss, done))
            if self.stop.wait(self.period_s):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.samples.append((self.samples[-1][0], self.process.memory_info().rss, self.samples[-1][2]))


def test_an_archive_of_many_small_images_completes_with_bounded_memory_and_the_next_night_skips_them_all(
        ray_cluster, prefect_server, sentinel_scene, tmp_path):
    import pyarrow.compute as pc
    import rasterio

    from pipelines.stats import read_table

    count = SMALL_IMAGES
    archive, out = tmp_path / "archive", tmp_path / "out"
    crops = write_small_crops(sentinel_scene, archive, count)

    started = time.monotonic()
    with RssSampler(out / ".manifest") as memory:
        # Batch 1: each 64 x 64 crop is one tile, which a batch of 4 would run four times over.
        first = run_night(str(archive), CARD, str(out), RunOptions(run_id="night-1", concurrency=2, batch=1))
    first_s = time.monotonic() - started
    assert first["failed"] == {} and first["skipped"] == []
    assert sorted(first["done"]) == sorted(p.stem for p in crops)

    mb = 1024 * 1024
    warm = next(rss for _, rss, done in memory.samples if done >= count // 5)
    end, peak = memory.samples[-1][1], max(rss for _, rss, _ in memory.samples)
    print(f"\nnight 1: {count} images in {first_s:.1f} s ({first_s / count:.2f} s/image); process RSS "
          f"at start {memory.samples[0][1] / mb:.0f} MB, after {count // 5} images {warm / mb:.0f} MB, "
          f"at end {end / mb:.0f} MB, peak {peak / mb:.0f} MB; growth over the last 80%: {(end - warm) / mb:+.0f} MB")
    fifths = [next(rss for _, rss, done in memory.samples if done >= count * k // 5) for k in range(1, 5)] + [end]
    print("process RSS after each fifth of the images: " + ", ".join(f"{rss / mb:.0f}" for rss in fifths) + " MB")
    assert end - warm < 300 * mb, "host memory must not grow with the number of images"

    stats = read_table(out / "stats", "image_class")
    assert stats.num_rows == count * 3
    assert sorted(set(stats["image"].to_pylist())) == sorted(p.stem for p in crops)
    for crop in crops[:: max(1, count // 6)]:  # a few images recounted from their outputs and sources
        rows = stats.filter(pc.equal(stats["image"], crop.stem)).sort_by("class_id")
        valid = valid_pixels_of(crop)
        with rasterio.open(out / crop.stem / "labels.tif") as labels_file:
            labels = labels_file.read(1)
        assert np.array_equal(labels != 255, valid), "labels exactly where the source has data"
        assert rows["class_id"].to_pylist() == [0, 1, 2]
        assert rows["pixel_count"].to_pylist() == [int(np.sum(labels == c)) for c in (0, 1, 2)]
        assert set(rows["valid_pixels"].to_pylist()) == {int(valid.sum())} == {sum(rows["pixel_count"].to_pylist())}

    started = time.monotonic()
    second = run_night(str(archive), CARD, str(out), RunOptions(run_id="night-2", concurrency=2, batch=1))
    second_s = time.monotonic() - started
    print(f"night 2: {count} images skipped in {second_s:.1f} s")
    assert second["done"] == [] and second["failed"] == {}
    assert sorted(Path(n).stem for n in second["skipped"]) == sorted(p.stem for p in crops)
    after = read_table(out / "stats", "image_class")
    assert after.num_rows == stats.num_rows
    assert set(after["run_id"].to_pylist()) == {"night-1"}
