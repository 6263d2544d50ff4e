"""The serial transport of :class:`~tools.support.console.device.DeviceConsole`: open a port without resetting the
chip.

Opening must not reset the chip. On a DevKit the USB-UART bridge's DTR and RTS lines drive EN (reset) and
IO0 (boot mode) through two transistors: RTS asserted with DTR released pulls EN low. :func:`open_port`
therefore creates the port unopened, sets ``dtr = rts = False`` and only then opens it, so pyserial applies
"both released" as the port's first state (it does so right after the OS opened the device, DTR first, then
RTS); nothing toggles them afterwards. The port is opened exclusively, so a second program (esptool, another
terminal) gets a clear "busy" error instead of a garbled session.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from .errors import PortError

__all__ = ["DEFAULT_BAUD", "READ_SLICE", "WRITE_TIMEOUT", "open_port"]

DEFAULT_BAUD = 115200
READ_SLICE = 0.05
"""Seconds one ``read`` on the port may block: the granularity of every wait in a session."""
WRITE_TIMEOUT = 2.0
"""Seconds a write may block (a USB bridge that stopped taking data)."""


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
