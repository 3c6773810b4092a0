"""Shared fixtures: one local Ray cluster and one Prefect test server for the whole session,
and the real Sentinel-2 demo scene written once as a GeoTIFF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import s3_endpoint

# The tests' segpipe commands run in processes of their own: a developer's resident server
# (segpipe serve) must not run them. tests/test_resident_server.py starts servers of its own.
os.environ["SEGPIPE_SERVER"] = "off"

# A real S3 server (moto) on loopback for the whole session, with the AWS_* variables pointing at it.
s3_server = pytest.fixture(scope="session", name="s3_server")(s3_endpoint)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train's controller looks at its workers every 2 s: a test's short training run would
    # wait for that after its last step (the cluster's processes inherit this environment).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server():
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def sentinel_scene(tmp_path_factory) -> Path:
    from flows.demo_scene import write_sentinel2_scene

    return write_sentinel2_scene(tmp_path_factory.mktemp("archive") / "sentinel2_scene.tif")


@pytest.fixture(scope="session")
def segmented_scene(ray_cluster, sentinel_scene, tmp_path_factory) -> Path:
    """`segpipe segment` run once on the scene with the built-in s2-cloud card; returns DIR."""
    from flows.cli import main

    out = tmp_path_factory.mktemp("segment-out")
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", str(out)]) == 0
    return out
