"""A resident segpipe process (`segpipe serve`) that runs small commands without the start-up.

Most of a small command's time goes on starting. Python imports torch, rasterio, pyarrow and
the pipeline (about 2.5 s on a 2-core machine) before a 512² image's 0.1 s of model time. The
server imports all of that once.

Each command handed to it runs in a process forked from the server, so the imports are
already done. That process takes on the caller's arguments, working folder, environment,
umask and terminal: stdin, stdout and stderr are passed over the socket. It therefore prints,
exits and writes the same bytes as the command run in a process of its own. A fork per command
keeps commands apart: nothing one command loads, changes or breaks is seen by the next, and
several commands can run at once.

The fork is only safe because the server does nothing but import. It starts no work thread,
touches no GPU, opens no Zarr store and runs no torch operation. A CUDA context, OpenMP's thread
pool or Zarr's event-loop thread does not survive a fork.

`segpipe` hands `segment`, `stats`, `report`, `evaluate` and `models` to a server when one
listens on its socket (SEGPIPE_SERVER, default $XDG_RUNTIME_DIR/segpipe/server.sock). The
command runs in its own process instead in these cases:
- no server listens;
- SEGPIPE_SERVER=off;
- the server runs other code than the caller (another environment, or files changed since it
  started).

This module is imported by every `segpipe` command before anything else, so its own imports
are the standard library's only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SERVER_VARIABLE = "SEGPIPE_SERVER"
SERVED_COMMANDS = frozenset({"segment", "stats", "report", "evaluate", "models"})
# What the served commands import beyond flows.cli: imported by the server so that no command
# pays for it (the server's log names whatever a command still had to import). Not onnxruntime:
# its import starts threads, which a fork does not copy (and it takes 25 ms).
PRELOADED = ("flows.run", "flows.stages", "flows.report", "flows.html_report", "pipelines.stats_query",
             "pipelines.evaluation", "segworkers.models", "pandas", "dateutil", "PIL.PngImagePlugin",
             "PIL.JpegImagePlugin", "PIL.ImageDraw", "PIL.ImageFont", "rich.table", "rich._emoji_codes", "pyarrow.csv",
             "torch.utils.serialization", "torch.utils._device", "ukis_csmask")
PACKAGES = ("flows", "pipelines", "segworkers")
STOP = "stop"
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # 128 + SIGTERM


class ServerProblem(Exception):
    """`segpipe serve` cannot listen at its socket, and why."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class Terminated(KeyboardInterrupt):
    """SIGTERM to a night (a scheduler or `kill` stopping it): handled as Ctrl-C is, the work in
    progress stopped after its blocks on the model (terminated_as_interrupted)."""


def interrupted(stop: BaseException | None = None) -> int:
    """A command ended by Ctrl-C (or, for `stop` a Terminated, by SIGTERM): what is done is
    kept, and the same command resumes from it."""
    terminated = isinstance(stop, Terminated)
    print("segpipe: terminated" if terminated else "segpipe: interrupted", file=sys.stderr)
    # CPython 3.11 marks the process to end by SIGINT (exit status -2, not 130) once a
    # KeyboardInterrupt has passed out of an exec() of a string, even when it was caught later:
    # dataclasses and namedtuples make their methods so, and a Ctrl-C while one is defined
    # (an import) set the mark. The next exec() of a string clears it.
    exec("pass", {})
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def ends_at_once_when_interrupted() -> contextlib.AbstractContextManager:
    """Within (a command loading its modules, starting Ray, checking its input: nothing written
    yet), Ctrl-C ends the process at once with `segpipe: interrupted` and 130. A KeyboardInterrupt
    raised at any point of an import can land inside importlib's module locks or a weakref
    callback: the interrupt was then lost (the night ran on), or an import thread waited on a
    lock never released and the process did not exit. Processes the command started go with it:
    Prefect's temporary server by PR_SET_PDEATHSIG, Ray's by its reaper."""
    return _signal_handled(signal.SIGINT, signal.default_int_handler, _end_now)


