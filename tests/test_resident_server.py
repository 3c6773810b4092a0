"""`segpipe serve`: a resident process runs `segment` (and stats, report, evaluate, models)
without the start-up. A command handed to it prints, exits and writes what it does in a process
of its own, in the caller's folder, environment, umask and terminal. Ctrl-C and a killed
process reach the caller. A server that died, or one running other code, is not used."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from flows.synthetic import write_small_net_card, write_tiled_scene
from pipelines.stats import read_table

SEGPIPE = Path(sys.executable).parent / "segpipe"
REPOSITORY = Path(__file__).resolve().parent.parent
COMPARED = ("image", "class_id", "pixel_count", "valid_pixels", "area", "area_unit", "model_digest")


def segpipe(*args, server: Path | str, cwd: Path | None = None, command: list[str] | None = None,
            **options) -> subprocess.CompletedProcess:
    """The `segpipe` command line as a user runs it, with SEGPIPE_SERVER set to `server`."""
    return subprocess.run([*(command or [str(SEGPIPE)]), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SEGPIPE_SERVER": str(server)}, **options)


def served_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def wait_for(condition, seconds: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server listening at a socket of its own; its log is server.log beside it."""
    path = tmp_path_factory.mktemp("server") / "segpipe.sock"
    started = segpipe("serve", "--detach", server=path)
    assert started.returncode == 0, started.stderr
    assert f"listening at {path}" in started.stdout
    yield path
    stopped = segpipe("serve", "--stop", server=path)
    assert stopped.returncode == 0 and "stopped the segpipe server" in stopped.stdout, stopped


def test_a_served_segment_prints_exits_and_writes_what_its_own_process_does(server, sentinel_scene, tmp_path):
    log = server.parent / "server.log"
    before = len(served_lines(log))
    # In the caller's folder (a relative --out), with the caller's umask.
    served = segpipe("segment", sentinel_scene, "--model", "s2-cloud", "--out", "served", server=server, cwd=tmp_path,
                     preexec_fn=lambda: os.umask(0o077))
    alone = segpipe("segment", sentinel_scene, "--model", "s2-cloud", "--out", "alone", server="off", cwd=tmp_path)
    assert served.returncode == alone.returncode == 0, served.stderr + alone.stderr

    new = served_lines(log)[before:]
    assert any(re.search(r"pid \d+: `segpipe segment .* --out served` in " + re.escape(str(tmp_path)), line)
               for line in new), new
    wait_for(lambda: any(re.search(r"pid \d+: exit 0 after", line) for line in served_lines(log)[before:]),
             what="the served command's exit in the log")
    imported = [name for line in served_lines(log)[before:] if "imported" in line
                for name in line.split("modules: ")[1].split(", ")]
    assert all(name.startswith("onnxruntime") for name in imported), imported  # the server preloads the rest

    assert served.stdout.replace("served", "OUT") == alone.stdout.replace("alone", "OUT")
    assert served.stderr.splitlines()[0] == alone.stderr.splitlines()[0]  # segmenting scene ... with ... on cpu
    image = sentinel_scene.stem
    for name in ("labels.tif", "preview.png"):
        served_file = tmp_path / "served" / image / name
        assert served_file.read_bytes() == (tmp_path / "alone" / image / name).read_bytes(), name
        assert served_file.stat().st_mode & 0o077 == 0, "written with the caller's umask (077)"
    assert (tmp_path / "alone" / image / "labels.tif").stat().st_mode & 0o044, "the umask made the difference"
    rows = [read_table(str(tmp_path / out / "stats"), "image_class").sort_by("class_id").select(COMPARED)
            for out in ("served", "alone")]
    assert rows[0].equals(rows[1])
    assert pc.sum(rows[0]["pixel_count"]).as_py() > 0


def test_bad_input_help_and_usage_errors_come_back_as_from_a_process_of_its_own(server, tmp_path):
    missing = tmp_path / "no-such-scene.tif"
    answers = [segpipe("segment", missing, "--model", "s2-cloud", "--out", tmp_path / "out", server=where)
               for where in (server, "off")]
    assert answers[0].returncode == answers[1].returncode == 2
    assert answers[0].stderr == answers[1].stderr
    assert str(missing) in answers[0].stderr

    helped = segpipe("segment", "--help", server=server)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: segpipe segment")
    usage = segpipe("segment", "--no-such-option", server=server)
    assert usage.returncode == 2 and "the following arguments are required: src, --model, --out" in usage.stderr
    assert segpipe("stats", tmp_path / "nothing-here", server=server).returncode == 2


@pytest.fixture(scope="module")
def slow_work(tmp_path_factory) -> tuple[Path, Path]:
    """A scene and a card that take seconds to segment on the CPU."""
    folder = tmp_path_factory.mktemp("slow")
    return write_tiled_scene(folder / "scene.tif", 3072), write_small_net_card(folder)


def command_process(log: Path, out: Path) -> int:
    """The process id the server gave the command writing to `out`."""
    for line in served_lines(log):
        found = re.match(rf".* pid (\d+): `segpipe .*--out {re.escape(str(out))}\b", line)
        if found:
            return int(found.group(1))
    raise LookupError


