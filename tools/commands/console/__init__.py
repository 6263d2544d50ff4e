"""The technician's serial console (``ida console``): library first, ``cli`` is the thin command layer.

    from tools.commands.console import DeviceConsole, inspect

    with DeviceConsole.open("/dev/ttyUSB0") as s:        # DTR/RTS released before the open: no reset
        print(s.command("status").fields["uptime"])
        report = inspect(s)                               # id, status, net, config, queue, log, selftest
    report.text(); report.to_json(); s.transcript.save(default_transcript_path(report))

The console itself (``DeviceConsole`` over any pyserial-like port, the line parser, transcript, errors, time
limits) is :mod:`tools.support.console`, shared with the simulated devices; it is named here too. Modules of this
package: ``ports`` (finding the Espressif console port by USB VID:PID), ``report`` (``inspect``: the inspection
report), ``interactive`` (line mode with history), ``cli`` (``ida console``). See docs/console.md.
"""

from tools.support.console import (
    BOOT_QUIET,
    BOOT_WAIT,
    COMMAND_TIMEOUT,
    COMMAND_TIMEOUTS,
    DEFAULT_BAUD,
    JSON_MODE_TIMEOUT,
    NOT_REPEATED,
    AmbiguousPort,
    BadCommand,
    Banner,
    CommandTimeout,
    ConsoleError,
    Crash,
    DeviceConsole,
    DeviceReset,
    Event,
    Garbage,
    LineParser,
    Log,
    NoPortFound,
    PortError,
    PortLike,
    Reply,
    SessionStats,
    Text,
    Timeouts,
    Transcript,
    check_command,
    open_port,
)
from tools.support.console.scrub import scrub, scrub_obj

from .ports import PortInfo, choose_port, find_ports, list_serial_ports
from .report import Report, default_transcript_path, inspect

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
    "Crash",
    "DEFAULT_BAUD",
    "DeviceConsole",
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
