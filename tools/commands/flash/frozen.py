"""What a MicroPython runtime image has frozen in, read from its bytes, and what that leaves for the filesystem.

A MicroPython build lists its frozen modules in one table, ``mp_frozen_names`` (``py/frozenmod.c``): the names,
each ending in NUL, the table ending in an empty name (``"asyncio/core.py\\0...\\0carrier/app.py\\0main.py\\0\\0"``).
The table is constant data, stored as is in the image's flash segment (ESP32 app images) or ``.rodata`` (the unix
port's ELF), so it is found by scanning the bytes: the longest run of two or more such names is the table. No flag
or file name is trusted: a runtime built with ``firmware/manifest.py`` is told apart from a stock one by its table.

* **frozen runtime** (the carrier package in the table): the firmware's code runs in place from flash; the
  filesystem gets no ``.mpy``, only what the runtime does not hold (``/board.json``, the CA, and per chip
  ``/identity.json``; the device writes its config itself). The runtime must freeze exactly the firmware tree's
  modules of each package it freezes (a stale runtime would run other code than the build records).
* **stock runtime**: every firmware module goes to the filesystem as ``.mpy`` and each import loads its bytecode
  into the heap; :func:`stock_runtime_warning` says what that costs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from .errors import BuildError

__all__ = ["frozen_names", "frozen_firmware", "stock_runtime_warning", "ESP32_HEAP"]

ESP32_HEAP = 64000  # MicroPython's first heap area on an ESP32 without PSRAM
# one name: a module path ending in .py (mpy-tool keeps the source name of frozen .mpy modules too)
_TABLE = re.compile(rb"(?<=\x00)(?:[A-Za-z0-9_][A-Za-z0-9_./-]{0,127}\.py\x00){2,}\x00")


def frozen_names(image: bytes) -> tuple[str, ...]:
    """The frozen-module names in a runtime image (an ESP app or merged image, or any MicroPython program), in
    table order; empty when the build freezes nothing."""
    best = b""
    for m in _TABLE.finditer(image):
        if m.group(0).count(b"\0") > best.count(b"\0"):
            best = m.group(0)
    return tuple(n.decode() for n in best.split(b"\0") if n)


def frozen_firmware(runtime: Iterable[str], sources: Iterable[str]) -> tuple[str, ...]:
    """The firmware files (``sources``: ``.py`` paths relative to the firmware dir, e.g. ``carrier/app.py``,
    ``main.py``) that the runtime has frozen in, so that the filesystem does without them. A package counts as
    frozen when any of its modules is; then the runtime must hold exactly the firmware tree's modules of it, or
    BuildError (a runtime built from another version of the firmware)."""
    frozen = set(runtime)
    py = sorted(s for s in sources if s.endswith(".py"))
    out: list[str] = []
    for top in sorted({PurePosixPath(s).parts[0] for s in py}):
        if top.endswith(".py"):
            if top in frozen:
                out.append(top)
            continue
        ours = {s for s in py if s.startswith(top + "/")}
        theirs = {n for n in frozen if n.startswith(top + "/")}
        if not theirs:
            continue
        if ours != theirs:
            diff = [f"not in the runtime: {', '.join(sorted(ours - theirs))}"] if ours - theirs else []
            diff += [f"not in the firmware: {', '.join(sorted(theirs - ours))}"] if theirs - ours else []
            raise BuildError(
                f"the runtime has a different {top!r} package frozen in than the firmware tree ({'; '.join(diff)})",
                "rebuild the runtime with firmware/manifest.py from this tree, or use a stock runtime",
            )
        out += sorted(ours)
    return tuple(out)


def stock_runtime_warning(mpy_bytes: int, modules: int) -> str:
    """What a stock runtime costs: the firmware's bytecode loaded into the heap instead of run from flash."""
    return (
        f"stock runtime (nothing of the firmware frozen in): {modules} modules go to the filesystem as .mpy "
        f"({mpy_bytes} bytes) and every import loads its bytecode into the heap, which the ESP32 starts with "
        f"{ESP32_HEAP} bytes of; the heap in use after boot + first report is about three times what it is with "
        f"the firmware frozen in (`ida bench --only P4`: heap_32_mpy against heap_32_frozen). A runtime built with "
        f"firmware/manifest.py avoids it (docs/flashing.md, 'Which runtime')"
    )
