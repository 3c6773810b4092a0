"""The `segpipe` command's entry point. A command that a resident server (`segpipe serve`,
flows.resident) can run is handed to it when one listens; every other command, and every
command when none listens, runs in this process (flows.cli)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from flows.resident import ends_at_once_when_interrupted, hand_over, interrupted

    argv = sys.argv[1:] if argv is None else argv
    try:
        code = hand_over(argv)
    except KeyboardInterrupt:  # before the server's process began the command
        return interrupted()
    if code is not None:
        return code
    with ends_at_once_when_interrupted():  # while the command's modules load
        if runs_a_flow(argv):
            from flows.prefect_api import start_server_early

            start_server_early()
        from flows.cli import leave_to_exit, main as run_here
    try:
        code = run_here(argv)
    except KeyboardInterrupt as stop:  # before flows.cli's own handler took over, or after it
        return interrupted(stop)
    leave_to_exit()
    return code


def runs_a_flow(argv: list[str]) -> bool:
    """`argv` names `run` or `demo` (the first word not an option: segpipe's own options take no
    value), and asks for no help."""
    command = next((word for word in argv if not word.startswith("-")), None)
    return command in ("run", "demo") and not {"-h", "--help", "--version"} & set(argv)
