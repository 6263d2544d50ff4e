"""``ida flash batch``: wait for chips on Espressif serial ports, flash each with the next identifier, show a
progress bar and a large PASS / FAIL, go on with the next chip, and print a summary at the end (Ctrl-C or
``count`` chips).

A port is flashed once when it appears and again only after it has gone away and come back (a devkit's own
USB bridge disappears when the board is unplugged). Ports are found by the USB VID:PID of the board files.
Upstream registration runs on a thread of its own meanwhile (``registrar.py``): flashing never waits for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from tools.support.boards import UsbId

from .builder import Build
from .errors import FlashError
from .programmer import EsptoolProgrammer, Programmer
from .provision import IdentityTemplate, Result, Station, flash_device
from .registrar import Background

POLL_S = 0.5

_GLYPHS = {
    "P": ["#### ", "#   #", "#### ", "#    ", "#    "],
    "A": [" ### ", "#   #", "#####", "#   #", "#   #"],
    "S": [" ####", "#    ", " ### ", "    #", "#### "],
    "F": ["#####", "#    ", "#### ", "#    ", "#    "],
    "I": ["###", " # ", " # ", " # ", "###"],
    "L": ["#    ", "#    ", "#    ", "#    ", "#####"],
}


def big(word: str) -> str:
    """``word`` in 5-line block letters (only the letters of PASS and FAIL)."""
    return "\n".join("  ".join(_GLYPHS[c][row] for c in word) for row in range(5))


def bar(done: int, total: int, width: int = 30) -> str:
    frac = done / total if total else 1.0
    n = int(round(frac * width))
    return f"[{'#' * n}{'.' * (width - n)}] {frac * 100:3.0f}%"


def espressif_ports(usb_ids: Iterable[UsbId]) -> list[str]:
    """Serial ports whose USB VID:PID is one of ``usb_ids``, sorted by device name (the console tool's
    :func:`tools.commands.console.find_ports`)."""
    from tools.commands.console import find_ports

    return sorted(p.device for p in find_ports(list(usb_ids)))


@dataclass
class Summary:
    passed: list[Result] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (port, reason)
    started: float = field(default_factory=time.monotonic)
    registration: dict[str, int] | None = None  # queue counts after the batch (registered, pending, failed)

    def text(self) -> str:
        n = len(self.passed) + len(self.failed)
        secs = time.monotonic() - self.started
        lines = [f"batch: {n} chip(s), {len(self.passed)} passed, {len(self.failed)} failed, {secs:.0f} s"]
        lines += [
            f"  PASS {r.identifier}  {r.mac}  {r.fs_mode}, {r.bytes_written} bytes" for r in self.passed
        ]
        lines += [f"  FAIL {port}: {why}" for port, why in self.failed]
        return "\n".join(lines)


class ProgressPrinter:
    """A plain-text progress bar: rewritten in place on a terminal, one line per stage otherwise."""

    def __init__(self, out: TextIO, label: str) -> None:
        self.out, self.label = out, label
        self.tty = out.isatty()
        self.last_stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        line = f"{self.label} {bar(done, total)} {stage}"
        if self.tty:
            self.out.write("\r" + line.ljust(78)[:78])
        elif stage != self.last_stage or done == total:
            self.out.write(line + "\n")
        self.last_stage = stage
        self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")


def run_batch(
    build: Build,
    station: Station,
    template: IdentityTemplate,
    *,
    ports: Callable[[], Sequence[str]],
    programmer: Callable[[str], Programmer] = EsptoolProgrammer,
    runtime: str | None = None,
    count: int | None = None,
    out: TextIO = sys.stdout,
    poll: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
) -> Summary:
    """Flash chips as they appear until ``count`` were done (None: until Ctrl-C); returns the summary.

    When the station registers upstream, a :class:`~tools.commands.flash.registrar.Background` registrar sends
    the queue while chips are flashed; after the last chip it gets ``station.register_wait`` seconds to finish."""
    summary = Summary()
    done_ports: set[str] = set()
    upstream = station.upstream_config()
    background = Background(station.data_dir, upstream).start() if upstream is not None else None
    out.write(f"batch: board {build.board.name}, waiting for chips (Ctrl-C to stop)\n")
    try:
        while count is None or len(summary.passed) + len(summary.failed) < count:
            present = list(ports())
            done_ports &= set(present)  # a port that went away may come back with a new chip
            fresh = [p for p in present if p not in done_ports]
            if not fresh:
                sleep(poll)
                continue
            for port in fresh:
                done_ports.add(port)
                _one(port, build, station, template, programmer, runtime, out, summary)
                if count is not None and len(summary.passed) + len(summary.failed) >= count:
                    break
    except KeyboardInterrupt:
        out.write("\nbatch: stopped\n")
    if background is not None:
        counts = background.stop(station.register_wait)
        summary.registration = counts
        out.write(background.tally.text(counts) + "\n")
        if background.error is not None:
            out.write(f"registration: the registrar stopped: {background.error}\n")
    out.write(summary.text() + "\n")
    return summary


def _one(
    port: str,
    build: Build,
    station: Station,
    template: IdentityTemplate,
    programmer: Callable[[str], Programmer],
    runtime: str | None,
    out: TextIO,
    summary: Summary,
) -> None:
    progress = ProgressPrinter(out, port)
    try:
        result = flash_device(programmer(port), build, station, template, runtime=runtime, progress=progress)
    except FlashError as e:
        progress.end()
        summary.failed.append((port, str(e)))
        out.write(big("FAIL") + f"\n  FAIL {port}: {e}\n")
    else:
        progress.end()
        summary.passed.append(result)
        out.write(
            big("PASS") + f"\n  PASS {port}: {result.identifier}  {result.mac}  "
            f"{result.fs_mode}, {result.bytes_written} bytes in {result.seconds:.1f} s, key {result.key_fingerprint}"
            f"{'' if result.secure else ', INSECURE (no OSCORE)'}\n"
        )
    out.flush()
