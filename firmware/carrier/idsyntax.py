# Identifier syntax on the device: Handle-syntax <prefix>/<suffix>, rules and reason codes as in
# docs/protocol.md. Works on the UTF-8 bytes (iterating bytes yields ints: no allocation per character).
# The CPython twin is proto/identifier.py; tests/vectors/identifiers.json pins both. (identity.py holds this
# device's own identifier and key.)
from micropython import const
_MAX_LENGTH = const(255)

EMPTY = "EMPTY"
TOO_LONG = "TOO_LONG"
NOT_UTF8 = "NOT_UTF8"
CONTROL_CHAR = "CONTROL_CHAR"
NO_SEPARATOR = "NO_SEPARATOR"
EMPTY_PREFIX = "EMPTY_PREFIX"
EMPTY_SEGMENT = "EMPTY_SEGMENT"
BAD_PREFIX_CHAR = "BAD_PREFIX_CHAR"
EMPTY_SUFFIX = "EMPTY_SUFFIX"


class IdentifierError(ValueError):
    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _prefix_char(c):
    return (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A) or c == 0x2D or c == 0x5F or c == 0x2E


def parse(text):
    """Return the normalised identifier (prefix upper-cased) as str, or raise IdentifierError(reason)."""
    # UTF-8 is checked here, strictly (RFC 3629): MicroPython's str(b, "utf-8") lets overlong forms,
    # surrogates and code points past U+10FFFF through, and its str can hold such bytes.
    b = text.encode() if isinstance(text, str) else bytes(text)
    if not b:
        raise IdentifierError(EMPTY)
    n = 0  # characters
    prev = 0
    ctl = False
    need = 0  # continuation bytes still expected
    lo = 0x80  # allowed range of the next continuation byte
    hi = 0xBF
    for c in b:
        if need:
            if c < lo or c > hi:
                raise IdentifierError(NOT_UTF8, "not valid UTF-8")
            lo = 0x80
            hi = 0xBF
            need -= 1
        elif c >= 0x80:
            if 0xC2 <= c <= 0xDF:
                need = 1
            elif 0xE0 <= c <= 0xEF:
                need = 2
                if c == 0xE0:
                    lo = 0xA0  # no overlong 3-byte forms
                elif c == 0xED:
                    hi = 0x9F  # no surrogates
            elif 0xF0 <= c <= 0xF4:
                need = 3
                if c == 0xF0:
                    lo = 0x90  # no overlong 4-byte forms
                elif c == 0xF4:
                    hi = 0x8F  # nothing past U+10FFFF
            else:
                raise IdentifierError(NOT_UTF8, "not valid UTF-8")
        if c & 0xC0 != 0x80:
            n += 1
        if c < 0x20 or c == 0x7F or (prev == 0xC2 and 0x80 <= c <= 0x9F):
            ctl = True
        prev = c
    if need:
        raise IdentifierError(NOT_UTF8, "not valid UTF-8")
    if n > _MAX_LENGTH:
        raise IdentifierError(TOO_LONG, "%d characters" % n)
    if ctl:
        raise IdentifierError(CONTROL_CHAR, "control character")
    slash = b.find(b"/")
    if slash < 0:
        raise IdentifierError(NO_SEPARATOR)
    if slash == 0:
        raise IdentifierError(EMPTY_PREFIX)
    dot = True  # previous prefix char was '.' (or start)
    lower = False
    for i in range(slash):
        c = b[i]
        if not _prefix_char(c):
            raise IdentifierError(BAD_PREFIX_CHAR, "prefix character %r" % chr(c))
        if 0x61 <= c <= 0x7A:
            lower = True
    for i in range(slash):
        c = b[i]
        if c == 0x2E:
            if dot:
                raise IdentifierError(EMPTY_SEGMENT)
            dot = True
        else:
            dot = False
    if dot:
        raise IdentifierError(EMPTY_SEGMENT)
    if slash == len(b) - 1:
        raise IdentifierError(EMPTY_SUFFIX)
    if isinstance(text, str) and not lower:
        return text
    if not lower:
        return str(b, "utf-8")
    return str(b[:slash], "ascii").upper() + str(b[slash:], "utf-8")


def split(ident):
    """(prefix, suffix) of a normalised identifier."""
    i = ident.find("/")
    return ident[:i], ident[i + 1:]
