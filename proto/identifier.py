"""Handle-syntax identifiers: ``<prefix>/<suffix>``, e.g. ``88.123.99/PUMP-0001``.

One parser for the CPython side (the firmware has its own, allocation-aware one in
``firmware/carrier/idsyntax.py``); both are checked against ``tests/vectors/identifiers.json``.

Rules: UTF-8; at most 255 characters; the first ``/`` splits prefix and suffix (the suffix may contain
more ``/``); the prefix is ``.``-separated non-empty segments of ASCII letters, digits, ``-`` and ``_``
and is case-insensitive (normalised to upper case, as ``0.NA``); the suffix is any text without control
characters, case preserved. Every rejection carries a stable reason code.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LENGTH = 255

# Stable reason codes (also used by the firmware and in the vectors).
EMPTY = "EMPTY"
TOO_LONG = "TOO_LONG"
NOT_UTF8 = "NOT_UTF8"
CONTROL_CHAR = "CONTROL_CHAR"
NO_SEPARATOR = "NO_SEPARATOR"
EMPTY_PREFIX = "EMPTY_PREFIX"
EMPTY_SEGMENT = "EMPTY_SEGMENT"
BAD_PREFIX_CHAR = "BAD_PREFIX_CHAR"
EMPTY_SUFFIX = "EMPTY_SUFFIX"

REASONS = (
    EMPTY,
    TOO_LONG,
    NOT_UTF8,
    CONTROL_CHAR,
    NO_SEPARATOR,
    EMPTY_PREFIX,
    EMPTY_SEGMENT,
    BAD_PREFIX_CHAR,
    EMPTY_SUFFIX,
)

_PREFIX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


class IdentifierError(ValueError):
    """A malformed identifier; ``reason`` is one of the stable codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Identifier:
    prefix: str
    suffix: str

    def __str__(self) -> str:
        return f"{self.prefix}/{self.suffix}"

    @property
    def segments(self) -> tuple[str, ...]:
        """Prefix segments: ``88.123.99`` -> ("88", "123", "99")."""
        return tuple(self.prefix.split("."))


def _is_control(c: str) -> bool:
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F


def parse(text: str | bytes) -> Identifier:
    """Parse and normalise, raising IdentifierError with a reason code."""
    if isinstance(text, bytes | bytearray | memoryview):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise IdentifierError(NOT_UTF8, "identifier is not valid UTF-8") from None
    elif not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form, cannot go upstream or into SQLite
            raise IdentifierError(NOT_UTF8, "identifier is not valid UTF-8 (lone surrogate)") from None
    if not text:
        raise IdentifierError(EMPTY, "identifier is empty")
    if len(text) > MAX_LENGTH:
        raise IdentifierError(
            TOO_LONG, f"identifier has {len(text)} characters, at most {MAX_LENGTH} allowed"
        )
    for i, c in enumerate(text):
        if _is_control(c):
            raise IdentifierError(CONTROL_CHAR, f"control character U+{ord(c):04X} at position {i}")
    slash = text.find("/")
    if slash < 0:
        raise IdentifierError(NO_SEPARATOR, "identifier has no '/' between prefix and suffix")
    prefix, suffix = text[:slash], text[slash + 1 :]
    if not prefix:
        raise IdentifierError(EMPTY_PREFIX, "prefix before '/' is empty")
    for c in prefix:
        if c not in _PREFIX_CHARS:
            raise IdentifierError(
                BAD_PREFIX_CHAR, f"prefix character {c!r} is not a letter, digit, '-', '_' or '.'"
            )
    if "" in prefix.split("."):
        raise IdentifierError(EMPTY_SEGMENT, "prefix has an empty segment (leading, trailing or double '.')")
    if not suffix:
        raise IdentifierError(EMPTY_SUFFIX, "suffix after '/' is empty")
    return Identifier(prefix.upper(), suffix)


def normalise(text: str | bytes) -> str:
    """The canonical string form (prefix upper-cased): the cache key and what is sent upstream."""
    return str(parse(text))


def reason_of(text: str | bytes) -> str | None:
    """None for a valid identifier, else its reason code."""
    try:
        parse(text)
    except IdentifierError as e:
        return e.reason
    return None
