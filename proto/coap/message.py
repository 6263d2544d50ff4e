"""CoAP messages (RFC 7252 section 3): one datagram <-> :class:`Message`, the option encoding, and request
templates (a request with everything but the Message ID and token already encoded).

:meth:`Message.decode` takes a whole datagram and raises :class:`MessageError` -- and nothing else -- for one that
is not a well-formed message: a version other than 1, a token length of 9-15, a reserved option nibble, an option
or its extended fields running past the end, a payload marker with nothing after it, an Empty message with
anything after its Message ID.

Code that runs per datagram does not build messages: :func:`parse_header` reads the four header bytes and the
token, :func:`option_spans` says where each option's value lies, :func:`heads` gives the first two bytes of an
answer by token length, and a :class:`RequestTemplate` patches the Message ID and token into bytes encoded once.

>>> m = Message(CON, GET, 0x1234, b"\\x12\\x34", ((Option.URI_PATH, b"r"), (Option.URI_PATH, b"x")))
>>> m.encode().hex()
'420112341234b1720178'
>>> Message.decode(bytes.fromhex("420112341234b1720178")) == m
True
>>> t = request_template(("r", "88.123.99", "PUMP-0001"))
>>> d = t.datagram(0x1234, b"\\x12\\x34")
>>> len(d), parse_header(d)
(28, (0, 1, 4660, b'\\x124'))
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proto.coap.numbers import CON, GET, NON, PAYLOAD_MARKER, VERSION, Option

__all__ = [
    "MessageError",
    "Message",
    "RequestTemplate",
    "request_template",
    "encode_options",
    "encode_option",
    "encode_body",
    "option_spans",
    "parse_header",
    "header",
    "empty",
    "heads",
    "uint_value",
    "uint_of",
]

_H = struct.Struct("!BBH")


class MessageError(ValueError):
    """A datagram that is not a well-formed CoAP message (RFC 7252 section 3): the receiver drops it (or, for a
    CON, may answer RST)."""


# -- option values and option encoding ---------------------------------------------------------------------------
def uint_value(n: int) -> bytes:
    """A uint option value (section 3.2): shortest big-endian form, 0 is empty."""
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def uint_of(value: bytes) -> int:
    return int.from_bytes(value, "big")


def _nibble(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes((n - 13,))
    if n < 65805:
        return 14, (n - 269).to_bytes(2, "big")
    raise ValueError(f"option delta or length {n} does not fit (at most 65804)")


def encode_option(delta: int, value: bytes) -> bytes:
    """One option: its delta from the previous option number, then the value (extended fields as needed)."""
    dn, dx = _nibble(delta)
    ln, lx = _nibble(len(value))
    return bytes((dn << 4 | ln,)) + dx + lx + value


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Options as (number, value) pairs, put in number order (stable: repeated options keep their order)."""
    out = []
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        out.append(encode_option(number - last, value))
        last = number
    return b"".join(out)


def encode_body(options: Iterable[tuple[int, bytes]], payload: bytes = b"") -> bytes:
    """What follows the token: the options (in number order), then the payload marker and the payload."""
    out = encode_options(options)
    return out + b"\xff" + payload if payload else out


def _extended(nibble: int, data: bytes, pos: int, what: str) -> tuple[int, int]:
    """An option delta or length given its 4-bit field: (value, position after its extended bytes)."""
    if nibble < 13:
        return nibble, pos
    if nibble == 13:
        if pos >= len(data):
            raise MessageError(f"option {what} runs past the end")
        return data[pos] + 13, pos + 1
    if nibble == 14:
        if pos + 1 >= len(data):
            raise MessageError(f"option {what} runs past the end")
        return (data[pos] << 8 | data[pos + 1]) + 269, pos + 2
    raise MessageError(f"reserved option {what} 15")


