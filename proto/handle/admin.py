"""Administration requests (RFC 3652 section 3.7) and their answers, laid out as HANDLE.NET 7.3.1 lays them out.

Bodies (``tests/vectors/handle-admin`` holds each, captured from CNRI's ``hdl-genericbatch``)::

    CREATE_HANDLE 100, ADD_VALUE 102, MODIFY_VALUE 104:  handle, value count, values
    REMOVE_VALUE 103:                                     handle, index count, indexes
    DELETE_HANDLE 101:                                    handle

Header as the CNRI tools send it: version 2.5, op flags REC | CA | PO (0x19000000), site-info serial 0xffff,
expiration now + 12 h. The answer to a successful operation is a bare message (response code 1, empty body;
a create whose suffix the server minted may name the handle). :func:`new_request` builds any request
:class:`Message` (also SESSION_SETUP and CHALLENGE_RESPONSE); the credential, when there is one, is added by
:mod:`proto.handle.session`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from proto.handle.envelope import Envelope, Header, Message, encode_message
from proto.handle.errors import HandleFormatError
from proto.handle.numbers import (
    DEFAULT_EXPIRATION,
    DEFAULT_REQUEST_FLAGS,
    MAX_LIST,
    OC_ADD_VALUE,
    OC_CREATE_HANDLE,
    OC_DELETE_HANDLE,
    OC_MODIFY_VALUE,
    OC_REMOVE_VALUE,
    OPF_RD,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    RC_SUCCESS,
    SITE_INFO_SERIAL_UNKNOWN,
    ResponseCode,
)
from proto.handle.response import (
    ErrorResponse,
    answer_flags,
    decode_response,
    encode_response,
    skip_request_digest,
)
from proto.handle.values import encode_value, read_values
from proto.handle.wire import U32_MASK, Reader, blob, u32
from proto.records import HandleValue

__all__ = [
    "ADMIN_OPCODES",
    "AdminRequest",
    "AdminResponse",
    "decode_admin_request",
    "decode_admin_response",
    "encode_admin_answer",
    "new_request",
]

ADMIN_OPCODES = frozenset(
    int(c) for c in (OC_CREATE_HANDLE, OC_DELETE_HANDLE, OC_ADD_VALUE, OC_REMOVE_VALUE, OC_MODIFY_VALUE)
)
_WITH_VALUES = frozenset(int(c) for c in (OC_CREATE_HANDLE, OC_ADD_VALUE, OC_MODIFY_VALUE))


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """One administration request: ``values`` for create / add / modify, ``indexes`` for remove."""

    opcode: int
    handle: str
    values: tuple[HandleValue, ...] = ()
    indexes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.opcode not in ADMIN_OPCODES:
            raise ValueError(f"opcode {self.opcode} is not an administration request")

    def encode_body(self) -> bytes:
        out = [blob(self.handle.encode())]
        if self.opcode in _WITH_VALUES:
            out.append(u32(len(self.values)))
            out.extend(encode_value(v) for v in self.values)
        elif self.opcode == OC_REMOVE_VALUE:
            out.append(u32(len(self.indexes)))
            out.extend(u32(i) for i in self.indexes)
        return b"".join(out)


def new_request(
    opcode: int,
    body: bytes,
    *,
    request_id: int,
    session_id: int = 0,
    op_flags: int = DEFAULT_REQUEST_FLAGS,
    expiration: int | None = None,
    version: tuple[int, int] = (PROTOCOL_MAJOR, PROTOCOL_MINOR),
    site_info_serial: int = SITE_INFO_SERIAL_UNKNOWN,
) -> Message:
    """A request message as the CNRI tools build one (no credential yet; ``.encode()`` for the bytes)."""
    if expiration is None:
        expiration = int(time.time()) + DEFAULT_EXPIRATION
    env = Envelope(version[0], version[1], 0, session_id, request_id)
    header = Header(int(opcode), 0, int(op_flags), site_info_serial, 0, expiration & U32_MASK, len(body))
    return Message(env, header, body)


def decode_admin_request(msg: Message) -> AdminRequest:
    """The administration request in ``msg`` (node side); HandleFormatError if the body does not parse."""
    h = msg.header
    if h.opcode not in ADMIN_OPCODES:
        raise HandleFormatError(f"opcode {h.opcode} is not an administration request")
    r = Reader(msg.body, "admin request")
    handle = r.text("handle")
    values: tuple[HandleValue, ...] = ()
    indexes: tuple[int, ...] = ()
    if h.opcode in _WITH_VALUES:
        values = read_values(r)
    elif h.opcode == OC_REMOVE_VALUE:
        n = r.count("index count", MAX_LIST, 4)
        indexes = tuple(r.u32(f"index {i}") for i in range(n))
    if r.remaining():
        raise HandleFormatError(f"admin request: {r.remaining()} bytes after the body")
    return AdminRequest(h.opcode, handle, values, indexes)


@dataclass(frozen=True, slots=True)
class AdminResponse:
    """What the node answered to an administration request: its code, its error text, and for a create
    whose suffix the node minted, the handle."""

    code: int
    message: str = ""
    handle: str = ""

    @property
    def ok(self) -> bool:
        return self.code == RC_SUCCESS

    @property
    def name(self) -> str:
        return ResponseCode.describe(self.code)


def decode_admin_response(msg: Message) -> AdminResponse:
    """The answer to an administration request (client side). A 402 challenge is read with
    :func:`proto.handle.challenge.decode_challenge` instead."""
    h = msg.header
    if h.is_request or h.response_code != RC_SUCCESS:
        error = decode_response(msg)  # a request, or an error text (after any request digest)
        assert isinstance(error, ErrorResponse)
        return AdminResponse(error.code, error.message)
    r = Reader(msg.body, "admin response")
    if h.op_flags & OPF_RD:
        skip_request_digest(r)
    return AdminResponse(RC_SUCCESS, "", r.text("handle") if r.remaining() else "")


def encode_admin_answer(
    request: Message, code: int, text: str = "", *, request_id: int | None = None, site_info_serial: int = 1
) -> bytes:
    """The node's answer to an administration request: a bare message for success (as the captured server
    sends it), else the code with ``text``. ``request_id`` answers under another request id (the answer to
    a CHALLENGE_RESPONSE is the answer to the original request, with the challenge response's id)."""
    if request_id is not None:
        env = request.envelope
        request = Message(
            Envelope(env.major, env.minor, 0, env.session_id, request_id), request.header, request.body
        )
    if code != RC_SUCCESS:
        return encode_response(request, ErrorResponse(code, text), site_info_serial=site_info_serial)
    e, h = request.envelope, request.header
    header = Header(
        h.opcode, RC_SUCCESS, answer_flags(h), site_info_serial, h.recursion_count, h.expiration, 0
    )
    return encode_message(Envelope(e.major, e.minor, 0, e.session_id, e.request_id), header, b"")
