"""A thread that owns one :class:`~tools.support.console.device.DeviceConsole`: it reads the console all the time
(so log lines, boot banners and late replies are seen as they come, through the console's ``on_event``) and runs
the work other threads hand it between two reads. Blocking code calls :meth:`ConsolePump.ask`; asyncio code
awaits :meth:`ConsolePump.ask_async` (the simulated fleet and the demo keep one pump per device process).

Work handed over wakes the reading thread at once when the port can be woken (a
:class:`~tools.support.console.pipe.PipePort`); a serial port's read returns within its read slice anyway. The
pump ends when the port fails or reaches its end (the device process exited): ``ended`` is set, ``error`` says
why, and ``on_end`` is called in the pump's thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from .device import DeviceConsole
from .errors import CommandTimeout, ConsoleError, PortError
from .protocol import Reply

__all__ = ["ConsolePump"]

T = TypeVar("T")


class ConsolePump:
    def __init__(
        self,
        console: DeviceConsole,
        *,
        name: str = "",
        on_end: Callable[[ConsoleError | None], object] | None = None,
    ) -> None:
        self.console = console
        self.name = name or console.name
        self.on_end = on_end
        self.ended = threading.Event()
        self.error: ConsoleError | None = None
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"console {self.name}", daemon=True)

    def start(self) -> ConsolePump:
        self._thread.start()
        return self

    # -- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                while self._jobs:
                    self._jobs.popleft()()
                self.console.poll()
        except ConsoleError as e:
            self.error = e
        finally:
            with self._lock:
                self.ended.set()
                late = list(self._jobs)
                self._jobs.clear()
            for job in late:  # handed over while the pump ended: they fail (see call())
                job()
            if self.on_end is not None:
                self.on_end(self.error)

    def _gone(self) -> ConsoleError:
        return self.error or PortError(f"{self.name}: the console is no longer read")

    def _wake(self) -> None:
        wake = getattr(self.console.port, "wake", None)
        if callable(wake):
            wake()

    # -- handing work over ------------------------------------------------------------------------------------
    def call(self, fn: Callable[[DeviceConsole], T]) -> Future[T]:
        """Run ``fn(console)`` in the pump's thread between two reads; its result or exception in the future."""
        future: Future[T] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            if self.ended.is_set():
                future.set_exception(self._gone())
                return
            try:
                future.set_result(fn(self.console))
            except BaseException as e:  # noqa: BLE001 -- handed to the caller through the future
                future.set_exception(e)

        with self._lock:
            if not self.ended.is_set():
                self._jobs.append(job)
                self._wake()
                return future
        job()
        return future

    def ask(self, line: str, timeout: float) -> Reply:
        """Send ``line`` and wait (blocking) at most ``timeout`` s for its reply; :class:`CommandTimeout`."""
        sent = self.call(lambda c: c.request(line))
        try:
            reply = sent.result(timeout)
        except FutureTimeout:
            sent.cancel()
            raise CommandTimeout(line, timeout) from None
        try:
            return reply.result(timeout)
        except FutureTimeout:
            reply.cancel()
            raise CommandTimeout(line, timeout) from None

    async def ask_async(self, line: str, timeout: float) -> Reply:
        """:meth:`ask` for asyncio code: the event loop is never blocked."""
        sent = self.call(lambda c: c.request(line))
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.wrap_future(sent)
                return await asyncio.wrap_future(reply)
        except TimeoutError:
            raise CommandTimeout(line, timeout) from None

    # -- the end ------------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (after the work already handed over) and wait for it at most ``timeout`` s."""
        self._stopping = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
