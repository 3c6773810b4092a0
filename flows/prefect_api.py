"""Prefect's API for one command: the server PREFECT_API_URL names, else a temporary one of the
command's own, started at once and waited for only when the flow needs it.

    with prefect_api() as ready:
        ...            # other start-up work (imports, Ray, the model check) while the server starts
        ready()        # before the first call to the API
        run_the_flow()

Prefect itself would start the same temporary server (uvicorn running the API app in
ephemeral mode: no UI, no background services) on first use, and wait for it then; starting it
here lets its start-up (several seconds) overlap the command's own. The server is bound to this
process: the kernel stops it when the process dies however it dies (Linux PR_SET_PDEATHSIG; the
signal follows the thread that started the child, so it is started from the calling, main
thread), and it is stopped when the process exits, after Prefect has sent its last logs and
events to it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 120.0
# The server's telemetry heartbeat races the first migrations on SQLite ("database is locked")
# and has no network to report to anyway; the client's telemetry prints a notice on a user's
# terminal the first time Prefect is imported.
QUIET_ENVIRONMENT = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def quiet_prefect() -> None:
    """Prefect's telemetry off unless the environment says otherwise: call before importing Prefect."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def _stop_with_parent() -> None:
    """In the child, between fork and exec: SIGKILL it when the parent (thread) dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """The API server Prefect's ephemeral mode runs, as a child of this process."""

    def __init__(self):
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        prefect_folder = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])
        environment = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                       "PREFECT__SERVER_FINAL": "1", **QUIET_ENVIRONMENT}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_folder.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=environment, preexec_fn=_stop_with_parent, stdout=subprocess.DEVNULL,
            # Out of the terminal's process group: a Ctrl-C meant for the command interrupted
            # the server's start-up too, which printed click's "Aborted!" or a traceback. The
            # command stops it at exit; the kernel, when the command dies.
            start_new_session=True,
        )
        # Registered before Prefect starts its log and event workers, so it runs after their own
        # exit handlers have sent what they hold (atexit runs the last registered first).
        atexit.register(self.stop)

    def wait(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary API server exited with code {self.process.returncode} "
                                   "before it answered")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Prefect's temporary API server did not answer within {STARTUP_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # or Ctrl-C as the command ends: not waited for
            self.process.kill()
            self.process.wait()


_early_server: TemporaryServer | None = None


def start_server_early() -> None:
    """For `segpipe run` and `demo` in a process of their own: start the temporary server (where
    none is named) before the command's own modules load, for prefect_api() to take. Those
    imports take a second or more, and the server's start-up, its 5 s, decides when the night
    can begin."""
    global _early_server
    if _early_server is None and sys.platform.startswith("linux") and not names_a_server():
        _early_server = TemporaryServer()


def names_a_server() -> bool:
    """The environment names Prefect's API (PREFECT_API_URL): no temporary server of our own.
    (A Prefect profile may name one too: prefect_api() looks once Prefect is imported.)"""
    return bool(os.environ.get("PREFECT_API_URL"))


def take_early_server() -> TemporaryServer | None:
    global _early_server
    server, _early_server = _early_server, None
    return server


@contextlib.contextmanager
def prefect_api() -> Iterator[Callable[[], None]]:
    """Within: Prefect talks to the server PREFECT_API_URL names, or to a temporary server of
    this process's own (stopped at exit). Yields the function that waits until it answers."""
    if not sys.platform.startswith("linux"):  # Prefect starts its own when it needs one
        yield lambda: None
        return
    # Started before Prefect is imported (a second or two): dropped if its settings name a server.
    server = take_early_server() or (None if names_a_server() else TemporaryServer())
    quiet_prefect()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if server is None or PREFECT_API_URL.value():
        if server is not None:
            server.stop()
        yield lambda: None
        return
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.wait
