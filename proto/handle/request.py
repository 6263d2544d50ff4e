"""Resolution requests (opcode 1): what a client sends, and how a node reads it.

Body of OC_RESOLUTION: the handle, then the index list, then the type list (both empty = every value).
:func:`encode_request` lays a request out as ``hdl-qresolver`` 7.3.1 does (the captures in
``tests/vectors/handle-native`` are reproduced byte for byte); :func:`decode_request` is the node's side.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from proto.handle.envelope import Message
from proto.handle.errors import HandleFormatError
from proto.handle.numbers import (
    CREDENTIAL_LENGTH_SIZE,
    DEFAULT_EXPIRATION,
    DEFAULT_REQUEST_FLAGS,
    HEADER_SIZE,
    MAX_LIST,
    MAX_MESSAGE_SIZE,
    OC_RESOLUTION,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    RC_RESERVED,
    SITE_INFO_SERIAL_UNKNOWN,
    ResponseCode,
)
from proto.handle.wire import ENVELOPE, HEADER, MIN_TYPE, U32_MASK, Reader, blob, pack, u32

__all__ = ["ResolutionRequest", "decode_request", "encode_request"]

_OC_RESOLUTION = int(OC_RESOLUTION)
_EMPTY_LISTS = bytes(8)  # an empty index list and an empty type list


@dataclass(frozen=True, slots=True)
class ResolutionRequest:
    """Body of OC_RESOLUTION: handle, then the index list, then the type list (both empty = everything)."""

    handle: bytes
    types: tuple[bytes, ...] = ()
    indexes: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.handle.decode("utf-8", "replace")

    def encode_body(self) -> bytes:
        out = [blob(self.handle), u32(len(self.indexes))]
        out.extend(u32(i) for i in self.indexes)
        out.append(u32(len(self.types)))
        out.extend(blob(t) for t in self.types)
        return b"".join(out)


def _as_bytes(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else bytes(s)


def encode_request(
    handle: str | bytes,
    *,
    request_id: int,
    types: Iterable[str | bytes] = (),
    indexes: Iterable[int] = (),
    session_id: int = 0,
    expiration: int | None = None,
    op_flags: int = DEFAULT_REQUEST_FLAGS,
    version: tuple[int, int] = (PROTOCOL_MAJOR, PROTOCOL_MINOR),
    site_info_serial: int = SITE_INFO_SERIAL_UNKNOWN,
    recursion_count: int = 0,
) -> bytes:
    """A resolution request as ``hdl-qresolver`` sends it: version 2.5, REC|CA|PO, serial 0xffff, expiration
    now + 12 h (Unix seconds), no credential. Returns the TCP form, which is also the single UDP datagram.
    A field out of range (a request id of 2**32, a huge handle) is a ValueError."""
    name = _as_bytes(handle)
    if types == () and indexes == ():  # the usual request: no filters
        body = blob(name) + _EMPTY_LISTS
    else:
        body = ResolutionRequest(name, tuple(_as_bytes(t) for t in types), tuple(indexes)).encode_body()
    if expiration is None:
        expiration = int(time.time()) + DEFAULT_EXPIRATION
    length = HEADER_SIZE + len(body) + CREDENTIAL_LENGTH_SIZE
    if length > MAX_MESSAGE_SIZE:
        raise ValueError(f"message of {length} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")
    return (
        pack(ENVELOPE, version[0], version[1], 0, session_id, request_id, 0, length)
        + pack(
            HEADER,
            _OC_RESOLUTION,
            RC_RESERVED,
            op_flags,
            site_info_serial,
            recursion_count,
            0,
            expiration & U32_MASK,
            len(body),
        )
        + body
        + b"\0\0\0\0"  # no credential
    )


def decode_request(msg: Message) -> ResolutionRequest:
    """The resolution request in ``msg`` (node side). Other opcodes raise HandleFormatError: check
    ``msg.header.opcode`` first to answer them with RC_OPERATION_DENIED."""
    h = msg.header
    if not h.is_request:
        raise HandleFormatError(
            f"expected a request, got response code {ResponseCode.describe(h.response_code)}"
        )
    if h.opcode != OC_RESOLUTION:
        raise HandleFormatError(f"unsupported request opcode {h.opcode} (only resolution, 1)")
    r = Reader(msg.body, "resolution request")
    handle = r.blob("handle")
    try:
        handle.decode("utf-8")
    except UnicodeDecodeError:
        raise HandleFormatError("resolution request: handle is not UTF-8") from None
    n = r.count("index count", MAX_LIST, 4)
    indexes = tuple(r.u32(f"index {i}") for i in range(n))
    n = r.count("type count", MAX_LIST, MIN_TYPE)
    types = tuple(r.blob(f"type {i}") for i in range(n))
    return ResolutionRequest(handle, types, indexes)
