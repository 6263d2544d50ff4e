"""Typed errors of ``ida flash``, by who is at fault. Each carries a hint for the operator; the CLI maps them to
exit codes (only there). The hints of the errors that have a standard one are the table :data:`HINTS`."""

from __future__ import annotations

from tools.errors import HintedError


class FlashError(HintedError):
    """Base of every error raised on purpose: not a bug. ``hint`` tells the operator what to do next: the one
    given, else the one :data:`HINTS` holds for the error's kind (or the nearest base class's)."""

    hint_label = "hint: "

    def default_hint(self) -> str:
        return kind_hint(type(self))


class BuildError(FlashError):
    """The firmware does not compile, a file does not fit, a runtime image is not usable for the board."""


class RuntimeMissing(FlashError):
    """No MicroPython image was given for a chip that needs one."""


class CaError(FlashError):
    """The broker's CA certificate given for the image is not usable."""


class KeystoreError(FlashError):
    """The keystore file cannot be read, parsed or written."""


# --- the station and the chip ---------------------------------------------------------------------------


class PortError(FlashError):
    """The serial port cannot be used."""

    def __init__(self, port: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{port}: {message}", hint)
        self.port = port


class PortBusy(PortError):
    """Another program has the port open."""


class PortMissing(PortError):
    """There is no such serial port."""


class NoChip(PortError):
    """The port opens but no ESP ROM bootloader answers on it."""


class WrongChip(FlashError):
    """The chip on the port is not the one the board file describes."""

    def __init__(self, found: str, expected: str, board: str) -> None:
        super().__init__(f"chip on the port is {found}, but board {board!r} needs {expected}")
        self.found = found
        self.expected = expected
        self.board = board


class FlashTooSmall(FlashError):
    """The chip has less flash than the board file describes."""


class WriteFailed(FlashError):
    """A write to the chip's flash did not complete."""


class VerifyFailed(FlashError):
    """What was read back from the chip differs from what was written."""

    def __init__(self, mismatches: list[tuple[int, int]]) -> None:
        where = ", ".join(f"0x{o:x}+0x{s:x}" for o, s in mismatches)
        super().__init__(f"verify failed: flash differs from what was written at {where}")
        self.mismatches = mismatches


class ConsoleTimeout(FlashError):
    """The flashed chip's console did not answer in time."""


# --- the ledger ------------------------------------------------------------------------------------------


class LedgerError(FlashError):
    """The ledger refuses an operation that would issue an identifier twice or lose one."""


class PoolExhausted(LedgerError):
    """No free identifier is left in the pools."""


class IdentifierConflict(LedgerError):
    """An identifier already bound to another MAC, or a MAC already bound to another identifier."""


# --- the operator's next step, by kind of error ----------------------------------------------------------

HINTS: dict[type[FlashError], str] = {
    RuntimeMissing: "give the MicroPython image for this chip with --runtime PATH (it is never downloaded)",
    CaError: "give the CA certificate that issued the broker's certificate (PEM or DER), e.g. tls/ca.crt",
    KeystoreError: "the keystore file is damaged or not readable by this user; restore it from the station's backup",
    PortBusy: "another program (a console, a second station, ModemManager) has the port open; close it",
    PortMissing: "check the port name and the USB cable",
    NoChip: "the port opens but no ESP ROM bootloader answers: check power, cable, and hold BOOT while resetting",
    WrongChip: "pick the --board that matches the chip (`ida flash boards`), or put the right board on the jig",
    FlashTooSmall: "this module has less flash than the board file describes; use the matching board file",
    WriteFailed: "re-seat the chip and flash it again: the ledger keeps its identifier bound to its MAC",
    VerifyFailed: "flash it again; if it fails twice the flash chip is faulty (the identifier stays bound to this MAC)",
    ConsoleTimeout: "the chip was flashed and verified; check the console with `ida console`",
    PoolExhausted: "add identifiers: `ida flash pool add ...`",
}


def kind_hint(kind: type[FlashError]) -> str:
    """The hint of an error class: its own in :data:`HINTS`, else its nearest base class's, else ``""``."""
    return next((HINTS[k] for k in kind.__mro__ if k in HINTS), "")
