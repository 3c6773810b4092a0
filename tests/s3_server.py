"""A real S3 server for tests: moto's HTTP server in a subprocess, on loopback only.

Not the in-process `mock_aws` patch: s3fs, boto3 and GDAL's /vsis3/ all talk HTTP to it, so
the same code paths run as against MinIO or AWS.

Register it as a fixture in tests/conftest.py with

    from s3_server import s3_endpoint
    s3_server = pytest.fixture(scope="session", name="s3_server")(s3_endpoint)

A test that asks for `s3_server` gets the endpoint URL (http://127.0.0.1:PORT), and the
process environment points botocore, s3fs and pipelines.storage at it for the whole session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 2.0

# Fake credentials (moto accepts any); the shared config/credentials files are replaced by an
# empty file so that a developer's real profile can never be picked up by a test.
TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    # No instance-metadata lookups (each would wait for a timeout on a machine off EC2).
    "AWS_EC2_METADATA_DISABLED": "true",
}
CLEARED = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick; the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until_answers(endpoint: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=REQUEST_TIMEOUT_S):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise TimeoutError(f"moto server at {endpoint} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run `python -m moto.server` on 127.0.0.1 and a free port; yields the endpoint URL."""
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_answers(endpoint, server, STARTUP_TIMEOUT_S)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """Point botocore/s3fs/GDAL at `endpoint` with test credentials; restore afterwards."""
    saved = {name: os.environ.get(name) for name in (*TEST_ENVIRONMENT, *CLEARED, "AWS_ENDPOINT_URL")}
    try:
        for name in CLEARED:
            os.environ.pop(name, None)
        os.environ.update(TEST_ENVIRONMENT, AWS_ENDPOINT_URL=endpoint)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_endpoint() -> Iterator[str]:
    """Fixture body: a running moto S3 server and the environment pointing at it."""
    with moto_server() as endpoint, s3_environment(endpoint):
        yield endpoint
