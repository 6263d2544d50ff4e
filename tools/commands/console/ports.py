"""Finding a device's serial port and opening it without resetting the chip.

Espressif boards are found by the USB VID:PID of their console (the USB-UART bridge or the chip's native USB)
as the board files in ``boards/`` list them (:func:`tools.support.boards.console_usb_ids`).

Opening must not reset the chip. On a DevKit the USB-UART bridge's DTR and RTS lines drive EN (reset) and
IO0 (boot mode) through two transistors: RTS asserted with DTR released pulls EN low. :func:`open_port`
therefore creates the port unopened, sets ``dtr = rts = False`` and only then opens it, so pyserial applies
"both released" as the port's first state (it does so right after the OS opened the device, DTR first, then
RTS); nothing toggles them afterwards. The port is opened exclusively, so a second program (esptool, another
terminal) gets a clear "busy" error instead of a garbled session.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tools.support.boards import UsbId, console_usb_ids

from .errors import AmbiguousPort, NoPortFound, PortError

__all__ = ["DEFAULT_BAUD", "PortInfo", "choose_port", "find_ports", "list_serial_ports", "open_port"]

DEFAULT_BAUD = 115200
READ_SLICE = 0.05
"""Seconds one ``read`` on the port may block: the granularity of every wait in a session."""
WRITE_TIMEOUT = 2.0
"""Seconds a write may block (a USB bridge that stopped taking data)."""


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


def open_port(
    device: str,
    baud: int = DEFAULT_BAUD,
    *,
    timeout: float = READ_SLICE,
    serial_factory: Callable[[], Any] | None = None,
) -> Any:
    """Open ``device`` (a path, ``COM3``, or a pyserial URL such as ``rfc2217://host:port``) with DTR and
    RTS released before the open, exclusively, in raw 8N1 at ``baud``. Returns the open pyserial port.
    Raises :class:`PortError` for a missing, busy or forbidden port."""
    import serial

    if serial_factory is not None:
        ser = serial_factory()
    elif "://" in device:
        ser = serial.serial_for_url(device, do_not_open=True)
    else:
        ser = serial.Serial()
    ser.port = device
    ser.baudrate = baud
    ser.timeout = timeout
    ser.write_timeout = WRITE_TIMEOUT
    if hasattr(ser, "exclusive"):
        ser.exclusive = True
    ser.dtr = False  # released before the open: the open itself applies them, no reset pulse
    ser.rts = False
    try:
        ser.open()
    except (serial.SerialException, OSError) as e:
        raise _port_error(device, e) from None
    return ser


def _port_error(device: str, e: BaseException) -> PortError:
    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOENT or "No such file" in text or "FileNotFoundError" in text:
        return PortError(
            f"{device}: no such port", "is the device plugged in? ida console without PORT lists ports"
        )
    if code in (errno.EACCES, errno.EPERM) or "ermission denied" in text:
        return PortError(
            f"{device}: permission denied", "add your user to the group owning the port (dialout or uucp)"
        )
    if code in (errno.EBUSY, errno.EAGAIN) or "exclusively lock" in text or "busy" in text.lower():
        return PortError(
            f"{device}: port busy (another program has it open)",
            "close esptool, ida flash or the other terminal using it",
        )
    return PortError(f"{device}: cannot open the port: {text}")
