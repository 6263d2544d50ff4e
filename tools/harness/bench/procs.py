"""Child processes of a benchmark run: start, wait until ready, read their CPU time, stop.

Every server measured (anchor or project) runs in its own process so the load generator does not share its
interpreter. :class:`Child` owns one ``subprocess.Popen``; its stderr goes to a log file (never a pipe nobody
reads) whose tail is shown when the child fails. CPU time comes from ``/proc/<pid>/stat`` (utime + stime).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

__all__ = [
    "BenchError",
    "Child",
    "cpu_seconds",
    "free_port",
    "machine_busy",
    "repo_root",
    "python_module_cmd",
]

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(RuntimeError):
    """A benchmark could not be set up (a server did not start, a tool is missing); the message says why."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def python_module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc); raises OSError when it is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "; field 3 (state) is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float | None:
    """CPU-seconds all CPUs have spent busy since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            first = f.readline().split()
    except OSError:
        return None
    v = [int(x) for x in first[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def free_port(kind: int = socket.SOCK_DGRAM, also_tcp: bool = False, host: str = "127.0.0.1") -> int:
    """A port free right now (UDP, and TCP too when ``also_tcp``): bind 0 and close. Racy but fine locally."""
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
    raise BenchError("no free port found")


class Child:
    """One server process. ``start()`` then ``wait_ready_line()`` or a custom readiness probe; ``stop()``."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = env
        self.cwd = cwd or repo_root()
        self._own_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="ida-bench-"))
        self.log_path = self.log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self._partial = b""
        self.stdout_lines: list[bytes] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, stdout_pipe: bool = False) -> Child:
        if shutil.which(self.cmd[0]) is None and not os.path.exists(self.cmd[0]):
            raise BenchError(f"{self.name}: {self.cmd[0]} not found")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("PYTHONPATH", str(repo_root()))
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def fail(self, why: str) -> BenchError:
        tail = self.log_tail()
        return BenchError(f"{self.name}: {why}" + (f"\n--- {self.log_path} ---\n{tail}" if tail else ""))

    def wait_ready_line(self, timeout: float = 20.0) -> int:
        """Read stdout until ``READY <port>``; returns the port."""
        return int(self.wait_line(rb"^READY (\d+)", timeout).group(1))

    def wait_line(self, pattern: bytes, timeout: float = 20.0) -> re.Match[bytes]:
        """Read stdout (started with ``stdout_pipe``) until a line matches ``pattern``; every line read is
        kept in ``stdout_lines``."""
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
            f"not ready after {timeout:.0f} s" if self.alive() else f"exited with {self.proc.returncode}"
        )

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; only this child (by pid)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                rest = self._partial + self.proc.stdout.read()
                self._partial = b""
                self.stdout_lines.extend(line for line in rest.split(b"\n") if line)
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
