"""Child processes of a benchmark run: :class:`Child` (a :class:`tools.support.procs.Process` with its log in the
run's log directory, ``BenchError`` on failure and its CPU time), and the machine's CPU counters.

Every server measured (anchor or project) runs in its own process so the load generator does not share its
interpreter. Its stderr goes to a log file (never a pipe nobody reads) whose tail is shown when the child fails.
CPU time comes from ``/proc/<pid>/stat`` (utime + stime).
"""

from __future__ import annotations

import abc
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from tools.support.procs import REPO, Process, ProcessError, free_port

__all__ = [
    "Service",
    "BenchError",
    "Child",
    "cpu_seconds",
    "free_port",
    "machine_busy",
    "repo_root",
    "python_module_cmd",
]

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Service(abc.ABC):
    """Something the bench starts and stops (a server process, a set of them): ``with X(...) as x:`` starts it
    and stops it on the way out, whatever happened."""

    @abc.abstractmethod
    def start(self) -> Self: ...

    @abc.abstractmethod
    def stop(self) -> object: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BenchError(ProcessError):
    """A benchmark could not be set up (a server did not start, a tool is missing); the message says why."""


def repo_root() -> Path:
    return REPO


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


class Child(Process):
    """One server process: ``start()`` (``stdout_pipe`` to read its stdout with ``wait_line``) then
    ``wait_ready_line()`` or another readiness probe; ``stop()``. ``env`` adds to our environment."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="ida-bench-"))
        super().__init__(
            name,
            cmd,
            env=dict(os.environ, **(env or {})),
            cwd=cwd,
            log=self.log_dir / f"{name}.log",
            error=BenchError,
        )

    def start(self, stdout_pipe: bool = False) -> Child:
        self.pipes = (False, stdout_pipe, False)
        super().start()
        return self

    def fail(self, why: str) -> BenchError:
        tail = self.log_tail()
        return BenchError(f"{self.name}: {why}" + (f"\n--- {self.log_path} ---\n{tail}" if tail else ""))

    def wait_ready_line(self, timeout: float = 20.0) -> int:
        """Read stdout until ``READY <port>``; returns the port."""
        return int(self.wait_line(rb"^READY (\d+)", timeout).group(1))

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)
