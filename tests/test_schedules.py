"""Scheduling: the segment-archive flow served on a cron schedule against a real Prefect server
(SQLite, loopback), and the work-pool deployment file infra/prefect.yaml."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from flows.archive_flow import segment_archive
from flows.deploy import serve_deployment
from pipelines.errors import InputError
from pipelines.model_card import load_card

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "infra" / "prefect.yaml"
NIGHTLY = "0 2 * * *"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """A subprocess in its own process group, so that stopping it stops its children too."""
    with log.open("wb") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group, SIGKILL after 20 s; then nothing of the group may remain."""
    group = process.pid
    with_grace = [(signal.SIGTERM, 20), (signal.SIGKILL, 10)]
    for sig, wait_s in with_grace:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()
            try:
                os.killpg(group, 0)  # any member of the group left?
            except ProcessLookupError:
                return
            time.sleep(0.2)
    process.wait(timeout=10)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for(condition, timeout_s: float, what: str, log: Path, process: subprocess.Popen):
    """Poll `condition()` until it returns something truthy; fail with the process log if the
    process dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        if process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}:\n{tail(log)}")
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout_s} s:\n{tail(log)}")


def api_healthy(port: int) -> bool:
    """Whether the Prefect server on this loopback port answers its health check."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def prefect_env(home: Path, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "RAY_USAGE_STATS_ENABLED": "0"} | extra


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on loopback with its own SQLite database; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = home / "server.log"
    env = prefect_env(
        home,
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_UI_ENABLED="false",
        # The scheduler fills in the cron's next runs on this loop, not only once a minute.
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
    )
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   log, env, home)
    try:
        started = time.monotonic()
        wait_for(lambda: api_healthy(port), 120, "prefect server health", log, server)
        print(f"prefect server up in {time.monotonic() - started:.1f} s")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(server)


