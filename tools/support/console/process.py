"""A program whose console is its stdin/stdout -- the firmware under MicroPython's unix port, or ``ida device
run`` -- with a :class:`~tools.support.console.device.DeviceConsole` on its pipes, read by a
:class:`~tools.support.console.pump.ConsolePump` thread: what ``ida demo``, ``ida sim`` (firmware mode) and the
tests start for a simulated device.

    dev = ConsoleProcess("dev1", device_command(), env=env, cwd=data_dir, log=data_dir / "stderr.log").start()
    status = await dev.ask_async("status", 5)     # or dev.ask("status", 5) from blocking code
    dev.interrupt(); ...; dev.release()           # SIGINT: the firmware flushes its queue and exits
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar, Unpack

from tools.support.procs import Process, ProcessOptions

from .device import DeviceConsole
from .errors import ConsoleError, PortError
from .pipe import PipePort
from .protocol import Event, Reply
from .pump import ConsolePump
from .timeouts import Timeouts
from .transcript import Transcript

__all__ = ["ConsoleProcess", "SIMULATED"]

T = TypeVar("T")

SIMULATED = Timeouts(command=10.0, json_mode=10.0, boot_wait=30.0)
"""Limits for a simulated device on a busy machine: longer than a serial console's."""


class ConsoleProcess:
    """``process`` (a :class:`tools.support.procs.Process` on ``cmd``, with ``process`` its options: ``env``,
    ``cwd``, ``log``...), ``console`` and ``pump`` once started. ``log`` receives stderr unless ``stderr`` asks
    for a pipe; ``on_event``, ``monitor`` and ``on_end`` are called in the pump's thread (see
    :class:`DeviceConsole` and :class:`ConsolePump`), ``on_event`` and ``on_end`` on ``loop`` instead when one
    is given (asyncio code)."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        timeouts: Timeouts = SIMULATED,
        transcript: Transcript | None = None,
        on_event: Callable[[Event], object] | None = None,
        monitor: Callable[[Event], object] | None = None,
        on_end: Callable[[ConsoleError | None], object] | None = None,
        read_slice: float = 0.25,
        loop: asyncio.AbstractEventLoop | None = None,
        **process: Unpack[ProcessOptions],
    ) -> None:
        self.name = name
        self.process = Process(name, cmd, stdin=True, stdout=True, **process)
        self.transcript = transcript
        self.on_end = _on(loop, on_end)
        # the console it opens on the process's pipes once started
        self._console = partial(
            DeviceConsole,
            name=name,
            transcript=transcript,
            timeouts=timeouts,
            on_event=_on(loop, on_event),
            monitor=monitor,
            read_slice=read_slice,
        )
        self.console: DeviceConsole | None = None
        self.pump: ConsolePump | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc

    def start(self) -> ConsoleProcess:
        self.process.start()
        p = self.process.proc
        assert p is not None and p.stdout is not None and p.stdin is not None
        self.console = self._console(PipePort(p.stdout, p.stdin, self.name))
        self.pump = ConsolePump(self.console, on_end=self.on_end).start()
        return self

    def alive(self) -> bool:
        return self.process.alive()

    @property
    def reading(self) -> bool:
        """Whether the console is still read (it stops when the process closed its output)."""
        return self.pump is not None and not self.pump.ended.is_set()

    def _pump(self) -> ConsolePump:
        if self.pump is None:
            raise PortError(f"{self.name}: not started")
        return self.pump

    def ask(self, line: str, timeout: float) -> Reply:
        """Send a command and wait (blocking) for its reply; ConsoleError (CommandTimeout...) otherwise."""
        return self._pump().ask(line, timeout)

    async def ask_async(self, line: str, timeout: float) -> Reply:
        return await self._pump().ask_async(line, timeout)

    async def wait_exit(self, timeout: float) -> bool:
        """Whether the process has exited within ``timeout`` seconds (polled, so the event loop runs on)."""
        deadline = time.monotonic() + timeout
        while self.process.alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def interrupt(self) -> None:
        """SIGINT: the firmware's clean stop (it flushes its report queue to flash and exits)."""
        p = self.process.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)

    def release(self) -> None:
        """After the process ended: stop the pump thread, close the console (its transcript stays open)."""
        if self.pump is not None:
            self.pump.stop(2.0)
        if self.console is not None:
            self.console.close()


def _on(
    loop: asyncio.AbstractEventLoop | None, fn: Callable[[T], object] | None
) -> Callable[[T], object] | None:
    """``fn``, run on ``loop`` when called from another thread (as it is as given without a loop)."""
    if loop is None or fn is None:
        return fn
    return lambda x: loop.call_soon_threadsafe(fn, x)