def terminated_as_interrupted() -> contextlib.AbstractContextManager:
    """Within (a night's flow), SIGTERM raises Terminated in the main thread, so the night stops
    as on Ctrl-C: the blocks in progress are finished and kept, Prefect marks its flow run
    crashed instead of leaving it running for ever, and the exit code is 143. Outside, SIGTERM
    ends the process as before (nothing is written while a command loads)."""
    return _signal_handled(signal.SIGTERM, signal.SIG_DFL, _raise_terminated)


@contextlib.contextmanager
def _signal_handled(number: int, usual, handler) -> Iterator[None]:
    """`handler` for the signal within, then `usual` again; nothing changes where the handler is
    not `usual` already (a caller set its own) or this is not the main thread (none can be set)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(number) is not usual:
        yield
        return
    signal.signal(number, handler)
    try:
        yield
    finally:
        signal.signal(number, usual)


def _raise_terminated(number, frame) -> None:
    raise Terminated()


def _end_now(number, frame) -> None:
    os.write(2, b"segpipe: interrupted\n")  # not through sys.stderr: the signal may have come mid-write
    os._exit(EXIT_INTERRUPTED)


def socket_path() -> Path | None:
    """Where the server listens: SEGPIPE_SERVER, or None when it says off."""
    named = os.environ.get(SERVER_VARIABLE, "")
    if named.lower() in ("off", "0", "no", "none"):
        return None
    if named:
        return Path(named)
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/segpipe-{os.getuid()}"
    return Path(runtime) / "segpipe" / "server.sock"


def command_word(argv: list[str]) -> str | None:
    """The command of a `segpipe` command line: its first word that is not an option (segpipe's
    own options, -q -v --version -h, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def code_stamp() -> str:
    """Names, sizes and modification times of the package's files: a server started before a
    file changed runs the old code, and must not pass it off as the caller's."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for folder, subfolders, files in os.walk(Path(package_root()) / package):
            subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
            for name in sorted(files):
                state = os.stat(os.path.join(folder, name))
                digest.update(f"{folder}/{name} {state.st_size} {state.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --- messages: a 4-byte length, then JSON -----------------------------------------------------

def send_message(connection: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    connection.sendall(struct.pack("!I", len(data)) + data)


def receive_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        part = connection.recv(size - len(data))
        if not part:
            return None
        data += part
    return data


def receive_message(connection: socket.socket) -> dict | None:
    """The next message, or None when the other side closed the connection."""
    header = receive_exactly(connection, 4)
    if header is None:
        return None
    data = receive_exactly(connection, struct.unpack("!I", header)[0])
    return None if data is None else json.loads(data)


# --- the caller's side ------------------------------------------------------------------------

def hand_over(argv: list[str]) -> int | None:
    """Run a `segpipe` command line in the resident server: its exit code, or None when it is
    to run here (not a served command, no server, or one running other code)."""
    if command_word(argv) not in SERVED_COMMANDS:
        return None
    path = socket_path()
    if path is None or not path.exists():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            connection.connect(str(path))
        except OSError:  # nothing listens (a socket left by a server that died), or not this user's to use
            return None
        if peer_user(connection) != os.getuid():  # another user's server would get this one's environment
            print(f"note: the segpipe server at {path} runs as another user: not used", file=sys.stderr)
            return None
        return run_there(connection, argv)
    finally:
        connection.close()


def caller_state(argv: list[str]) -> dict:
    umask = os.umask(0o022)
    os.umask(umask)
    return {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask, "prefix": sys.prefix,
            "code": package_root(), "encodings": [[stream.encoding, stream.errors] for stream in (sys.stdout, sys.stderr)]}


def standard_streams() -> list[int]:
    """The caller's stdin, stdout and stderr (/dev/null for one that is closed)."""
    descriptors = []
    for descriptor in (0, 1, 2):
        try:
            os.fstat(descriptor)
            descriptors.append(descriptor)
        except OSError:
            descriptors.append(os.open(os.devnull, os.O_RDWR))
    return descriptors


def run_there(connection: socket.socket, argv: list[str]) -> int | None:
    try:
        state = caller_state(argv)
    except FileNotFoundError:  # the working folder is gone: the command says so when run here
        return None
    # Ctrl-C and the like reach this process (the terminal's foreground one): they are passed on
    # to the command's process, or kept until it has said who it is.
    process: list[int] = []
    pending: list[int] = []

    def pass_on(number, frame):
        if process:
            os.kill(process[0], number)
        else:
            pending.append(number)

    forwarded = {number: signal.signal(number, pass_on) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            socket.send_fds(connection, [b"F"], standard_streams())
            send_message(connection, state)
            reply = receive_message(connection)
        except OSError:  # the server went away before it took the command
            reply = None
        if reply is None or "refused" in reply:  # the server stopped meanwhile, or cannot run it
            if reply and "-q" not in argv and "--quiet" not in argv:
                print(f"note: {reply['refused']}: running the command here", file=sys.stderr)
            if pending:  # interrupted before anything ran
                raise KeyboardInterrupt
            return None
        process.append(reply["pid"])
        for number in pending:
            os.kill(process[0], number)
        try:
            ending = receive_message(connection)
        except OSError:
            ending = None
    finally:
        for number, handler in forwarded.items():
            signal.signal(number, handler)
    if ending is None:
        print("segpipe: error: the resident server's process for this command ended without an exit status",
              file=sys.stderr)
        return 1
    if "signal" in ending:
        name = signal.Signals(ending["signal"]).name
        print(f"segpipe: error: the command's process in the resident server was killed by {name}", file=sys.stderr)
        return 128 + ending["signal"]
    return ending["exit"]


def stop_server(path: Path) -> int | None:
    """Ask the server at `path` to stop: its process id, or None when none listens there."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
        socket.send_fds(connection, [b"F"], [])
        send_message(connection, {STOP: True})
        reply = receive_message(connection)
        return reply.get("pid") if reply else None
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    finally:
        connection.close()


# --- the server's side ------------------------------------------------------------------------

def preload() -> list[str]:
    """Import what the served commands use; the names that failed (an optional extra missing)."""
    import importlib

    missing = []
    for name in ("flows.cli", *PRELOADED):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    from PIL import Image

    Image.preinit()  # Pillow's common formats, else imported at the first image read or written
    return missing


def listen(path: Path) -> socket.socket:
    """The server's socket at `path`, in a folder only this user can enter. A socket there that
    nobody answers is left from a server that died, and is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise ServerProblem(path, "a segpipe server already listens here (stop it with `segpipe serve --stop`)")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)  # the socket itself: this user only
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise ServerProblem(path, f"cannot listen here: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def peer_user(connection: socket.socket) -> int:
    _pid, user, _group = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
    return user


def os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


class Server:
    def __init__(self, path: Path, idle_exit: float | None, log):
        self.path = path
        self.idle_exit = idle_exit
        self.log = log
        self.stamp = code_stamp()
        self.running: dict[int, tuple[socket.socket, float]] = {}
        """Per command process: the caller's connection, and when it started."""
        self.stopping = False
        self.last_activity = time.monotonic()

    def say(self, text: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", file=self.log, flush=True)

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(0.5)
        while not self.stopping:
            self.reap()
            if self.idle_exit is not None and not self.running and \
                    time.monotonic() - self.last_activity > self.idle_exit:
                self.say(f"idle for {self.idle_exit:g} s: stopping")
                break
            try:
                connection, _ = listener.accept()
            except (socket.timeout, InterruptedError):
                continue
            self.last_activity = time.monotonic()
            try:
                self.answer(connection, listener)
            except Exception as exc:  # noqa: BLE001 - one caller's broken request does not stop the server
                self.say(f"a request failed: {exc!r}")
                connection.close()
        self.stop_listening(listener)
        while self.running:  # the commands in progress finish, and their callers get their exit codes
            self.reap(block=True)

    def stop_listening(self, listener: socket.socket) -> None:
        """A command asked for from now on runs in its own process. The socket goes before the
        listener closes: a server started meanwhile finds no socket of this one to replace, and
        this one never removes the socket of a server started while it waits for its commands."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener.close()

    def answer(self, connection: socket.socket, listener: socket.socket) -> None:
        connection.settimeout(10)
        if peer_user(connection) != os.getuid():
            self.say("refused a connection from another user")
            connection.close()
            return
        _, streams, _, _ = socket.recv_fds(connection, 1, 3)
        try:
            request = receive_message(connection)
            if request is None:
                raise ConnectionError("the caller hung up")
            if request.get(STOP):
                send_message(connection, {"pid": os.getpid()})
                self.say("asked to stop")
                self.stopping = True
                connection.close()
                return
            refusal = self.refusal(request)
            if refusal:
                send_message(connection, {"refused": refusal})
                self.say(f"refused `{' '.join(request['argv'])}`: {refusal}")
                connection.close()
                return
            connection.settimeout(None)
            sys.stdout.flush()
            sys.stderr.flush()
            process = os.fork()
            if process == 0:
                run_command_here(connection, listener, [other for other, _ in self.running.values()], streams,
                                 request, self.say)  # never returns
            self.running[process] = (connection, time.monotonic())
            self.say(f"pid {process}: `segpipe {' '.join(request['argv'])}` in {request['cwd']}")
        finally:
            for descriptor in streams:
                os.close(descriptor)

    def refusal(self, request: dict) -> str | None:
        if request["prefix"] != sys.prefix or request["code"] != package_root():
            return (f"the segpipe server at {self.path} runs {package_root()} in {sys.prefix}, not this command's "
                    f"{request['code']} in {request['prefix']}")
        if code_stamp() != self.stamp:
            return (f"segpipe's files changed since the server at {self.path} started "
                    f"(restart it: segpipe serve --stop; segpipe serve --detach)")
        return None

    def reap(self, block: bool = False) -> None:
        while self.running:
            try:
                process, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.running.clear()
                return
            if process == 0:
                return
            connection, started = self.running.pop(process, (None, time.monotonic()))
            seconds = time.monotonic() - started
            if os.WIFSIGNALED(status):  # the process could not say how it ended: its caller hears it here
                number = os.WTERMSIG(status)
                self.say(f"pid {process}: killed by {signal.Signals(number).name} after {seconds:.2f} s")
                if connection is not None:
                    try:
                        send_message(connection, {"signal": number})
                    except OSError:
                        pass
            if connection is not None:
                connection.close()
            self.last_activity = time.monotonic()


def run_command_here(connection: socket.socket, listener: socket.socket, others: list[socket.socket],
                     streams: list[int], request: dict, say) -> None:
    """In the forked process: become the caller's command, run it, send its exit code, exit."""
    code = 1
    try:
        try:
            listener.close()
            for other in others:
                other.close()
            os.setpgid(0, 0)  # the server's own Ctrl-C (when run in a terminal) leaves running commands alone
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for number in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(number, signal.SIG_DFL)
            sys.stdout.flush()
            sys.stderr.flush()
            for target, descriptor in zip((0, 1, 2), streams):
                os.dup2(descriptor, target)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            os.umask(request["umask"])
            sys.argv = [sys.argv[0], *request["argv"]]
            become_callers_terminal(request)
            from flows.cli import main
        except BaseException as exc:  # noqa: BLE001 - nothing ran: the caller runs the command itself
            say(f"pid {os.getpid()}: could not take over `segpipe {' '.join(request['argv'])}`: {exc!r}")
            send_message(connection, {"refused": f"the segpipe server could not take the command over ({exc})"})
            return
        modules_before = set(sys.modules)
        started = time.monotonic()
        send_message(connection, {"pid": os.getpid()})
        try:
            code = main(request["argv"]) or 0
        except SystemExit as exc:  # argparse's usage errors and --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except KeyboardInterrupt:  # before flows.cli's own handler took over
            code = interrupted()
        except BaseException:  # noqa: BLE001 - as Python would: the traceback on the caller's stderr
            import traceback

            traceback.print_exc()
            code = 1
        finish_like_an_exiting_interpreter()
        send_message(connection, {"exit": code})
        imported = sorted(set(sys.modules) - modules_before)
        # What it had to import is what PRELOADED could add.
        say(f"pid {os.getpid()}: exit {code} after {time.monotonic() - started:.2f} s" +
            (f"; imported {len(imported)} modules: {', '.join(imported[:20])}" if imported else ""))
    finally:
        os._exit(code)


EARLIER_STREAMS: list = []
"""In a command's process: the server's stdout and stderr objects, flushed at the end as well."""


def become_callers_terminal(request: dict) -> None:
    """Standard streams, console and torch's threads as a process started by the caller would
    have them. Python set them up when the server started, for the server's terminal or log and
    environment (a buffered, seekable log file, say); other modules may still hold the old
    stream objects, which now write to the caller's streams too."""
    for name, descriptor, (encoding, errors) in zip(("stdout", "stderr"), (1, 2), request["encodings"]):
        EARLIER_STREAMS.append(getattr(sys, name))
        getattr(sys, name).flush()
        # As Python opens them: stderr line-buffered, stdout when it is a terminal.
        stream = open(descriptor, "w", encoding=encoding, errors=errors, closefd=False,
                      buffering=1 if descriptor == 2 or os.isatty(descriptor) else -1)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.stdin = sys.__stdin__ = open(0, encoding=request["encodings"][0][0], closefd=False)
    from flows.progress import reopen_console

    reopen_console()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def finish_like_an_exiting_interpreter() -> None:
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # joins the threads still going, as at exit
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, *EARLIER_STREAMS):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def serve(path: Path, idle_exit: float | None = None, detach: bool = False) -> int:
    """`segpipe serve`: listen at `path` until stopped (SIGTERM, Ctrl-C, `segpipe serve --stop`,
    or `idle_exit` seconds with nothing to do). With `detach`, in the background: this returns
    once the server is ready, and it logs to server.log beside its socket."""
    if detach:
        return serve_detached(path, idle_exit)
    started = time.monotonic()
    missing = preload()
    listener = listen(path)
    # A copy of stderr: a command's process writes to its caller's stderr, through descriptor 2.
    server = Server(path, idle_exit, os.fdopen(os.dup(2), "w", buffering=1))
    if missing:
        server.say(f"could not preload {', '.join(missing)} (commands that need them import them themselves)")
    server.say(f"segpipe server (pid {os.getpid()}) listening at {path}, ready in {time.monotonic() - started:.1f} s; "
               f"OS threads: {os_threads()}")
    return run_server(server, listener)


def run_server(server: Server, listener: socket.socket) -> int:
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda number, frame: setattr(server, "stopping", True))
    try:
        server.serve(listener)
    finally:
        if listener.fileno() != -1:  # serve() ended by an exception: it did not stop listening
            server.stop_listening(listener)
        server.say("stopped")
    return 0


def serve_detached(path: Path, idle_exit: float | None) -> int:
    """Fork the server into the background; report here once it listens, or why it could not."""
    log_path = path.parent / "server.log"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ready_read, ready_write = os.pipe()
    process = os.fork()
    if process:
        os.close(ready_write)
        with os.fdopen(ready_read) as ready:
            answer = ready.read()
        os.waitpid(process, 0)  # the intermediate process: the server itself is its child
        if not answer.startswith("ready"):
            raise ServerProblem(path, answer.strip() or f"the server did not start (see {log_path})")
        print(f"segpipe server (pid {answer.split()[1]}) listening at {path}; log: {log_path}")
        return 0
    # The intermediate process: a new session, then the server as its child (no terminal to lose).
    os.close(ready_read)
    os.setsid()
    if os.fork():
        os._exit(0)
    code = 1
    try:
        log = open(log_path, "a", buffering=1)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        started = time.monotonic()
        missing = preload()
        try:
            listener = listen(path)
        except ServerProblem as exc:
            os.write(ready_write, exc.reason.encode())
            raise
        server = Server(path, idle_exit, log)
        if missing:
            server.say(f"could not preload {', '.join(missing)}")
        server.say(f"segpipe server (pid {os.getpid()}) listening at {path}, ready in "
                   f"{time.monotonic() - started:.1f} s; OS threads: {os_threads()}")
        os.write(ready_write, f"ready {os.getpid()}".encode())
        os.close(ready_write)
        code = run_server(server, listener)
    except BaseException:  # noqa: BLE001 - logged; the caller was told
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)

