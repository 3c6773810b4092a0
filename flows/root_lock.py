"""One run at a time per output root.

A run holds an exclusive lock on <root>/.segpipe.lock (flock) for as long as it writes there;
a second run on the same root is refused with the holder's pid and run id. The kernel drops
the lock when the holder dies, however it dies (kill -9 included), so a crashed run never
leaves the root locked. The lock file also tells whether the root is writable at all: a
read-only or full root fails here, before any work.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import InputError

LOCK_NAME = ".segpipe.lock"


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


@contextlib.contextmanager
def root_lock(root: str | Path, run_id: str) -> Iterator[None]:
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_NAME, "a+")
    except OSError as exc:
        raise (storage_problem(root, exc) or exc) from exc
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RootBusy(root, f"another segpipe run is writing to this output root ({holder}); "
                                 "wait for it to finish or use another --out") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                                     "since": dt.datetime.now().isoformat(timespec="seconds")}))
            handle.flush()
        except OSError as exc:
            raise (storage_problem(root, exc) or exc) from exc
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock
