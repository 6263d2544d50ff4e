"""Run a fleet for a while: start it, print a one-line summary every ``summary_every`` s, stop at ``duration`` or
when asked (SIGINT/SIGTERM in :func:`run_sim`), return the final :class:`SimResult`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Protocol

from tools.harness.sim.config import SimConfig
from tools.harness.sim.stats import Histogram, SimResult, format_line

__all__ = ["Fleet", "make_fleet", "run_fleet", "run_sim"]


class Fleet(Protocol):
    mode: str

    async def start(self) -> None: ...

    async def stop(self, drain: float | None = None) -> SimResult: ...

    def snapshot(self) -> SimResult: ...

    def take_window(self) -> Histogram: ...


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_fleet(cfg: SimConfig, log: Callable[[str], None] | None = None) -> Fleet:
    if cfg.effective_mode == "firmware":
        from tools.harness.sim.firmware import FirmwareFleet

        return FirmwareFleet(cfg, log=log)
    from tools.harness.sim.light import LightFleet

    return LightFleet(cfg, log=log)


async def run_fleet(
    cfg: SimConfig,
    *,
    out: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> SimResult:
    """Run until ``cfg.duration`` (None: until ``stop`` is set); ``out`` gets the periodic lines."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    fleet = make_fleet(cfg, log or _stderr)
    try:
        await fleet.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await fleet.stop(0)
        raise
    end = None if cfg.duration is None else loop.time() + cfg.duration
    every = cfg.summary_every
    next_line = loop.time() + every if every > 0 and out is not None else None
    try:
        while not stop.is_set():
            now = loop.time()
            if end is not None and now >= end:
                break
            wake = min(t for t in (end, next_line, now + 3600.0) if t is not None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, wake - now))
            if next_line is not None and loop.time() >= next_line and out is not None:
                out(format_line(fleet.snapshot(), window_ms=fleet.take_window()))
                next_line += every
    finally:
        result = await fleet.stop()
    return result


def run_sim(
    cfg: SimConfig, *, out: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None
) -> SimResult:
    """:func:`run_fleet` in a fresh event loop; SIGINT and SIGTERM stop the fleet cleanly (final summary)."""

    async def main() -> SimResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            return await run_fleet(cfg, out=out, log=log, stop=stop)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    return asyncio.run(main())