def test_ctrl_c_and_a_killed_process_reach_the_caller(server, slow_work, tmp_path):
    scene, card = slow_work
    log = server.parent / "server.log"
    for name, how, code, message in (("interrupted", signal.SIGINT, 130, "segpipe: interrupted"),
                                     ("killed", signal.SIGKILL, 128 + signal.SIGKILL, "killed by SIGKILL")):
        out = tmp_path / name
        caller = subprocess.Popen([str(SEGPIPE), "segment", str(scene), "--model", str(card), "--out", str(out),
                                   "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "SEGPIPE_SERVER": str(server)})
        wait_for(lambda: any(str(out) in line for line in served_lines(log)), what="the command's start")
        process = command_process(log, out)
        time.sleep(1.5)  # into the segment stage
        assert caller.poll() is None, "still running when interrupted"
        if how == signal.SIGINT:
            caller.send_signal(how)  # the terminal's Ctrl-C reaches the caller, which passes it on
        else:
            os.kill(process, how)  # the command's own process dies (the out-of-memory killer, say)
        stdout, stderr = caller.communicate(timeout=120)
        assert caller.returncode == code, stderr
        assert message in stderr
        wait_for(lambda: not Path(f"/proc/{process}").exists() or
                 Path(f"/proc/{process}/stat").read_text().split()[2] == "Z", what="the command's process to end")
    assert any(f"pid {command_process(log, tmp_path / 'killed')}: killed by SIGKILL" in line
               for line in served_lines(log))


def test_a_dead_servers_socket_is_passed_by(tmp_path):
    path = tmp_path / "dead.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # a socket file nobody listens on: what a killed server leaves
    left.close()
    answer = segpipe("segment", tmp_path / "missing.tif", "--model", "s2-cloud", "--out", tmp_path / "o", server=path)
    assert answer.returncode == 2 and "missing.tif: no such file" in answer.stderr  # run here, the same answer
    assert not (tmp_path / "server.log").exists()

    started = segpipe("serve", "--detach", server=path)  # and a new server takes its place
    assert started.returncode == 0, started.stderr
    again = segpipe("serve", "--detach", server=path)
    assert again.returncode == 2 and "already listens" in again.stderr
    assert "stopped" in segpipe("serve", "--stop", server=path).stdout
    assert not path.exists()
    assert "no segpipe server listens" in segpipe("serve", "--stop", server=path).stdout

    idle = segpipe("serve", "--detach", "--idle-exit", "1", server=path)
    assert idle.returncode == 0
    wait_for(lambda: not path.exists(), 30, "the idle server to stop")
    assert "idle for 1 s: stopping" in (tmp_path / "server.log").read_text()


def test_a_server_running_other_code_is_not_used(tmp_path, sentinel_scene):
    copy = tmp_path / "copy"
    for package in ("flows", "pipelines", "segworkers"):
        shutil.copytree(REPOSITORY / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    from_copy = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(copy)!r}); "
                                       "from flows.command import main; sys.exit(main())"]
    path = tmp_path / "copy.sock"
    started = segpipe("serve", "--detach", server=path, command=from_copy)
    assert started.returncode == 0, started.stderr
    try:
        # The installed segpipe is other code than the copy the server runs.
        installed = segpipe("segment", "--help", server=path)
        assert installed.returncode == 0 and installed.stdout.startswith("usage: segpipe segment")
        assert f"runs {copy}" in installed.stderr and "running the command here" in installed.stderr

        same = segpipe("segment", sentinel_scene, "--model", "s2-cloud", "--out", tmp_path / "b", server=path,
                       command=from_copy)
        assert same.returncode == 0 and "running the command here" not in same.stderr
        assert (tmp_path / "b" / sentinel_scene.stem / "labels.tif").exists()

        report = copy / "flows" / "report.py"
        report.write_text(report.read_text() + "\n# changed after the server started\n")
        changed = segpipe("segment", "--help", server=path, command=from_copy)
        assert changed.returncode == 0 and changed.stdout.startswith("usage: segpipe segment")
        assert "files changed since the server" in changed.stderr and "running the command here" in changed.stderr
        quiet = segpipe("-q", "segment", "--help", server=path, command=from_copy)
        assert quiet.returncode == 0 and quiet.stderr == ""
    finally:
        segpipe("serve", "--stop", server=path)
    log = (tmp_path / "server.log").read_text()
    assert len(re.findall(r"pid \d+: `segpipe segment", log)) == 1, log
    assert log.count("refused") == 3


def test_a_server_stopped_mid_command_leaves_the_next_servers_socket_alone(slow_work, tmp_path):
    scene, card = slow_work
    path = tmp_path / "segpipe.sock"
    assert segpipe("serve", "--detach", server=path).returncode == 0
    caller = subprocess.Popen([str(SEGPIPE), "-q", "segment", str(scene), "--model", str(card), "--out",
                               str(tmp_path / "out"), "--device", "cpu"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "SEGPIPE_SERVER": str(path)})
    wait_for(lambda: any("`segpipe -q segment" in line for line in served_lines(tmp_path / "server.log")),
             what="the command's start")
    assert "stopped" in segpipe("serve", "--stop", server=path).stdout  # it waits for its command
    assert segpipe("serve", "--detach", server=path).returncode == 0  # the next server, meanwhile
    try:
        _, stderr = caller.communicate(timeout=300)
        assert caller.returncode == 0, stderr  # the first server's command finished
        wait_for(lambda: any(line.endswith(" stopped") for line in served_lines(tmp_path / "server.log")),
                 what="the first server to stop")
        assert path.exists(), "the first server, stopping, removed the next one's socket"
        assert segpipe("segment", "--help", server=path).returncode == 0
        assert any("`segpipe segment --help`" in line for line in served_lines(tmp_path / "server.log"))
    finally:
        segpipe("serve", "--stop", server=path)
