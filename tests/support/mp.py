"""Run MicroPython code from CPython tests: the real `micropython` unix-port binary with the firmware on its path."""

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
