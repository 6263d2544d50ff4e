"""The pipe transport of :class:`~tools.support.console.device.DeviceConsole`: a simulated device's console is the
stdin/stdout of its ``micropython firmware/main.py`` process (the unix board reads its console from stdin).

:class:`PipePort` looks like a serial port to the console (``read``/``write``/``in_waiting``/``timeout``) and
adds :meth:`PipePort.wake`: a read that is waiting returns at once, empty, so the thread that pumps the console
takes new work without waiting out its read slice. The end of the pipe (the process exited) is an
:class:`EOFError` from ``read``, which the console reports as a :class:`~tools.support.console.errors.PortError`.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import termios
from typing import IO

__all__ = ["PipePort"]


class PipePort:
    """Read ``stdout`` (the device's output), write ``stdin`` (its input); the pipes stay the caller's."""

    def __init__(self, stdout: IO[bytes], stdin: IO[bytes], name: str = "") -> None:
        self.name = name
        self.timeout: float | None = None
        self._out = stdout.fileno()
        self._in = stdin
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.closed = False
        self.eof = False

    @property
    def in_waiting(self) -> int:
        """Bytes ready to read without blocking."""
        if self.eof or self.closed:
            return 0
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self._out, termios.FIONREAD, buf)
        except OSError:
            return 0
        return int(buf[0])

    def read(self, size: int = 1, /) -> bytes:
        """At most ``size`` bytes, after waiting at most ``timeout`` s (b"" on timeout or :meth:`wake`)."""
        if self.eof or self.closed:
            raise EOFError("the device's console is closed (the process exited)")
        ready, _, _ = select.select([self._out, self._wake_r], [], [], self.timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        if self._out not in ready:
            return b""
        data = os.read(self._out, size)
        if not data:
            self.eof = True
            raise EOFError("the device's console is closed (the process exited)")
        return data

    def write(self, data: bytes, /) -> int:
        self._in.write(data)
        self._in.flush()
        return len(data)

    def wake(self) -> None:
        """Make a waiting :meth:`read` return now (from any thread)."""
        if self.closed:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """Release the wake pipe (the process's pipes are closed by whoever owns the process)."""
        if not self.closed:
            self.closed = True
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
