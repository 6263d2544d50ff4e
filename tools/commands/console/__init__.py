"""The technician's serial console (``ida console``): library first, ``cli`` is the thin command layer.

    from tools.commands.console import DeviceConsole, inspect

    with DeviceConsole.open("/dev/ttyUSB0") as s:        # DTR/RTS released before the open: no reset
        print(s.command("status").fields["uptime"])
        report = inspect(s)                               # id, status, net, config, queue, log, selftest
    report.text(); report.to_json(); s.transcript.save(default_transcript_path(report))

The console itself (``DeviceConsole`` over any pyserial-like port, ``open_port``, the line parser, transcript,
errors, time limits) is :mod:`tools.support.console`, shared with the simulated devices (``DeviceConsole`` is
named here too). Modules of this package: ``ports`` (finding the Espressif console port by USB VID:PID), ``report`` (``inspect``: the inspection
report), ``interactive`` (line mode with history), ``cli`` (``ida console``). See docs/console.md.
"""

from tools.support.console import DeviceConsole

from .ports import PortInfo, choose_port, find_ports, list_serial_ports
from .report import Report, default_transcript_path, inspect

__all__ = [
    "DeviceConsole",
    "PortInfo",
    "Report",
    "choose_port",
    "default_transcript_path",
    "find_ports",
    "inspect",
    "list_serial_ports",
]
