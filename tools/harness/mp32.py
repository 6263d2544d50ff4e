"""The 32-bit MicroPython interpreters of the test suite and the benchmark, built from ``third_party/micropython32``.

    python -m tools.harness.mp32            # build both (cached; `make test` does this first)
    from tools.harness import mp32
    mp32.ensure(frozen=True)                # Path of micropython32-frozen, rebuilt first when out of date

Two programs, both MicroPython's unix port for i686 (4-byte pointers, 16-byte GC blocks, like the ESP32):

* ``micropython32``: the stock build (what a stock ESP32 runtime is: the port's own frozen modules only);
* ``micropython32-frozen``: the same with ``firmware/manifest.py`` frozen in (the carrier package and
  ``main.py`` execute in place, as from an ESP32's flash).

They live in ``.venv/micropython32/`` (``$IDA_MP32_DIR`` elsewhere), next to the unpacked source and its build
trees, so a rebuild is incremental. Each program has a ``.stamp``: the sha256 of what it was built from (the
build script and source tarball; for the frozen one also every ``.py`` under ``firmware/``, the manifest
included). A program whose stamp no longer matches is rebuilt on first use, so the frozen interpreter never tests
yesterday's firmware. Concurrent callers are serialised by a lock file.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["BuildFailed", "FROZEN", "MANIFEST", "PLAIN", "binary", "ensure", "mpy_cross", "out_dir", "stamp"]

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "third_party" / "micropython32"
BUILD_SCRIPT = SOURCE_DIR / "build.sh"
TARBALL = SOURCE_DIR / "micropython-src.tar.xz"
FIRMWARE_DIR = ROOT / "firmware"
MANIFEST = FIRMWARE_DIR / "manifest.py"
PLAIN = "micropython32"
FROZEN = "micropython32-frozen"
BUILD_TIMEOUT = 1800.0


class BuildFailed(RuntimeError):
    """build.sh failed (no cross compiler and not root, a compile error...); the message carries its output."""


def out_dir() -> Path:
    return Path(os.environ.get("IDA_MP32_DIR") or ROOT / ".venv" / "micropython32")


def stamp(frozen: bool) -> str:
    """sha256 over every input of the build: script, tarball and, frozen, the firmware's ``.py`` files."""
    h = hashlib.sha256()
    inputs = [BUILD_SCRIPT, TARBALL]
    if frozen:
        inputs += sorted(p for p in FIRMWARE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    for p in inputs:
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def mpy_cross() -> Path:
    """The mpy-cross of the same source (built by build.sh with the programs): its .mpy suit them exactly."""
    return out_dir() / "src" / "mpy-cross" / "build" / "mpy-cross"


def binary(frozen: bool) -> Path | None:
    """The program when it is built and up to date, else None."""
    exe = out_dir() / (FROZEN if frozen else PLAIN)
    stamp_file = exe.with_name(exe.name + ".stamp")
    try:
        current = stamp_file.read_text().strip() == stamp(frozen)
    except OSError:
        return None
    return exe if current and exe.exists() else None


@contextmanager
def _locked(d: Path) -> Iterator[None]:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(frozen: bool) -> Path:
    """The program, built first when missing or out of date (about half a minute each from scratch on two
    cores, seconds after a firmware change). Raises BuildFailed."""
    exe = binary(frozen)
    if exe is not None:
        return exe
    d = out_dir()
    with _locked(d):
        exe = binary(frozen)  # another process may have built it while we waited
        if exe is not None:
            return exe
        name = FROZEN if frozen else PLAIN
        want = stamp(frozen)
        cmd = ["bash", str(BUILD_SCRIPT), str(d)] + ([str(MANIFEST), name] if frozen else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BuildFailed(f"{name}: build.sh did not finish within {BUILD_TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            raise BuildFailed(f"{name}: build.sh exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        (d / f"{name}.stamp").write_text(want + "\n")
        return d / name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.harness.mp32", description=__doc__.split("\n\n")[0])
    p.add_argument("which", nargs="*", metavar="plain|frozen", help="which program (default: both)")
    args = p.parse_args(argv)
    bad = set(args.which) - {"plain", "frozen"}
    if bad:
        p.error(f"unknown program(s): {', '.join(sorted(bad))} (plain, frozen)")
    for which in args.which or ("plain", "frozen"):
        frozen = which == "frozen"
        was = binary(frozen)
        try:
            exe = ensure(frozen)
        except BuildFailed as e:
            print(f"micropython32: {e}", file=sys.stderr)
            return 1
        print(f"{exe.name}: {'up to date' if was else 'built'} at {exe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
