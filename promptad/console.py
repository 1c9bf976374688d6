"""The console of a promptad command: its own lines, and Ray's only with --verbose.

A command that succeeds prints its progress lines and its summary, then one line naming where
Ray's output went (`closing_line`). Without --verbose, from the moment Ray starts:

- Ray's Python loggers in this process ("ray", "ray.data", "ray.train", ...) and warnings raised
  inside Ray's code go to the log file (LOG_DIR/<command>-<UTC time>-<pid>.log);
- what Ray's C++ core writes straight to this process's stderr (`core_worker.cc` lines) goes to
  the same file: file descriptor 2 is pointed at it, while Python's sys.stderr keeps the terminal;
- the output of Ray's workers and actors is not forwarded to this process (log_to_driver=False;
  the `(PlacementGroupCleaner ...)`, `TrainingReport(...)` lines); it stays in the Ray session's
  log folder on each node, which the closing line names for a local Ray.

Lines of our own printed inside a Ray actor (fit's one line per epoch, which runs in the Ray
Train controller) still reach the console: `say` sends them to a small relay actor that a thread
of the driver drains. With --verbose nothing is redirected and Ray forwards its workers' output.

Everything here is process state set up once per command by cli.main (`session`) and used by
raycluster.connect; library callers without a session get Ray's default console.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

RELAY_NAME = "promptad-console-relay"
RELAY_POLL_S = 0.25
_RAY_PATH = os.sep + "ray" + os.sep  # warnings raised in files under site-packages/ray/



def counted(n: float, noun: str, plural: str | None = None) -> str:
    """"1 epoch", "3 epochs", "0.5 CPUs", "2 categories": a count with its noun in the right
    number (`plural` for an irregular one)."""
    return f"{n:g} {noun}" if n == 1 else f"{n:g} {plural or noun + 's'}"

def log_dir() -> str:
    """Where log files go: $PROMPTAD_LOG_DIR, else <tmp>/promptad-logs (writable on every node)."""
    return os.environ.get("PROMPTAD_LOG_DIR") or os.path.join(tempfile.gettempdir(), "promptad-logs")


class _Session:
    """One command's console state (see the module docstring)."""

    def __init__(self, command: str, verbose: bool):
        self.command = command
        self.verbose = verbose
        self.log_dir: str | None = None  # set_log_dir (the demo keeps its log in its workdir)
        self.log_path: str | None = None
        self.ray_logs: str | None = None  # the Ray session's log folder, when it is on this machine
        self._log: io.TextIOWrapper | None = None
        self._handler: logging.Handler | None = None
        self._saved_fd: int | None = None
        self._old_stderr = None
        self._old_showwarning = None

    # ---------------------------------------------------------------- before and after ray.init
    def prepare_for_ray(self) -> None:
        """Open the log file and send Ray's console output there (idempotent)."""
        if self._log is not None:
            return
        folder = self.log_dir or log_dir()
        os.makedirs(folder, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.log_path = os.path.join(folder, f"{self.command}-{stamp}-{os.getpid()}.log")
        self._log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self._handler = logging.StreamHandler(self._log)
        self._handler.setLevel(logging.INFO)  # Ray Data's DEBUG lines are in its own file already
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if not self.verbose:
            self._old_showwarning = warnings.showwarning
            warnings.showwarning = self._showwarning
            self._redirect_fd2()
        self.capture_ray_loggers()

    def _showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if _RAY_PATH in str(filename) and self._log is not None:
            self._log.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            self._old_showwarning(message, category, filename, lineno, file, line)

    def _redirect_fd2(self) -> None:
        """fd 2 -> the log file (C++ writes); sys.stderr stays on the terminal where it was fd 2."""
        try:
            stderr_is_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            stderr_is_fd2 = False  # e.g. pytest's capture: Python's stderr is not fd 2 anyway
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        if stderr_is_fd2:
            self._old_stderr = sys.stderr
            sys.stderr = open(os.dup(self._saved_fd), "w", buffering=1, encoding=sys.stderr.encoding,
                              errors="backslashreplace")
        os.dup2(self._log.fileno(), 2)

    def capture_ray_loggers(self) -> None:
        """Send Ray's Python loggers to the log file, and (unless --verbose) no longer to the
        console. Ray adds its console handlers when it is imported, when Ray Data is imported and
        in ray.init, so connect calls this after each."""
        if self._handler is None:
            return
        names = ["ray"] + [n for n in list(logging.root.manager.loggerDict) if n.startswith("ray.")]
        for name in names:
            logger = logging.getLogger(name)
            console = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                       and not isinstance(h, logging.FileHandler) and h is not self._handler]
            if not console:
                continue
            if not self.verbose:
                for h in console:
                    logger.removeHandler(h)
            if self._handler not in logger.handlers:
                logger.addHandler(self._handler)

    def ray_started(self, context) -> None:
        info = getattr(context, "address_info", None) or {}
        session_dir = info.get("session_dir") if isinstance(info, dict) else None
        if session_dir:
            self.ray_logs = os.path.join(session_dir, "logs")
        self.capture_ray_loggers()

    def ray_init_kwargs(self) -> dict:
        return {"log_to_driver": self.verbose}

    # ---------------------------------------------------------------- end of the command
    def close(self) -> None:
        stop_relay()
        if self._saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None
        if self._old_stderr is not None:
            sys.stderr.close()
            sys.stderr = self._old_stderr
            self._old_stderr = None
        if self._old_showwarning is not None:
            warnings.showwarning = self._old_showwarning
            self._old_showwarning = None
        # The handler stays on Ray's loggers (Ray may still log while it shuts down at exit),
        # writing to the file until the process ends.

    def closing_line(self) -> str | None:
        if self.log_path is None:
            return None
        workers = f"; its workers' logs: {self.ray_logs}" if self.ray_logs else ""
        shown = "also shown above (--verbose)" if self.verbose else "add --verbose to see them here"
        return f"promptad: Ray's logs: {self.log_path}{workers} ({shown})"


