"""Progress on the terminal for the long stages (ingest shards, segment blocks).

One rich Progress display is shared by every stage running at the time (a flow runs several
images at once, each in its own thread; rich allows one live display per console). In a flow,
finished stages are removed from the display (`transient_stages`), leaving the run's own bar.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
_lock = threading.Lock()
_shared: dict = {"progress": None, "users": 0, "transient_stages": False}


@contextmanager
def shared_progress() -> Iterator[Progress]:
    with _lock:
        if _shared["progress"] is None:
            _shared["progress"] = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=False,
            )
            _shared["progress"].start()
        _shared["users"] += 1
        progress = _shared["progress"]
    try:
        yield progress
    finally:
        with _lock:
            _shared["users"] -= 1
            if _shared["users"] == 0:
                progress.stop()
                _shared["progress"] = None


@contextmanager
def transient_stages() -> Iterator[None]:
    """Within: finished stage bars disappear (a flow over many images)."""
    _shared["transient_stages"] = True
    try:
        yield
    finally:
        _shared["transient_stages"] = False


@contextmanager
def stage_progress(description: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yields a function to call once per finished unit of work."""
    with shared_progress() as progress:
        task = progress.add_task(description, total=total, completed=completed)
        try:
            yield lambda *_: progress.advance(task)
        finally:
            if _shared["transient_stages"]:
                progress.remove_task(task)