def option_spans(data: bytes, pos: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Where the options starting at ``pos`` lie: ``([(number, head, start, end), ...], payload_start)``, ``head``
    being the offset of the option's first byte and ``data[start:end]`` its value. ``payload_start`` is
    ``len(data)`` when there is no payload. Raises :class:`MessageError` for a malformed option part."""
    n = len(data)
    spans: list[tuple[int, int, int, int]] = []
    number = 0
    while pos < n:
        head = pos
        byte = data[pos]
        if byte == PAYLOAD_MARKER:
            if pos + 1 == n:
                raise MessageError("payload marker followed by no payload")
            return spans, pos + 1
        delta, pos = _extended(byte >> 4, data, pos + 1, "delta")
        length, pos = _extended(byte & 0x0F, data, pos, "length")
        number += delta
        if pos + length > n:
            raise MessageError("option value runs past the end")
        spans.append((number, head, pos, pos + length))
        pos += length
    return spans, n


# -- the header ------------------------------------------------------------------------------------------------
def header(mtype: int, code: int, mid: int, token: bytes = b"") -> bytes:
    """The fixed header and the token."""
    return _H.pack(VERSION << 6 | mtype << 4 | len(token), code, mid) + token


def empty(mtype: int, mid: int) -> bytes:
    """An Empty message: an empty ACK (the answer comes separately) or a RST."""
    return _H.pack(VERSION << 6 | mtype << 4, 0, mid)


@functools.cache
def heads(mtype: int, code: int) -> tuple[bytes, ...]:
    """The first two bytes of a message of ``mtype`` and ``code``, indexed by token length (0-8)."""
    return tuple(bytes((VERSION << 6 | mtype << 4 | tkl, code)) for tkl in range(9))


def parse_header(data: bytes) -> tuple[int, int, int, bytes] | None:
    """(type, code, Message ID, token) of a datagram, None when it has no CoAP version 1 header."""
    if len(data) < 4:
        return None
    first = data[0]
    tkl = first & 0x0F
    if first >> 6 != VERSION or tkl > 8 or len(data) < 4 + tkl:
        return None
    return (first >> 4) & 3, data[1], data[2] << 8 | data[3], data[4 : 4 + tkl]


# -- messages --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Message:
    """One CoAP message. ``options`` are (number, value) pairs in number order (as decoded; :meth:`encode` sorts
    them)."""

    mtype: int
    code: int
    mid: int = 0
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""

    def encode(self) -> bytes:
        if not 0 <= self.mtype <= 3 or not 0 <= self.code <= 0xFF or not 0 <= self.mid <= 0xFFFF:
            raise ValueError("type 0-3, code 0-255 and Message ID 0-65535")
        if len(self.token) > 8:
            raise ValueError("a token is 0-8 bytes")
        out = header(self.mtype, self.code, self.mid, self.token) + encode_options(self.options)
        return out + bytes((PAYLOAD_MARKER,)) + self.payload if self.payload else out

    @classmethod
    def decode(cls, datagram: bytes) -> Message:
        """The message in ``datagram`` (all of it); :class:`MessageError` when it is not one."""
        n = len(datagram)
        if n < 4:
            raise MessageError(f"{n} bytes: shorter than the CoAP header")
        first, code, mid = _H.unpack_from(datagram)
        if first >> 6 != VERSION:
            raise MessageError(f"CoAP version {first >> 6}")
        tkl = first & 0x0F
        if tkl > 8:
            raise MessageError(f"token length {tkl}")
        if n < 4 + tkl:
            raise MessageError("the token runs past the end")
        if code == 0 and n > 4:
            raise MessageError("an Empty message with bytes after its Message ID")
        spans, start = option_spans(datagram, 4 + tkl)
        return cls(
            (first >> 4) & 3,
            code,
            mid,
            datagram[4 : 4 + tkl],
            tuple((number, datagram[a:b]) for number, _h, a, b in spans),
            datagram[start:],
        )

    def option(self, number: int) -> bytes | None:
        """The first value of option ``number``, None when absent."""
        for n, v in self.options:
            if n == number:
                return v
        return None

    def values(self, number: int) -> list[bytes]:
        """Every value of option ``number``, in order."""
        return [v for n, v in self.options if n == number]


# -- request templates -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """A request with everything but the Message ID and token already encoded."""

    first: int  # version | type | token length (fixed per template)
    code: int
    tail: bytes  # options

    @property
    def token_len(self) -> int:
        return self.first & 0x0F

    @property
    def confirmable(self) -> bool:
        return (self.first >> 4) & 3 == CON

    def datagram(self, mid: int, token: bytes, payload: bytes = b"") -> bytes:
        out = _H.pack(self.first, self.code, mid) + token + self.tail
        return out + b"\xff" + payload if payload else out


def request_template(
    path: Sequence[str],
    *,
    confirmable: bool = True,
    code: int = GET,
    token_len: int = 2,
    query: Sequence[str] = (),
    options: Iterable[tuple[int, bytes]] = (),
) -> RequestTemplate:
    """A template for ``code`` on ``path`` (segments, each one Uri-Path option), with Uri-Query ``query`` and
    any other ``options``."""
    if not 0 <= token_len <= 8:
        raise ValueError("a token is 0-8 bytes")
    opts = [(int(Option.URI_PATH), s.encode()) for s in path]
    opts += [(int(Option.URI_QUERY), q.encode()) for q in query]
    opts += list(options)
    mtype = CON if confirmable else NON
    return RequestTemplate(VERSION << 6 | mtype << 4 | token_len, code, encode_options(opts))
