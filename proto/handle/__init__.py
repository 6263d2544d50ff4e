"""Handle System native protocol (RFC 3652) as spoken by deployed HANDLE.NET servers, sans-I/O.

Bytes in, messages out, and back; no sockets, no clock (except :func:`encode_request`'s default
expiration), nothing else of ours but :mod:`proto.records`. Both sides are here: a client encodes requests
and reads answers, a node (``ida node``) reads requests and encodes answers. The codec reports what the bytes
say -- a message, its response code, its values, a referral's body -- and raises only
:class:`HandleFormatError` for bytes that do not parse; what an answer means for a resolution is
``gateway/upstream``'s call.

Modules, by job:

* ``numbers``   -- opcodes, response codes, flag bits, ports and size limits (the only place they live)
* ``errors``    -- :class:`HandleFormatError`
* ``envelope``  -- one message: the 20-byte envelope, the 24-byte header, body and credential
* ``framing``   -- UDP datagram splitting and reassembly, TCP stream framing
* ``values``    -- handle values on the wire, and a referral's body
* ``request``   -- resolution requests: encode (client) and decode (node)
* ``response``  -- responses: decode (client) and encode (node), incl. the TC "ask over TCP" datagram
* ``answer``    -- :func:`decode_answer`, the client's one-pass reading of the usual answer
* ``wire``      -- struct layouts and the bounded reader the others share (internal)

The names below are the public surface; import them from ``proto.handle``.
"""

from proto.handle.answer import decode_answer
from proto.handle.envelope import (
    Envelope,
    Header,
    Message,
    decode_envelope,
    decode_head,
    decode_message,
    encode_message,
    peek_envelope,
)
from proto.handle.errors import HandleFormatError
from proto.handle.framing import Reassembler, StreamFramer, split_datagrams
from proto.handle.request import ResolutionRequest, decode_request, encode_request
from proto.handle.response import (
    ErrorResponse,
    ResolutionResponse,
    Response,
    decode_response,
    encode_response,
    encode_truncated,
)
from proto.handle.values import decode_referral, decode_value, encode_value

__all__ = [
    "Envelope",
    "ErrorResponse",
    "HandleFormatError",
    "Header",
    "Message",
    "Reassembler",
    "ResolutionRequest",
    "ResolutionResponse",
    "Response",
    "StreamFramer",
    "decode_answer",
    "decode_envelope",
    "decode_head",
    "decode_message",
    "decode_referral",
    "decode_request",
    "decode_response",
    "decode_value",
    "encode_message",
    "encode_request",
    "encode_response",
    "encode_truncated",
    "encode_value",
    "peek_envelope",
    "split_datagrams",
]
