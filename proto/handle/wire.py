"""Building blocks the other modules of :mod:`proto.handle` share (internal to the package).

The fixed struct layouts (envelope, header, the fixed part of a value), a bounded :class:`Reader` whose every
failure is a :class:`HandleFormatError` naming the field, and the packing helpers that turn an out-of-range
field into a ValueError.
"""

from __future__ import annotations

import struct

from proto.handle.errors import HandleFormatError
from proto.handle.numbers import ENVELOPE_SIZE, HEADER_SIZE, MAX_FIELD_SIZE

ENVELOPE = struct.Struct(">BBHIIII")  # major minor flags session_id request_id sequence message_length
HEADER = struct.Struct(">IIIHBBII")  # opcode code op_flags serial recursion reserved expiration body_length
VALUE_FIXED = struct.Struct(">IIBIB")  # index, timestamp, ttl_type, ttl, permissions
VALUE_HEAD = struct.Struct(">IIBIBI")  # the fixed part of a value and the length of its type
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")
U32_MASK = 0xFFFFFFFF

# Smallest encodings, used to reject counts that cannot fit in the bytes that remain.
MIN_VALUE = VALUE_FIXED.size + 4 + 4 + 4  # fixed part, empty type, empty data, no references
MIN_REFERENCE = 4 + 4
MIN_TYPE = 4

assert ENVELOPE.size == ENVELOPE_SIZE and HEADER.size == HEADER_SIZE


class Reader:
    """Cursor over ``buf[pos:end]``; every read is checked, every failure is a HandleFormatError."""

    __slots__ = ("buf", "pos", "end", "what")

    def __init__(self, buf: bytes, what: str, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end
        self.what = what

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, field: str) -> None:
        if n > self.end - self.pos:
            raise HandleFormatError(
                f"{self.what}: truncated at {field}: needs {n} bytes at offset {self.pos}, {self.end - self.pos} left"
            )

    def u8(self, field: str) -> int:
        self._need(1, field)
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def u32(self, field: str) -> int:
        self._need(4, field)
        (v,) = U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def unpack(self, st: struct.Struct, field: str) -> tuple[int, ...]:
        self._need(st.size, field)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return tuple(int(x) for x in out)

    def raw(self, n: int, field: str) -> bytes:
        self._need(n, field)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def blob(self, field: str, cap: int = MAX_FIELD_SIZE) -> bytes:
        n = self.u32(f"{field} length")
        if n > cap:
            raise HandleFormatError(f"{self.what}: {field} length {n} exceeds the limit of {cap} bytes")
        return self.raw(n, field)

    def text(self, field: str) -> str:
        b = self.blob(field)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise HandleFormatError(f"{self.what}: {field} is not UTF-8") from None

    def count(self, field: str, cap: int, min_item: int) -> int:
        n = self.u32(field)
        if n > cap:
            raise HandleFormatError(f"{self.what}: {field} {n} exceeds the limit of {cap}")
        if n * min_item > self.end - self.pos:
            raise HandleFormatError(
                f"{self.what}: {field} {n} cannot fit in the {self.end - self.pos} bytes left"
            )
        return n


def pack(st: struct.Struct, *args: int) -> bytes:
    """``st.pack(*args)``; a field out of range is a ValueError (the caller's mistake)."""
    try:
        return st.pack(*args)
    except struct.error as e:
        raise ValueError(f"field out of range: {e}") from None


def u32(v: int) -> bytes:
    return pack(U32, v)


def blob(b: bytes) -> bytes:
    """A length-prefixed field."""
    if len(b) > MAX_FIELD_SIZE:
        raise ValueError(f"field of {len(b)} bytes exceeds the limit of {MAX_FIELD_SIZE}")
    return U32.pack(len(b)) + b
