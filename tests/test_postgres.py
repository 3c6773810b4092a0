"""The production set-up the README gives: `prefect server start` on a real PostgreSQL (loopback),
a cron deployment made with `segpipe deploy`, a run triggered through the server, the
scheduler filling in the next nights, and `segpipe stats` answering from the output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_schedules import (
    BIN, NIGHTLY, api_healthy, delete_deployment, free_port, prefect_client, prefect_env, read_deployment, start,
    stop, tail, wait_for,
)

POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None) \
    if Path("/usr/lib/postgresql").is_dir() else None


def as_postgres(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: its commands run as the `postgres` user when we are root."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server of its own on 127.0.0.1 (Debian's package), with a database for Prefect."""
    if POSTGRES_BIN is None or not (POSTGRES_BIN / "initdb").is_file():
        pytest.skip("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        pytest.skip("running as root without a postgres user to run the server as")
    folder = tmp_path_factory.mktemp("postgres")
    data, socket_dir = folder / "data", folder / "socket"
    socket_dir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(socket_dir, "postgres")
        folder.chmod(0o755)
        for parent in folder.parents:  # the server's user must reach its data folder
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
    initialised = as_postgres([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust"])
    assert initialised.returncode == 0, initialised.stderr
    port = free_port()
    log = folder / "server.log"
    started = as_postgres([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                           f"-h 127.0.0.1 -p {port} -k {socket_dir}", "start"])
    assert started.returncode == 0, started.stderr + (log.read_text() if log.exists() else "")
    try:
        created = subprocess.run([str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect",
                                  "prefect"], capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        as_postgres([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"])


@pytest.fixture(scope="module")
def prefect_on_postgres(postgres, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-postgres")
    port = free_port()
    log = home / "server.log"
    env = prefect_env(home, PREFECT_API_DATABASE_CONNECTION_URL=postgres, PREFECT_SERVER_UI_ENABLED="false",
                      PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env,
                   home)
    try:
        wait_for(lambda: api_healthy(port), 180, "prefect server on PostgreSQL", log, server)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(server)


def test_a_nightly_deployment_runs_on_prefect_with_postgresql(prefect_on_postgres, sentinel_scene, tmp_path, capsys):
    from flows.cli import main

    api = prefect_on_postgres
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(sentinel_scene, archive / sentinel_scene.name)
    out = tmp_path / "out"
    log = tmp_path / "deploy.log"
    env = prefect_env(tmp_path / "home", PREFECT_API_URL=api)
    serving = start([sys.executable, "-m", "flows.cli", "deploy", str(archive), "--model", "s2-cloud-l1c", "--out",
                     str(out), "--cron", NIGHTLY, "--name", "pg-nightly", "--tile", "256"], log, env, tmp_path)
    try:
        deployment = wait_for(lambda: read_deployment(api, "segment-archive/pg-nightly"), 120, "deployment", log,
                              serving)
        assert deployment.parameters["options"] == {"tile": 256}, "run options travel in the deployment"
        with prefect_client(api) as client:
            planned = wait_for(lambda: [r for r in client.read_flow_runs() if r.deployment_id == deployment.id
                                        and r.auto_scheduled], 60, "the scheduler's next runs", log, serving)
            assert all(run.expected_start_time.hour == 2 for run in planned)
            flow_run = client.create_flow_run_from_deployment(deployment.id)

            def finished():
                state = client.read_flow_run(flow_run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_for(finished, 240, "the triggered run", log, serving)
            assert state.is_completed(), f"{state.type}: {state.message}\n{tail(log)}"
    finally:
        stop(serving)
        delete_deployment(api, "segment-archive/pg-nightly")
    capsys.readouterr()
    assert main(["stats", str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["class_name"] for row in rows} == {"clear", "cloud", "shadow"}
    assert sum(row["pixel_count"] for row in rows) == 200 * 300
