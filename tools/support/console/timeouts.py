"""The time limits of a :class:`~tools.support.console.device.DeviceConsole`, as named constants and as one
:class:`Timeouts` record a console takes (a simulated device on a loaded machine gets longer ones)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "BOOT_QUIET",
    "BOOT_WAIT",
    "CLOSE_TIMEOUT",
    "COMMAND_TIMEOUT",
    "COMMAND_TIMEOUTS",
    "CRASH_LINES",
    "JSON_MODE_TIMEOUT",
    "NOT_REPEATED",
    "RESOLVE_TIMEOUT",
    "RESTART_LIMIT",
    "Timeouts",
]

COMMAND_TIMEOUT = 3.0
"""Seconds for a reply to an ordinary command (the firmware answers within one loop, 50 ms)."""
JSON_MODE_TIMEOUT = 2.0
"""Seconds for the reply to ``json on``; after a reset it is re-sent until :data:`BOOT_WAIT` is over."""
RESOLVE_TIMEOUT = 95.0
"""``resolve`` answers when the gateway does: CoAP's MAX_TRANSMIT_WAIT (93 s) bounds the device's wait."""
SELFTEST_TIMEOUT = 10.0
"""``selftest`` writes and reads back a file in flash."""
LOG_TIMEOUT = 5.0
"""``log`` and ``config``: a few kilobytes at 115200 baud."""
RESET_TIMEOUT = 10.0
"""``factory-reset`` erases files; ``provision`` writes the identity."""
BOOT_WAIT = 10.0
"""Seconds a restarted device may take until its console answers again."""
BOOT_QUIET = 0.3
"""After a boot banner, the boot is over when the line has been quiet this long."""
CLOSE_TIMEOUT = 1.0
"""Seconds for the ``json off`` that returns the console to text mode when the session closes."""
RESTART_LIMIT = 6
"""Restarts in a row (a boot loop) after which a command gives up with :class:`DeviceReset`."""
CRASH_LINES = 40
"""Lines kept after the start of a crash report."""

COMMAND_TIMEOUTS: Mapping[str, float] = {
    "resolve": RESOLVE_TIMEOUT,
    "selftest": SELFTEST_TIMEOUT,
    "log": LOG_TIMEOUT,
    "config": LOG_TIMEOUT,
    "help": LOG_TIMEOUT,
    "factory-reset": RESET_TIMEOUT,
    "provision": RESET_TIMEOUT,
}

NOT_REPEATED = frozenset({"reboot", "factory-reset", "provision"})
"""Commands not sent again after a reset interrupted them (their effect must not happen twice)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    command: float = COMMAND_TIMEOUT
    json_mode: float = JSON_MODE_TIMEOUT
    boot_wait: float = BOOT_WAIT
    boot_quiet: float = BOOT_QUIET
    close: float = CLOSE_TIMEOUT
    per_command: Mapping[str, float] = field(default_factory=lambda: dict(COMMAND_TIMEOUTS))

    def for_command(self, cmd: str) -> float:
        return self.per_command.get(cmd, self.command)
