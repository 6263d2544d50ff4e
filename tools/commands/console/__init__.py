"""The technician's serial console: library first, ``cli.py`` is the thin ``ida console`` layer.

    from tools.commands.console import ConsoleSession, inspect

    with ConsoleSession.open("/dev/ttyUSB0") as s:       # DTR/RTS released before the open: no reset
        print(s.command("status").fields["uptime"])
        report = inspect(s)                               # id, status, net, config, queue, log, selftest
    report.text(); report.to_json(); s.transcript.save(default_transcript_path(report))

``ConsoleSession(port)`` takes any already-open pyserial-like port object (tests inject one). See
docs/console.md.
"""

from .errors import (
    AmbiguousPort,
    BadCommand,
    CommandTimeout,
    ConsoleError,
    DeviceReset,
    NoPortFound,
    PortError,
)
from .ports import DEFAULT_BAUD, PortInfo, choose_port, find_ports, list_serial_ports, open_port
from .protocol import Banner, Crash, Event, Garbage, LineParser, Log, Reply, Text, check_command
from .report import Report, default_transcript_path, inspect
from .scrub import scrub, scrub_obj
from .session import (
    BOOT_QUIET,
    BOOT_WAIT,
    COMMAND_TIMEOUT,
    COMMAND_TIMEOUTS,
    JSON_MODE_TIMEOUT,
    NOT_REPEATED,
    ConsoleSession,
    PortLike,
    SessionStats,
    Timeouts,
)
from .transcript import Transcript

__all__ = [
    "AmbiguousPort",
    "BOOT_QUIET",
    "BOOT_WAIT",
    "BadCommand",
    "Banner",
    "COMMAND_TIMEOUT",
    "COMMAND_TIMEOUTS",
    "CommandTimeout",
    "ConsoleError",
    "ConsoleSession",
    "Crash",
    "DEFAULT_BAUD",
    "DeviceReset",
    "Event",
    "Garbage",
    "JSON_MODE_TIMEOUT",
    "LineParser",
    "Log",
    "NOT_REPEATED",
    "NoPortFound",
    "PortError",
    "PortInfo",
    "PortLike",
    "Reply",
    "Report",
    "SessionStats",
    "Text",
    "Timeouts",
    "Transcript",
    "check_command",
    "choose_port",
    "default_transcript_path",
    "find_ports",
    "inspect",
    "list_serial_ports",
    "open_port",
    "scrub",
    "scrub_obj",
]
