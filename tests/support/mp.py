"""Run MicroPython code from CPython tests: the real `micropython` unix-port binary with the firmware on its path,
and the 32-bit interpreters of tools/harness/mp32.py (:func:`mp32`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.mpcollect import ROOT
from tools.support.procs import micropython_binary


def mp_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, MICROPYPATH=f"{ROOT / 'firmware'}:{ROOT / 'tests' / 'device'}:.frozen")
    env.update(extra or {})
    return env


def run_mp(code: str, stdin: str = "", timeout: float = 60, heap: str = "4M", cwd: Path | None = None) -> str:
    """Run `code` under micropython; return stdout, raise AssertionError with stderr on failure."""
    proc = subprocess.run(
        [micropython_binary(), "-X", f"heapsize={heap}", "-c", code],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=mp_env(),
        cwd=cwd or ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"micropython exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def mp32(frozen: bool) -> str:
    """The 32-bit interpreter (tools/harness/mp32.py), stock or with the firmware frozen in; built first when
    missing or out of date (`make test` has built both). A test without one is skipped, saying why."""
    import pytest

    from tools.harness import mp32 as build32

    try:
        return str(build32.ensure(frozen=frozen))
    except build32.BuildFailed as e:
        pytest.skip(f"no 32-bit MicroPython: {e}")
