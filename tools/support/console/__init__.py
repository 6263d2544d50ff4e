"""The firmware's console, spoken once for every tool: ``DeviceConsole`` over a transport.

    console = DeviceConsole.open("/dev/ttyUSB0")                         # a serial port, no reset
    console = DeviceConsole(PipePort(proc.stdout, proc.stdin), name="dev1")  # a firmware process's pipes
    console.command("status").fields; future = console.request("resolve 88.123.99/PUMP-0001")
    pump = ConsolePump(console).start(); await pump.ask_async("status", 5)  # read by its own thread

Modules:

* ``protocol`` -- bytes in, events out (``LineParser``: ``Reply``, ``Log``, ``Banner``, ``Crash``, ``Text``,
  ``Garbage``); no I/O.
* ``device`` -- ``DeviceConsole``: commands in JSON-lines mode, reply matching, resets, garbage, crash reports.
* ``timeouts`` -- the named time limits and the ``Timeouts`` record.
* ``errors`` -- ``ConsoleError`` and its kinds (``PortError``, ``CommandTimeout``, ``DeviceReset``...).
* ``transcript`` -- every line sent and received, time-stamped, secrets scrubbed (``scrub``).
* ``scrub`` -- keys, passwords and tokens removed from text and JSON.
* ``serialport`` -- the serial transport: ``open_port`` without resetting the chip.
* ``pipe`` -- the pipe transport: ``PipePort`` over a firmware process's stdin/stdout.
* ``pump`` -- ``ConsolePump``: one thread that reads a console and runs the work handed to it.
"""

from .device import DeviceConsole, PortLike, SessionStats
from .errors import (
    AmbiguousPort,
    BadCommand,
    CommandTimeout,
    ConsoleError,
    DeviceReset,
    NoPortFound,
    PortError,
)
from .pipe import PipePort
from .protocol import Banner, Crash, Event, Garbage, LineParser, Log, Reply, Text, check_command
from .pump import ConsolePump
from .serialport import DEFAULT_BAUD, open_port
from .timeouts import (
    BOOT_QUIET,
    BOOT_WAIT,
    COMMAND_TIMEOUT,
    COMMAND_TIMEOUTS,
    JSON_MODE_TIMEOUT,
    NOT_REPEATED,
    RESOLVE_TIMEOUT,
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
    "ConsolePump",
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
    "PipePort",
    "PortError",
    "PortLike",
    "RESOLVE_TIMEOUT",
    "Reply",
    "SessionStats",
    "Text",
    "Timeouts",
    "Transcript",
    "check_command",
    "open_port",
]
