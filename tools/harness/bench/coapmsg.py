"""The few bytes of CoAP (RFC 7252) the bench needs, without aiocoap: encode a request, read a response header.

The load generator must cost less than the servers it measures, so nothing here builds message objects:
:func:`encode_request` is called once per target path and yields a :class:`RequestTemplate` whose
``datagram(mid, token)`` patches the Message ID and token into pre-encoded bytes.

>>> t = encode_request(("r", "88.123.99", "PUMP-0001"))
>>> d = t.datagram(0x1234, b"\\x12\\x34")
>>> len(d), d[:6].hex()
(28, '420112341234')
>>> parse_header(d)
(0, 1, 4660, b'\\x124')
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CON",
    "NON",
    "ACK",
    "RST",
    "GET",
    "PUT",
    "CONTENT",
    "CREATED",
    "CHANGED",
    "VALID",
    "OPT_ETAG",
    "OPT_URI_PATH",
    "OPT_CONTENT_FORMAT",
    "OPT_MAX_AGE",
    "OPT_URI_QUERY",
    "RequestTemplate",
    "encode_request",
    "encode_options",
    "encode_message",
    "parse_header",
    "parse_options",
    "code_str",
    "split_path",
]

VERSION = 1
CON, NON, ACK, RST = 0, 1, 2, 3
GET, PUT = 0x01, 0x03
CREATED, CHANGED, VALID, CONTENT = 0x41, 0x44, 0x43, 0x45
OPT_ETAG, OPT_URI_PATH, OPT_CONTENT_FORMAT, OPT_MAX_AGE, OPT_URI_QUERY = 4, 11, 12, 14, 15
PAYLOAD_MARKER = 0xFF

_H = struct.Struct("!BBH")


def code_str(code: int) -> str:
    """``0x45`` -> ``"2.05"``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


def split_path(path: str) -> tuple[str, ...]:
    """``"/r/88.123.99/PUMP-0001"`` -> ``("r", "88.123.99", "PUMP-0001")``; ``"/"`` -> ``()``."""
    return tuple(s for s in path.strip("/").split("/") if s) if path.strip("/") else ()


def _ext(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes((n - 13,))
    return 14, struct.pack("!H", n - 269)


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Options as (number, value) pairs, sorted by number (stable), delta-encoded."""
    out = bytearray()
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        dn, dx = _ext(number - last)
        ln, lx = _ext(len(value))
        out.append(dn << 4 | ln)
        out += dx + lx + value
        last = number
    return bytes(out)


def uint_value(n: int) -> bytes:
    """A CoAP uint option value: shortest big-endian form, 0 is empty."""
    return n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""


def encode_message(
    mtype: int,
    code: int,
    mid: int,
    token: bytes,
    options: Iterable[tuple[int, bytes]] = (),
    payload: bytes = b"",
) -> bytes:
    if not 0 <= len(token) <= 8:
        raise ValueError("a token is 0-8 bytes")
    head = (
        _H.pack(VERSION << 6 | mtype << 4 | len(token), code, mid & 0xFFFF) + token + encode_options(options)
    )
    return head + (bytes((PAYLOAD_MARKER,)) + payload if payload else b"")


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """A request with everything but the Message ID and token already encoded."""

    first: int  # version | type | token length (the token length is fixed per template)
    code: int
    tail: bytes  # options (+ payload)

    @property
    def token_len(self) -> int:
        return self.first & 0x0F

    def datagram(self, mid: int, token: bytes) -> bytes:
        return _H.pack(self.first, self.code, mid) + token + self.tail


def encode_request(
    path: Sequence[str],
    *,
    confirmable: bool = True,
    code: int = GET,
    token_len: int = 2,
    query: Sequence[str] = (),
    options: Iterable[tuple[int, bytes]] = (),
    payload: bytes = b"",
) -> RequestTemplate:
    """A template for ``code`` on ``path`` (segments, each one Uri-Path option)."""
    if not 0 <= token_len <= 8:
        raise ValueError("a token is 0-8 bytes")
    opts = [(OPT_URI_PATH, s.encode()) for s in path] + [(OPT_URI_QUERY, q.encode()) for q in query]
    opts += list(options)
    tail = encode_options(opts) + (bytes((PAYLOAD_MARKER,)) + payload if payload else b"")
    mtype = CON if confirmable else NON
    return RequestTemplate(VERSION << 6 | mtype << 4 | token_len, code, tail)


def parse_header(data: bytes) -> tuple[int, int, int, bytes] | None:
    """(type, code, message id, token) of a datagram, or None when it is not CoAP version 1."""
    if len(data) < 4:
        return None
    first = data[0]
    tkl = first & 0x0F
    if first >> 6 != VERSION or tkl > 8 or len(data) < 4 + tkl:
        return None
    return (first >> 4) & 3, data[1], (data[2] << 8) | data[3], data[4 : 4 + tkl]


def parse_options(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(options, payload) of a whole datagram; ValueError on a malformed one."""
    pos = 4 + (data[0] & 0x0F)
    number = 0
    opts: list[tuple[int, bytes]] = []
    while pos < len(data):
        b = data[pos]
        pos += 1
        if b == PAYLOAD_MARKER:
            return opts, data[pos:]
        delta, length = b >> 4, b & 0x0F
        vals = []
        for n in (delta, length):
            if n == 13:
                n = data[pos] + 13
                pos += 1
            elif n == 14:
                n = (data[pos] << 8 | data[pos + 1]) + 269
                pos += 2
            elif n == 15:
                raise ValueError("reserved option nibble 15")
            vals.append(n)
        number += vals[0]
        if pos + vals[1] > len(data):
            raise ValueError("option runs past the end of the datagram")
        opts.append((number, data[pos : pos + vals[1]]))
        pos += vals[1]
    return opts, b""
