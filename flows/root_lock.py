"""One run at a time per output root.

A run holds an exclusive lock on <root>/.segpipe.lock (flock) for as long as it writes there;
a second run on the same root is refused with the holder's pid and run id. The kernel drops
the lock when the holder dies, however it dies (kill -9 included), so a crashed run never
leaves the root locked. The lock file also tells whether the root is writable at all: a
read-only or full root fails here, before any work.

Object storage has no flock: on an s3:// root the lock is a lease object created with one
conditional PUT (If-None-Match: *, so of two runs exactly one creates it), renewed by the
holder every LEASE_S / 4 seconds and deleted when the run ends. A holder that died without
deleting it (kill -9, a lost node) blocks the root until its lease has run out (LEASE_S,
default 10 minutes, `SEGPIPE_LOCK_LEASE_S`), after which the next run takes it over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines import storage
from pipelines.errors import InputError

LOCK_NAME = ".segpipe.lock"
logger = logging.getLogger(__name__)


def lease_seconds() -> float:
    return float(os.environ.get("SEGPIPE_LOCK_LEASE_S", 600))


class RootBusy(InputError):
    """Another run holds the output root."""


def storage_problem(root: Path, exc: OSError) -> InputError | None:
    """An InputError for an output root that cannot take writes (read-only, full, forbidden)."""
    reasons = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
               errno.EPERM: "is not writable (operation not permitted)", errno.ENOSPC: "has no space left on its device",
               errno.EDQUOT: "is over its disk quota"}
    if exc.errno in reasons:
        return InputError(root, f"the output root {reasons[exc.errno]} ({exc.strerror}: {exc.filename or root})")
    return None


def holder_record(run_id: str, **extra) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
            "since": dt.datetime.now().isoformat(timespec="seconds"), **extra}


def root_busy(root: str | Path, holder: str) -> RootBusy:
    return RootBusy(root, f"another segpipe run is writing to this output root ({holder}); "
                          "wait for it to finish or use another --out")


@contextlib.contextmanager
def root_lock(root: str | Path, run_id: str) -> Iterator[None]:
    if storage.is_remote(root):
        with object_store_lock(str(root), run_id):
            yield
        return
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_NAME, "a+")
    except OSError as exc:  # a file in its place, a parent that is a file or cannot hold folders
        raise (storage_problem(root, exc) or InputError(
            root, f"the output root cannot be made a folder ({exc.strerror}: {exc.filename or root})")) from exc
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise root_busy(root, holder) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder_record(run_id)))
            handle.flush()
        except OSError as exc:
            raise (storage_problem(root, exc) or exc) from exc
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock


@contextlib.contextmanager
def object_store_lock(root: str, run_id: str) -> Iterator[None]:
    """The lease lock of an object-storage root (see the module docstring)."""
    lock_uri = storage.join(root, LOCK_NAME)
    lease = lease_seconds()
    holder_id = secrets.token_hex(8)

    def record() -> bytes:
        return json.dumps(holder_record(run_id, holder=holder_id, expires=time.time() + lease)).encode()

    def still_ours() -> bool:
        try:
            return json.loads(storage.read_bytes(lock_uri)).get("holder") == holder_id
        except (FileNotFoundError, ValueError):
            return False

    if not storage.write_if_absent(lock_uri, record()):
        try:
            holder = json.loads(storage.read_bytes(lock_uri))
        except (FileNotFoundError, ValueError):
            holder = {"expires": 0}  # vanished or torn meanwhile: as good as expired
        if holder.get("expires", 0) > time.time():
            described = {k: holder[k] for k in ("pid", "host", "run_id", "since") if k in holder}
            raise root_busy(root, json.dumps(described))
        storage.remove(lock_uri)  # an expired lease: its holder died without releasing it
        if not storage.write_if_absent(lock_uri, record()):
            raise root_busy(root, "another run took over the expired lock just now")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 4):
            try:
                # Not atomic, but it narrows the window: a holder stalled past its lease does not
                # overwrite the lease of the run that took the root over.
                if not still_ours():
                    logger.error("lost the lease on %s: another run took the output root over", lock_uri)
                    return
                storage.write_whole(lock_uri, record())
            except OSError as exc:  # a blip of the object store: try again at the next turn
                logger.warning("could not renew the lease on %s: %s", lock_uri, exc)

    renewer = threading.Thread(target=renew, name="segpipe-lock-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if still_ours():
            storage.remove(lock_uri)
