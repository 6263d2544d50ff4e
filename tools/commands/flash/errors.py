"""Typed errors of ``ida flash``, by who is at fault. Each carries a hint for the operator; the CLI maps them to
exit codes (only there)."""

from __future__ import annotations


class FlashError(RuntimeError):
    """Base of every error raised on purpose: not a bug. ``hint`` tells the operator what to do next."""

    hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


class BuildError(FlashError):
    """The firmware does not compile, a file does not fit, a runtime image is not usable for the board."""


# --- the station and the chip ---------------------------------------------------------------------------


class PortError(FlashError):
    """The serial port cannot be used."""

    def __init__(self, port: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{port}: {message}", hint)
        self.port = port


class PortBusy(PortError):
    hint = "another program (a console, a second station, ModemManager) has the port open; close it"


class PortMissing(PortError):
    hint = "check the port name and the USB cable"


class NoChip(PortError):
    hint = (
        "the port opens but no ESP ROM bootloader answers: check power, cable, and hold BOOT while resetting"
    )


class WrongChip(FlashError):
    """The chip on the port is not the one the board file describes."""

    hint = "pick the --board that matches the chip (`ida flash boards`), or put the right board on the jig"

    def __init__(self, found: str, expected: str, board: str) -> None:
        super().__init__(f"chip on the port is {found}, but board {board!r} needs {expected}")
        self.found = found
        self.expected = expected
        self.board = board


class FlashTooSmall(FlashError):
    hint = "this module has less flash than the board file describes; use the matching board file"


class WriteFailed(FlashError):
    hint = "re-seat the chip and flash it again: the ledger keeps its identifier bound to its MAC"


class VerifyFailed(FlashError):
    """What was read back from the chip differs from what was written."""

    hint = (
        "flash it again; if it fails twice the flash chip is faulty (the identifier stays bound to this MAC)"
    )

    def __init__(self, mismatches: list[tuple[int, int]]) -> None:
        where = ", ".join(f"0x{o:x}+0x{s:x}" for o, s in mismatches)
        super().__init__(f"verify failed: flash differs from what was written at {where}")
        self.mismatches = mismatches


class RuntimeMissing(FlashError):
    hint = "give the MicroPython image for this chip with --runtime PATH (it is never downloaded)"


class ConsoleTimeout(FlashError):
    hint = "the chip was flashed and verified; check the console with `ida console`"


# --- the ledger ------------------------------------------------------------------------------------------


class LedgerError(FlashError):
    """The ledger refuses an operation that would issue an identifier twice or lose one."""


class PoolExhausted(LedgerError):
    hint = "add identifiers: `ida flash pool add ...`"


class IdentifierConflict(LedgerError):
    """An identifier already bound to another MAC, or a MAC already bound to another identifier."""
