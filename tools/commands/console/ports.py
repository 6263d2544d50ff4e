"""Finding a device's serial port: Espressif boards are found by the USB VID:PID of their console (the USB-UART
bridge or the chip's native USB) as the board files in ``boards/`` list them
(:func:`tools.support.boards.console_usb_ids`). Opening the port without resetting the chip is
:func:`tools.support.console.serialport.open_port` (named here too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tools.support.boards import UsbId, console_usb_ids
from tools.support.console.errors import AmbiguousPort, NoPortFound
from tools.support.console.serialport import DEFAULT_BAUD, open_port

__all__ = ["DEFAULT_BAUD", "PortInfo", "choose_port", "find_ports", "list_serial_ports", "open_port"]


@dataclass(frozen=True, slots=True)
class PortInfo:
    device: str
    vid: int | None = None
    pid: int | None = None
    description: str = ""
    serial_number: str | None = None

    @property
    def usb_id(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}" if self.vid is not None and self.pid is not None else "-"

    def __str__(self) -> str:
        extra = f", serial {self.serial_number}" if self.serial_number else ""
        desc = f" {self.description}" if self.description and self.description != "n/a" else ""
        return f"{self.device} [{self.usb_id}]{desc}{extra}"


def list_serial_ports() -> list[PortInfo]:
    """Every serial port the OS lists (pyserial's ``list_ports.comports()``)."""
    from serial.tools import list_ports

    return [
        PortInfo(p.device, p.vid, p.pid, p.description or "", p.serial_number)
        for p in sorted(list_ports.comports(), key=lambda p: p.device)
    ]


def find_ports(
    usb_ids: Iterable[UsbId] | None = None, ports: Sequence[PortInfo] | None = None
) -> list[PortInfo]:
    """The ports (default: all the OS lists) whose USB VID:PID is a board console's (default: all boards')."""
    wanted = {(u.vid, u.pid) for u in (console_usb_ids() if usb_ids is None else usb_ids)}
    return [p for p in (list_serial_ports() if ports is None else ports) if (p.vid, p.pid) in wanted]


def choose_port(usb_ids: Iterable[UsbId] | None = None, ports: Sequence[PortInfo] | None = None) -> str:
    """The one Espressif console port; :class:`NoPortFound` or :class:`AmbiguousPort` (naming what was seen)."""
    ids = list(console_usb_ids() if usb_ids is None else usb_ids)
    seen = list_serial_ports() if ports is None else list(ports)
    found = find_ports(ids, seen)
    if len(found) == 1:
        return found[0].device
    if not found:
        others = "; ".join(str(p) for p in seen) or "none"
        raise NoPortFound(
            f"no Espressif console port found (looked for USB {', '.join(str(u) for u in ids)}; "
            f"serial ports present: {others})",
            "plug the device in, or name the port: ida console /dev/ttyUSB0",
        )
    raise AmbiguousPort(
        f"{len(found)} Espressif console ports found: {'; '.join(str(p) for p in found)}",
        "name the one to use: ida console PORT",
    )