@contextlib.contextmanager
def prefect_client(api_url: str):
    """A synchronous Prefect client talking to `api_url`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def read_deployment(api_url: str, name: str):
    from prefect.exceptions import ObjectNotFound

    with prefect_client(api_url) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def delete_deployment(api_url: str, name: str) -> None:
    if deployment := read_deployment(api_url, name):
        with prefect_client(api_url) as client:
            client.delete_deployment(deployment.id)


def next_times_at_two_utc(after: dt.datetime, count: int) -> list[dt.datetime]:
    """The cron "0 2 * * *" in UTC, by hand: 02:00:00 of each day, strictly after `after`."""
    first = after.astimezone(dt.UTC).replace(hour=2, minute=0, second=0, microsecond=0)
    if first <= after:
        first += dt.timedelta(days=1)
    return [first + dt.timedelta(days=day) for day in range(count)]


def test_a_cron_deployment_on_a_real_prefect_server_runs_and_its_statistics_are_queryable(
        prefect_api, sentinel_scene, tmp_path, capsys):
    from flows.cli import main

    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(sentinel_scene, archive / sentinel_scene.name)
    out = tmp_path / "out"
    log = tmp_path / "serve.log"
    # Served from an unrelated folder: the deployment's paths and entrypoint must not depend on it.
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = prefect_env(tmp_path / "serve-home", PREFECT_API_URL=prefect_api)
    timings = {}
    started = time.monotonic()
    serving = start([sys.executable, "-m", "flows.deploy", str(archive), "--model", "s2-cloud", "--out", str(out),
                     "--cron", NIGHTLY, "--name", "nightly"], log, env, workdir)
    try:
        deployment = wait_for(lambda: read_deployment(prefect_api, "segment-archive/nightly"), 120,
                              "deployment registered", log, serving)
        timings["deployment registered"] = time.monotonic() - started
        [schedule] = deployment.schedules
        assert schedule.schedule.cron == NIGHTLY
        assert schedule.active
        assert deployment.parameters == {"archive": str(archive), "model": "s2-cloud", "out": str(out)}
        assert deployment.entrypoint == "flows.archive_flow.segment_archive"
        assert "prefect deployment run 'segment-archive/nightly'" in log.read_text()

        with prefect_client(prefect_api) as client:
            triggered = time.monotonic()
            flow_run = client.create_flow_run_from_deployment(deployment.id)

            def final_state():
                state = client.read_flow_run(flow_run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_for(final_state, 180, "triggered run finished", log, serving)
            timings["triggered run"] = time.monotonic() - triggered
            assert state.is_completed(), f"{state.type}: {state.message}\n{tail(log)}"
    finally:
        stop(serving)
        delete_deployment(prefect_api, "segment-archive/nightly")

    labels_path = out / "sentinel2_scene" / "labels.tif"
    assert labels_path.is_file()
    capsys.readouterr()
    assert main(["stats", str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)

    with rasterio.open(sentinel_scene) as src:
        pixels = src.read()
        valid_pixels = int((~np.all(pixels == src.nodata, axis=0)).sum())
    with rasterio.open(labels_path) as labels_file:
        labels = labels_file.read(1)
    assert {row["class_name"] for row in rows} == {"clear", "cloud", "shadow"}
    assert sum(row["pixel_count"] for row in rows) == valid_pixels
    for row in rows:
        assert row["pixel_count"] == int((labels == row["class_id"]).sum())
    print("timings (s):", {key: round(value, 1) for key, value in timings.items()})


def test_the_server_turns_the_cron_into_the_next_nights_runs(prefect_api):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.types.entrypoint import EntrypointType

    from flows.deploy import cron_schedule

    name = "schedule-check"
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        deployment_id = segment_archive.to_deployment(
            name=name, schedules=[cron_schedule(NIGHTLY)], entrypoint_type=EntrypointType.MODULE_PATH,
            parameters={"archive": "s3://archive/scenes", "model": "s2-cloud", "out": "/data/segpipe/nightly"},
        ).apply()
    try:
        with prefect_client(prefect_api) as client:
            created = client.read_deployment(deployment_id).created
            deadline = time.monotonic() + 15
            planned = []
            while not planned and time.monotonic() < deadline:
                time.sleep(1)
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
                planned = sorted(run.expected_start_time for run in runs if run.auto_scheduled)
        assert planned, "the scheduler created no runs for the cron"
        assert planned == next_times_at_two_utc(created, len(planned))
    finally:
        delete_deployment(prefect_api, f"{segment_archive.name}/{name}")


@pytest.mark.parametrize("problem", ["unknown card", "bad cron", "missing archive", "bad timezone",
                                     "unknown parameter", "no server"])
def test_deploy_refuses_bad_input_before_serving(problem, sentinel_scene, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    archive = sentinel_scene.parent
    arguments = {"archive": str(archive), "model": "s2-cloud", "out": str(tmp_path / "out"), "cron": NIGHTLY}
    expected = {
        "unknown card": ({"model": "no-such-card"}, ["no-such-card", "model card"]),
        "bad cron": ({"cron": "0 2 * *"}, ["0 2 * *", "cron"]),
        "missing archive": ({"archive": str(tmp_path / "missing")}, [str(tmp_path / "missing"), "no such folder"]),
        "bad timezone": ({"timezone": "Mars/Olympus"}, ["Mars/Olympus", "timezone"]),
        "unknown parameter": ({"parameters": {"tile_size": 256}}, ["tile_size", "segment-archive"]),
        "no server": ({}, ["no Prefect server answers"]),
    }
    changes, words = expected[problem]
    # Nothing listens on this port: only the last check may (and must) find that out.
    closed_api = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: closed_api}), pytest.raises(InputError) as error:
        serve_deployment(**(arguments | changes))
    for word in words:
        assert word in str(error.value)


def test_the_work_pool_deployment_file_matches_the_flow():
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    project = yaml.safe_load(PREFECT_FILE.read_text())
    PrefectYamlModel.model_validate(project)  # what `prefect deploy` validates the file with
    [deployment] = project["deployments"]

    file_path, attribute = deployment["entrypoint"].split(":")
    assert (REPO / file_path).is_file()
    module = importlib.import_module(file_path.removesuffix(".py").replace("/", "."))
    assert getattr(module, attribute) is segment_archive
    assert deployment["flow_name"] == segment_archive.name

    signature = inspect.signature(segment_archive.fn).parameters
    assert set(deployment["parameters"]) <= set(signature)
    required = {name for name, parameter in signature.items() if parameter.default is inspect.Parameter.empty}
    assert required <= set(deployment["parameters"])
    load_card(deployment["parameters"]["model"])

    [schedule] = deployment["schedules"]
    RawScheduleConfig.model_validate(schedule)  # strict: no unknown keys
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron == NIGHTLY
    assert deployment["work_pool"]["name"]
    [pull_step] = project["pull"]
    assert Path(pull_step["prefect.deployments.steps.set_working_directory"]["directory"]).is_absolute()


def test_prefect_deploy_accepts_the_work_pool_file(prefect_api, tmp_path):
    """`prefect deploy` itself, from the repository root, against the real server."""
    project = yaml.safe_load(PREFECT_FILE.read_text())
    [spec] = project["deployments"]
    pool = spec["work_pool"]["name"]
    env = prefect_env(tmp_path / "cli-home", PREFECT_API_URL=prefect_api)
    prefect = str(BIN / "prefect")

    def cli(*arguments: str) -> str:
        done = subprocess.run([prefect, "--no-prompt", *arguments], check=False, env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    name = f"{segment_archive.name}/{spec['name']}"
    try:
        cli("work-pool", "create", pool, "--type", "process")
        cli("deploy", "--all", "--prefect-file", str(PREFECT_FILE.relative_to(REPO)))
        deployment = read_deployment(prefect_api, name)
        assert deployment is not None
        assert deployment.work_pool_name == pool
        assert deployment.entrypoint == spec["entrypoint"]
        assert deployment.parameters == spec["parameters"]
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == (NIGHTLY, spec["schedules"][0]["timezone"])
        assert deployment.pull_steps == project["pull"]
    finally:
        delete_deployment(prefect_api, name)
