"""From one machine to a cluster: a real two-node Ray cluster (`ray start --head` and `ray
start --address`, one CPU each, token authentication on) runs a multi-image archive with its
output root on S3 (the moto server stands in for shared storage); blocks run on both nodes,
and the outputs and statistics are byte-identical to a single-node run to a local folder.
Also the S3 root's lease lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.archive_flow import run_night
from flows.options import RunOptions
from flows.local_cluster import local_ray_cluster
from flows.synthetic import write_small_net_card, write_tiled_scene
from flows.root_lock import LOCK_NAME, RootBusy, root_lock
from pipelines import storage

IMAGES = {"north": 384, "south": 512, "east": 256}
BLOCK = 128
RUN_ID = "cluster-night"
BUCKET = "segpipe-cluster"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cluster")
    images = folder / "archive"
    images.mkdir()
    for name, side in IMAGES.items():
        write_tiled_scene(images / f"{name}.tif", side)
    return images, write_small_net_card(folder, tile=128)


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def single_node_run(ray_cluster, prefect_server, archive, tmp_path_factory) -> Path:
    images, card = archive
    out = tmp_path_factory.mktemp("single") / "out"
    report = run_night(str(images), str(card), str(out), RunOptions(block=BLOCK, run_id=RUN_ID, device="cpu"))
    assert sorted(report["done"]) == sorted(IMAGES) and report["failed"] == {}
    return out


def output_files(root: str) -> dict[str, bytes]:
    """Every image output and statistics file under a root, by path relative to it."""
    names = [f"{image}/{name}" for image in IMAGES for name in ("labels.tif", "preview.png")]
    names += [f"stats/{name}" for name in storage.list_files(storage.join(root, "stats"))
              if name.endswith(".parquet") and "/_" not in name]
    return {name: storage.read_bytes(storage.join(root, name)) for name in names}


def test_a_two_node_cluster_with_an_s3_root_gives_the_single_node_outputs(archive, bucket, single_node_run,
                                                                           prefect_server):
    import prefect.settings

    images, card = archive
    out = f"{bucket}/two-nodes"
    with local_ray_cluster(nodes=2, cpus_per_node=1) as cluster:
        environment = {**cluster.environment, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
        environment.pop("RAY_ADDRESS")  # the flag alone says where the cluster is
        # No --workers: the default plan must fit an actor on each 1-CPU node (not one 2-CPU actor
        # that no node can hold).
        driver = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(images), "--model", str(card), "--out", out,
             "--block", str(BLOCK), "--run-id", RUN_ID, "--device", "cpu", "--ray-address", cluster.address],
            env=environment, capture_output=True, text=True, timeout=600,
        )
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        wrong_token = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={cluster.address!r})"],
            env={**cluster.environment, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True, timeout=120,
        )
        assert wrong_token.returncode != 0, "token authentication is on: a wrong token is refused"

    report = json.loads(storage.read_bytes(f"{out}/runs/{RUN_ID}.json"))
    assert sorted(report["done"]) == sorted(IMAGES) and report["failed"] == {}
    total_blocks = sum((-(-side // BLOCK)) ** 2 for side in IMAGES.values())
    by_node = report["blocks_by_node"]
    assert len(by_node) == 2 and min(by_node.values()) > 0, f"blocks ran on both nodes: {by_node}"
    assert sum(by_node.values()) == total_blocks
    assert output_files(out) == output_files(str(single_node_run))
    assert storage.list_files(f"{out}/.work") == [], "the work prefix is emptied when every image is done"
    assert len(storage.list_names(f"{out}/.manifest")) == len(IMAGES)
    assert not storage.exists(f"{out}/{LOCK_NAME}"), "the lease lock is released"


def test_a_second_run_on_an_s3_root_skips_what_is_done(archive, bucket, ray_cluster, prefect_server):
    images, card = archive
    out = f"{bucket}/rerun"
    first = run_night(str(images), str(card), out, RunOptions(block=BLOCK, run_id="first", device="cpu"))
    assert sorted(first["done"]) == sorted(IMAGES)
    second = run_night(str(images), str(card), out, RunOptions(block=BLOCK, run_id="second", device="cpu"))
    assert second["done"] == [] and sorted(second["skipped"]) == sorted(IMAGES)


def test_the_s3_lease_lock_refuses_a_second_run_and_is_taken_over_once_expired(bucket, monkeypatch):
    root = f"{bucket}/locked"
    with root_lock(root, "first"):
        with pytest.raises(RootBusy, match="first"):
            with root_lock(root, "second"):
                pass
        holder = json.loads(storage.read_bytes(f"{root}/{LOCK_NAME}"))
        assert holder["run_id"] == "first" and holder["expires"] > time.time()
    assert not storage.exists(f"{root}/{LOCK_NAME}")

    # A holder killed with -9 leaves its lease behind: refused until it expires, then taken over.
    dead = {"pid": 1, "host": "gone", "run_id": "crashed", "expires": time.time() + 2}
    storage.write_whole(f"{root}/{LOCK_NAME}", json.dumps(dead).encode())
    with pytest.raises(RootBusy, match="crashed"):
        with root_lock(root, "too-early"):
            pass
    time.sleep(2.5)
    monkeypatch.setenv("SEGPIPE_LOCK_LEASE_S", "2")
    with root_lock(root, "after"):
        time.sleep(1.5)  # the holder renews its lease every 0.5 s
        holder = json.loads(storage.read_bytes(f"{root}/{LOCK_NAME}"))
        assert holder["run_id"] == "after" and holder["expires"] > time.time() + 0.5
        # Stalled past its lease, the holder finds the root taken over: it neither renews nor
        # deletes the new holder's lease.
        other = {"holder": "someone-else", "run_id": "took-over", "expires": time.time() + 60}
        storage.write_whole(f"{root}/{LOCK_NAME}", json.dumps(other).encode())
        time.sleep(1.0)
    assert json.loads(storage.read_bytes(f"{root}/{LOCK_NAME}")) == other


def test_segment_into_an_s3_root_publishes_what_a_local_root_gets(bucket, segmented_scene, sentinel_scene):
    import zarr

    from flows.cli import main

    out = f"{bucket}/one-image"
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", out, "--probabilities"]) == 0
    published = storage.list_files(f"{out}/sentinel2_scene")
    assert {"labels.tif", "preview.png", "probabilities.zarr/zarr.json"} <= set(published)
    local = segmented_scene / "sentinel2_scene"
    for name in ("labels.tif", "preview.png"):
        assert storage.read_bytes(f"{out}/sentinel2_scene/{name}") == (local / name).read_bytes()
    probabilities = zarr.open_array(f"{out}/sentinel2_scene/probabilities.zarr", mode="r")
    assert probabilities.shape[0] == 3 and int(probabilities[:].astype(int).sum(axis=0).max()) <= 255 + 2
    assert storage.list_files(f"{out}/.work") == []

    # Published again without probabilities: the stale store is removed, the rest replaced.
    storage.write_whole(f"{out}/sentinel2_scene/left-over.txt", b"from an older output")
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", out, "--run-id", "again"]) == 0
    assert set(storage.list_files(f"{out}/sentinel2_scene")) == {"labels.tif", "labels.tif.aux.xml", "preview.png"}


def test_a_driver_killed_mid_run_on_an_s3_root_resumes_to_the_same_outputs(archive, bucket, single_node_run,
                                                                              ray_cluster, prefect_server):
    import os
    import signal

    import prefect.settings
    import ray

    images, card = archive
    out = f"{bucket}/killed"

    def block_records() -> dict[str, int]:
        """Blocks recorded so far, by image (work folders are named <image>-<key>)."""
        return {work.rsplit("-", 1)[0]: len(storage.list_names(f"{out}/.work/{work}/blocks"))
                for work in storage.list_names(f"{out}/.work")}

    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                   "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(), "SEGPIPE_LOCK_LEASE_S": "4"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(images), "--model", str(card), "--out", out, "--block",
         str(BLOCK), "--run-id", RUN_ID, "--device", "cpu", "--concurrency", "1"],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while sum(block_records().values()) < 3:
            assert time.monotonic() < deadline and driver.poll() is None, "the driver's first blocks"
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    recorded = block_records()
    assert storage.exists(f"{out}/{LOCK_NAME}"), "the killed driver's lease is left behind"

    time.sleep(4.5)  # its lease runs out; the next run takes the root over
    report = run_night(str(images), str(card), out, RunOptions(block=BLOCK, run_id=RUN_ID, device="cpu"))
    assert sorted(report["done"] + report["skipped"]) == sorted(IMAGES) and report["failed"] == {}
    assert sum(recorded.values()) >= 3
    for image in report["done"]:  # every block recorded before the kill is taken over, none redone
        assert report["blocks"][image]["resumed"] == recorded.get(image, 0), image
    assert output_files(out) == output_files(str(single_node_run))
