"""The node's side of the Handle native protocol (sans-I/O): request bytes in, answer bytes out.

Built on :mod:`proto.handle` (the same codec the gateway's client uses). What the node answers,
following the captured HANDLE.NET 7.3.1 server (``tests/vectors/handle-native``):

* a resolution (opcode 1): the answer echoes the request's version, session id, request id, opcode,
  recursion count and expiration; op flags AT | REC | the request's CA and PO bits; site-info serial 1;
  no credential. Found: RC_SUCCESS with the public values (see :meth:`RecordStore.resolve`);
  not found (100) and values not found (200): an empty error text; 301 / 102 carry a short text.
* SESSION_SETUP, CHALLENGE_RESPONSE and the administration requests (create, delete, add, remove, modify):
  :class:`tools.harness.node.admin.AdminSide` when the node has one;
* any other opcode: RC_OPERATION_NOT_SUPPORTED (5) "operation N not supported".
* a message whose envelope parses but whose header or body does not: RC_PROTOCOL_ERROR (4) with the
  parser's text, if at least the 24-byte header is there (else it is dropped).
* a response (response code not 0) or bytes without a valid envelope: dropped, never answered.

The node does not check the request's expiration time (replaying a captured request must keep working).
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.handle import (
    ErrorResponse,
    HandleFormatError,
    Message,
    ResolutionResponse,
    decode_head,
    decode_message,
    decode_request,
    encode_response,
)
from proto.handle.numbers import (
    OC_RESOLUTION,
    RC_ERROR,
    RC_PROTOCOL_ERROR,
    RC_SUCCESS,
    ResponseCode,
)
from tools.harness.node.admin import NODE_OPCODES, AdminSide
from tools.harness.node.store import RecordStore

__all__ = ["Incoming", "Outgoing", "NotARequest", "read_request", "answer", "error_answer"]

RC_OPERATION_NOT_SUPPORTED = ResponseCode.OPERATION_NOT_SUPPORTED


class NotARequest(HandleFormatError):
    """Bytes the node drops without answering (no valid envelope, too short, or a response)."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """One request message. ``error`` is set when its header or body does not parse (answered 4)."""

    message: Message
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One answer: the encoded message (TCP form), its response code, handle and number of values."""

    data: bytes
    code: int
    handle: str = ""
    values: int = 0


def read_request(data: bytes) -> Incoming:
    """Parse one complete request message (a datagram, a reassembled message or a TCP frame).

    Raises :class:`NotARequest` for what must be dropped."""
    try:
        msg = decode_message(data)
    except HandleFormatError as e:
        return Incoming(_salvage(data, str(e)), str(e))
    if not msg.header.is_request:
        raise NotARequest(f"not a request: response code {ResponseCode.describe(msg.header.response_code)}")
    return Incoming(msg)


def _salvage(data: bytes, why: str) -> Message:
    """Enough of a broken request (envelope + header fields) to address an error answer to it."""
    try:
        head = decode_head(data)
    except HandleFormatError as e:
        raise NotARequest(f"{why} (cannot answer: {e})") from None
    if not head.header.is_request:
        raise NotARequest(f"not a request: response code {ResponseCode.describe(head.header.response_code)}")
    return head


def error_answer(request: Message, code: int, text: str = "") -> Outgoing:
    """An error response with ``code`` and ``text`` to ``request``."""
    return Outgoing(encode_response(request, ErrorResponse(code, text)), code)


def answer(store: RecordStore, incoming: Incoming, admin: AdminSide | None = None) -> Outgoing:
    """The node's answer to one request (see the module docstring for the rules)."""
    msg = incoming.message
    if incoming.error is not None:
        return error_answer(msg, RC_PROTOCOL_ERROR, incoming.error)
    if admin is not None and msg.header.opcode in NODE_OPCODES:
        data, code, handle = admin.answer(msg)
        return Outgoing(data, code, handle)
    if msg.header.opcode != OC_RESOLUTION:
        return error_answer(msg, RC_OPERATION_NOT_SUPPORTED, f"operation {msg.header.opcode} not supported")
    try:
        req = decode_request(msg)
    except HandleFormatError as e:
        return error_answer(msg, RC_PROTOCOL_ERROR, str(e))
    handle = req.handle.decode("utf-8")  # decode_request checked it
    types = [t.decode("utf-8", "replace") for t in req.types]
    look = store.resolve(handle, types, req.indexes)
    if look.code != RC_SUCCESS:
        out = error_answer(msg, look.code, look.message)
        return Outgoing(out.data, out.code, handle)
    try:
        data = encode_response(msg, ResolutionResponse(handle, look.values))
    except ValueError as e:  # a record too large for one message
        out = error_answer(msg, RC_ERROR, f"answer cannot be encoded: {e}")
        return Outgoing(out.data, out.code, handle)
    return Outgoing(data, RC_SUCCESS, handle, len(look.values))
