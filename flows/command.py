"""The `segpipe` command's entry point. A command that a resident server (`segpipe serve`,
flows.resident) can run is handed to it when one listens; every other command, and every
command when none listens, runs in this process (flows.cli)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from flows.resident import hand_over, interrupted

    argv = sys.argv[1:] if argv is None else argv
    try:
        code = hand_over(argv)
    except KeyboardInterrupt:  # before the server's process began the command
        return interrupted()
    if code is not None:
        return code
    from flows.cli import main as run_here

    return run_here(argv)
