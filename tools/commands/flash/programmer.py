"""Everything that touches a chip goes through :class:`Programmer`: detect, read_mac, read_flash, flash_md5,
write_flash, verify, reset. :class:`EsptoolProgrammer` drives a real chip with esptool's Python API
(``esptool.cmds``); :class:`SimulatedChip` is an in-memory chip for tests (a bytearray of the flash, a chip
name, a MAC) with a few switches to make it fail.

Nothing here writes eFuses, enables flash encryption or secure boot, or erases the whole flash: the worst a
chip can be left in is a half-written app or filesystem, which the next run of ``ida flash device --full``
fixes through the ROM bootloader.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import FlashError, NoChip, PortBusy, PortError, PortMissing, WriteFailed

Parts = Sequence[tuple[int, bytes]]


def chip_key(name: str) -> str:
    """esptool's chip name as the board files spell it: ``ESP32-C3`` -> ``esp32c3``."""
    return name.lower().replace("-", "").replace("_", "")


def format_mac(raw: Sequence[int]) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class ChipInfo:
    chip: str  # board-file spelling: esp32, esp32s3, esp32c3
    description: str  # e.g. "ESP32-D0WD-V3 (revision v3.1)"
    flash_size: int | None  # bytes, None when the flash chip's id is unknown


class Programmer(ABC):
    """One chip on one port. ``detect`` connects; ``reset`` hard-resets into the app and lets the port go."""

    port: str

    @abstractmethod
    def detect(self) -> ChipInfo: ...

    @abstractmethod
    def read_mac(self) -> str: ...

    @abstractmethod
    def read_flash(self, offset: int, size: int) -> bytes: ...

    @abstractmethod
    def flash_md5(self, offset: int, size: int) -> str:
        """MD5 of a flash region computed on the chip (what esptool's verify-flash compares)."""

    @abstractmethod
    def write_flash(self, parts: Parts) -> None:
        """Write each (offset, data); offsets and lengths multiples of 4096 (erase sectors)."""

    @abstractmethod
    def reset(self) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the port without resetting (after an error)."""

    def verify(self, parts: Parts) -> list[tuple[int, int]]:
        """The (offset, size) of every part whose flash content differs from ``data`` (empty: all good)."""
        return [
            (off, len(data))
            for off, data in parts
            if self.flash_md5(off, len(data)) != hashlib.md5(data).hexdigest()
        ]


# --- the simulated chip ---------------------------------------------------------------------------------------


@dataclass
class SimulatedChip(Programmer):
    """A chip in memory: flash is erased (0xFF) unless given. Switches: ``busy`` / ``absent`` / ``silent``
    make ``detect`` fail like a busy port, a missing port, no chip answering; ``flip_after_write`` is a flash
    address whose byte is corrupted after every write (verify must catch it); ``fail_after_writes`` = n makes
    the write after the first n (offset, data) parts fail, as a cable pulled mid-write."""

    chip: str = "esp32"
    mac: str = "24:0a:c4:00:00:01"
    flash_size: int = 4 << 20
    port: str = "sim0"
    flash: bytearray = field(default_factory=bytearray)
    busy: bool = False
    absent: bool = False
    silent: bool = False
    flip_after_write: int | None = None
    fail_after_writes: int | None = None
    # what happened, for tests and measurements
    written: list[tuple[int, int]] = field(default_factory=list)
    resets: int = 0

    def __post_init__(self) -> None:
        if not self.flash:
            self.flash = bytearray(b"\xff" * self.flash_size)

    @property
    def bytes_written(self) -> int:
        return sum(n for _, n in self.written)

    def detect(self) -> ChipInfo:
        if self.absent:
            raise PortMissing(self.port, "no such port")
        if self.busy:
            raise PortBusy(self.port, "the port is busy")
        if self.silent:
            raise NoChip(self.port, "no chip answered")
        return ChipInfo(self.chip, f"{self.chip.upper()} (simulated)", self.flash_size)

    def read_mac(self) -> str:
        return self.mac

    def read_flash(self, offset: int, size: int) -> bytes:
        self._bounds(offset, size)
        return bytes(self.flash[offset : offset + size])

    def flash_md5(self, offset: int, size: int) -> str:
        return hashlib.md5(self.read_flash(offset, size)).hexdigest()

    def write_flash(self, parts: Parts) -> None:
        for off, data in parts:
            if off % 4096:
                raise WriteFailed(f"write at 0x{off:x} is not sector-aligned")
            if self.fail_after_writes is not None and len(self.written) >= self.fail_after_writes:
                raise WriteFailed(f"{self.port}: serial link lost while writing at 0x{off:x}")
            self._bounds(off, len(data))
            self.flash[off : off + len(data)] = data
            self.written.append((off, len(data)))
        if self.flip_after_write is not None:
            self.flash[self.flip_after_write] ^= 0x01

    def reset(self) -> None:
        self.resets += 1

    def _bounds(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > len(self.flash):
            raise FlashError(f"0x{offset:x}+0x{size:x} is outside the {len(self.flash)}-byte flash")


# --- esptool ----------------------------------------------------------------------------------------------------


def port_error(port: str, exc: BaseException) -> PortError:
    """esptool's / pyserial's error for a port, as one of ours (esptool's own hint text dropped: ours says
    the same, once)."""
    text = str(exc)
    low = text.lower()
    if "errno 2]" in low or "no such file" in low or "filenotfound" in low:
        return PortMissing(port, "no such serial port")
    if "permission denied" in low:
        return PortError(port, "permission denied", "add the user to the dialout group (then log in again)")
    if "could not open" in low or "busy" in low or "lock" in low or "errno 16" in low or "errno 11" in low:
        return PortBusy(port, "the port is busy (another program has it open)")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return NoChip(port, f"no ESP chip answered ({first.split(' For troubleshooting')[0]})")


class EsptoolProgrammer(Programmer):
    """A real chip through esptool's Python API: ``detect_chip`` (resets into the ROM bootloader with DTR/RTS),
    the flasher stub, then ``write_flash`` / ``flash_md5sum`` / ``read_flash``, ``hard_reset`` at the end."""

    def __init__(
        self, port: str, baud: int = 460800, connect_attempts: int = 3, before: str = "default-reset"
    ) -> None:
        self.port = port
        self.baud = baud
        self.connect_attempts = connect_attempts
        self.before = before
        self._esp: Any = None

    @property
    def esp(self) -> Any:
        if self._esp is None:
            raise FlashError(f"{self.port}: not connected (call detect first)")
        return self._esp

    def detect(self) -> ChipInfo:
        from esptool.cmds import detect_chip, detect_flash_size, run_stub
        from esptool.util import FatalError, flash_size_bytes
        from serial import SerialException

        from .builder import quiet_esptool

        with quiet_esptool():
            try:
                esp = detect_chip(self.port, 115200, self.before, connect_attempts=self.connect_attempts)
            except (FatalError, SerialException, OSError) as e:
                raise port_error(self.port, e) from None
            self._esp = esp
            try:
                if not esp.secure_download_mode:
                    esp = self._esp = run_stub(esp)
                if self.baud > 115200:
                    esp.change_baud(self.baud)
                size = detect_flash_size(esp)
            except (FatalError, SerialException, OSError) as e:
                self.close()
                raise NoChip(self.port, f"chip stopped answering while connecting ({e})") from None
        return ChipInfo(
            chip_key(esp.CHIP_NAME), esp.get_chip_description(), flash_size_bytes(size) if size else None
        )

    def read_mac(self) -> str:
        return format_mac(self.esp.read_mac())

    def read_flash(self, offset: int, size: int) -> bytes:
        from esptool.cmds import read_flash

        from .builder import quiet_esptool

        with quiet_esptool():
            data = read_flash(self.esp, offset, size, no_progress=True)
        assert data is not None
        return data

    def flash_md5(self, offset: int, size: int) -> str:
        return str(self.esp.flash_md5sum(offset, size))

    def write_flash(self, parts: Parts) -> None:
        from esptool.cmds import write_flash
        from esptool.util import FatalError
        from serial import SerialException

        from .builder import quiet_esptool

        with quiet_esptool() as out:
            try:
                write_flash(self.esp, list(parts), no_progress=True)
            except (FatalError, SerialException, OSError) as e:
                tail = " ".join(out.getvalue().split()[-30:])
                raise WriteFailed(f"{self.port}: write failed: {e} [{tail}]") from None

    def reset(self) -> None:
        from esptool.cmds import reset_chip

        from .builder import quiet_esptool

        with quiet_esptool():
            reset_chip(self.esp, "hard-reset")
        self.close()

    def close(self) -> None:
        if self._esp is not None:
            try:
                self._esp._port.close()
            finally:
                self._esp = None
