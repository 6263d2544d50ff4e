"""Pytest plugin: runs tests/device/test_*.py under the real `micropython` unix-port binary.

Each firmware test module is executed once by ``tests/device/runner.py`` (under micropython), which prints one
JSON line per test function; every line becomes a pytest item, so one pytest summary counts CPython and
MicroPython tests together. The session ends with a line giving both counts.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tools.support.procs import micropython_binary

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_TESTS = ROOT / "tests" / "device"
RUNNER = FIRMWARE_TESTS / "runner.py"
TIMEOUT = float(os.environ.get("IDA_MP_TEST_TIMEOUT", "300"))

__all__ = ["ROOT"]


class MicroPythonFailure(Exception):
    pass


class MicroPythonModule(pytest.File):
    def collect(self) -> Any:
        results = self._run()
        for name, res in results.items():
            yield MicroPythonItem.from_parent(self, name=name, result=res)

    def _run(self) -> dict[str, dict[str, Any]]:
        cmd = [micropython_binary(), "-X", "heapsize=4M", str(RUNNER), str(self.path)]
        env = dict(os.environ, MICROPYPATH=f"{ROOT / 'firmware'}:{FIRMWARE_TESTS}:.frozen")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            return {
                "<module>": {
                    "ok": False,
                    "error": f"micropython run timed out after {TIMEOUT}s: {e.stdout!r}",
                }
            }
        results: dict[str, dict[str, Any]] = {}
        for line in proc.stdout.splitlines():
            if line.startswith("@@MPTEST "):
                rec = json.loads(line[len("@@MPTEST ") :])
                results[rec["name"]] = rec
        if proc.returncode != 0 or not results:
            results.setdefault(
                "<module>",
                {
                    "ok": False,
                    "error": f"micropython exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}",
                },
            )
        return results


class MicroPythonItem(pytest.Item):
    def __init__(self, *, result: dict[str, Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.result = result
        self.add_marker(pytest.mark.micropython)

    def runtest(self) -> None:
        if self.result.get("skip"):
            pytest.skip(self.result["skip"])
        if not self.result["ok"]:
            raise MicroPythonFailure(self.result.get("error", "failed"))
        for line in self.result.get("out", []):
            print(line)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, MicroPythonFailure):
            return f"[micropython] {self.name}\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"[micropython] {self.name}"


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    # firmware test modules are run by micropython, never imported by CPython
    if module_path.parent == FIRMWARE_TESTS:
        return MicroPythonModule.from_parent(parent, path=module_path)
    return None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # keep CPython's importer away from the firmware tests: they run under micropython only
    if (
        FIRMWARE_TESTS in collection_path.parents
        and collection_path.suffix == ".py"
        and not collection_path.name.startswith("test_")
    ):
        return True
    return None


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    counts = {"cpython": [0, 0, 0], "micropython": [0, 0, 0]}
    for key, col in (("passed", 0), ("failed", 1), ("skipped", 2)):
        for rep in terminalreporter.stats.get(key, []):
            if rep.when not in ("call", "setup") or (key == "passed" and rep.when != "call"):
                continue
            kind = (
                "micropython"
                if "[micropython]" in str(getattr(rep, "location", ("", 0, ""))[2])
                else "cpython"
            )
            counts[kind][col] += 1
    c, m = counts["cpython"], counts["micropython"]
    terminalreporter.write_line(
        f"ida tests: CPython {c[0]} passed, {c[1]} failed, {c[2]} skipped; "
        f"MicroPython {m[0]} passed, {m[1]} failed, {m[2]} skipped"
    )
