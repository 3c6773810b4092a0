"""Progress on the terminal for the long stages (ingest shards, segment blocks).

One rich Progress display is shared by every stage running at the time (a flow runs several
images at once, each in its own thread; rich allows one live display per console). In a flow,
finished stages are removed from the display (`transient_stages`), leaving the run's own bar.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def console_settings() -> dict:
    # Not a terminal (cron, CI, a worker's log): no width to fit, so lines are not cut at 80 columns.
    return {"stderr": True, "width": None if sys.stderr.isatty() else 200}


console = Console(**console_settings())
# quiet: results and errors only; normal: segpipe's progress and notes; verbose: also Prefect's
# and Ray's own messages. In the environment, so that it holds in every thread and subprocess.
VERBOSITY = "SEGPIPE_VERBOSITY"


# segpipe's own loggers: their warnings are notes to the user, printed through `console` (above
# the progress bars) unless -v hands every message to Prefect's log format.
SEGPIPE_LOGGERS = ("flows", "pipelines", "segworkers")


class NoteHandler(logging.Handler):
    """segpipe's warnings and errors as `warning: ...` lines above the progress display."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"{record.levelname.lower()}: {record.getMessage()}", highlight=False, markup=False,
                      soft_wrap=True)


def reopen_console() -> None:
    """Set the console up again for another terminal and environment (a command run by the
    resident server, flows.resident). Rich reads the terminal's colours and width when a
    Console is made, and the modules that print hold this one object: it is made again in place."""
    console.__init__(**console_settings())


def set_verbosity(level: str) -> None:
    """How much a command prints. Set before Prefect is imported: Prefect's console log (library
    warnings, its run logs: also in its UI) is shown with -v only, so that one progress display
    and segpipe's own notes hold the terminal."""
    os.environ[VERBOSITY] = level
    prefect_level = "INFO" if level == "verbose" else "WARNING"
    os.environ["PREFECT_LOGGING_LEVEL"] = prefect_level  # for Prefect imported from now on
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "NOTSET" if level == "verbose" else "CRITICAL"
    logging.getLogger("prefect").setLevel(prefect_level)
    for name in SEGPIPE_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, NoteHandler)]:
            logger.removeHandler(handler)
        if level != "verbose":  # with -v they reach Prefect's console log like any other message
            logger.addHandler(NoteHandler(logging.ERROR if level == "quiet" else logging.WARNING))


def verbosity() -> str:
    return os.environ.get(VERBOSITY, "normal")


def note(text: str) -> None:
    """A one-line note for the user (not an error): shown unless quiet."""
    if verbosity() != "quiet":
        console.print(f"note: {text}", highlight=False, markup=False, soft_wrap=True)
_lock = threading.Lock()
_shared: dict = {"progress": None, "users": 0, "transient_stages": False}


@contextmanager
def shared_progress() -> Iterator[Progress]:
    with _lock:
        if _shared["progress"] is None:
            _shared["progress"] = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
                disable=verbosity() == "quiet",
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
    """Yields a function to call as work finishes: advance() for one unit, advance(n) for n."""
    with shared_progress() as progress:
        task = progress.add_task(description, total=total, completed=completed)
        try:
            yield lambda units=1: progress.advance(task, units)
        finally:
            if _shared["transient_stages"]:
                progress.remove_task(task)
