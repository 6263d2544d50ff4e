"""Errors of the console tool. All derive from :class:`ConsoleError` ("not a bug": a port, a device or a command
the user can do something about); the command line turns them into a message and an exit code."""

from __future__ import annotations

from tools.errors import HintedError


class ConsoleError(HintedError):
    """Base class; ``hint`` says what to try next."""


class PortError(ConsoleError):
    """The serial port cannot be opened, found, read or written."""


class NoPortFound(PortError):
    """No serial port with an Espressif console's USB VID:PID."""


class AmbiguousPort(PortError):
    """Several candidate ports: the user has to name one."""


class BadCommand(ConsoleError, ValueError):
    """A command line the device would reject before running it (too long, control characters, empty)."""


class CommandTimeout(ConsoleError):
    """No reply to a command within its time limit."""

    def __init__(self, command: str, timeout: float, hint: str | None = None) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(
            f"no reply to {command!r} within {timeout:g} s",
            hint
            if hint is not None
            else "is the device powered and running the ida firmware? check the port and --baud",
        )


class DeviceReset(ConsoleError):
    """The device restarted while a command was running and the command was not retried (again)."""