_SESSION: _Session | None = None


@contextmanager
def session(command: str, verbose: bool = False) -> Iterator[_Session]:
    """The console of one command (cli.main wraps every command in one)."""
    global _SESSION
    previous, _SESSION = _SESSION, _Session(command, verbose)
    try:
        yield _SESSION
    finally:
        _SESSION.close()
        _SESSION = previous


def current() -> _Session | None:
    return _SESSION


def set_log_dir(folder: str) -> None:
    """Keep this command's log file in `folder` (before Ray starts; the demo uses its workdir)."""
    if _SESSION is not None:
        _SESSION.log_dir = folder


# --------------------------------------------------------------------------- the relay
_RELAY_THREAD: threading.Thread | None = None
_RELAY_STOP = threading.Event()
_RELAY_HANDLE = None  # in a worker: the driver's relay actor, looked up once


class _Relay:
    """Lines from Ray actors, held until the driver takes them."""

    def __init__(self):
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def start_relay() -> None:
    """Create this job's relay actor (0 CPUs) and a driver thread that prints what arrives."""
    global _RELAY_THREAD
    import ray

    if _RELAY_THREAD is not None and _RELAY_THREAD.is_alive():
        return
    relay = ray.remote(num_cpus=0)(_Relay).options(name=RELAY_NAME, get_if_exists=True).remote()
    _RELAY_STOP.clear()

    def drain() -> None:
        while True:
            stopping = _RELAY_STOP.wait(RELAY_POLL_S)
            try:
                lines = ray.get(relay.take.remote(), timeout=10) if ray.is_initialized() else []
            except Exception:  # noqa: BLE001 - Ray shutting down: nothing more will come
                return
            for line in lines:
                print(line, flush=True)
            if stopping:
                return

    _RELAY_THREAD = threading.Thread(target=drain, name="promptad-console-relay", daemon=True)
    _RELAY_THREAD.start()


def stop_relay() -> None:
    """Print what is still in the relay, then stop the thread."""
    global _RELAY_THREAD
    if _RELAY_THREAD is not None:
        _RELAY_STOP.set()
        _RELAY_THREAD.join(timeout=15)
        _RELAY_THREAD = None


def say(line: str) -> None:
    """Print one of our lines on the command's console, from the driver or from inside a Ray
    actor or task (through the relay; where there is none, it goes to that worker's log)."""
    global _RELAY_HANDLE
    if _RELAY_THREAD is not None:  # this process is the driver
        print(line, flush=True)
        return
    try:
        import ray

        if ray.is_initialized():
            if _RELAY_HANDLE is None:
                _RELAY_HANDLE = ray.get_actor(RELAY_NAME)
            ray.get(_RELAY_HANDLE.put.remote(line), timeout=10)
            return
    except Exception:  # noqa: BLE001 - no relay (a driver without a console session): print here
        pass
    print(line, flush=True)

