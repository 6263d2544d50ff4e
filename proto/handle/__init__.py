"""Handle System native protocol (RFC 3652) as spoken by deployed HANDLE.NET servers, sans-I/O.

Bytes in, messages out, and back; no sockets, no clock (except the requests' default expiration), nothing
else of ours but :mod:`proto.records` (keys and signatures use the ``cryptography`` package). Both sides are here: a client encodes requests
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
* ``admin``     -- administration requests (create, delete, add, remove, modify) and their answers
* ``challenge`` -- the 402 challenge, the request digest and the CHALLENGE_RESPONSE (op 200)
* ``session``   -- SESSION_SETUP (op 400), the session key, the HS_MAC credential, what HS_SIGNED signs
* ``credential``-- the credential after a message's body (HS_SIGNED, HS_MAC)
* ``keys``      -- HANDLE.NET key files and key encodings (DSA, RSA, DH); signing with ``cryptography``
* ``wire``      -- struct layouts and the bounded reader the others share (internal)

The names below are the public surface; import them from ``proto.handle``.
"""

from proto.handle.admin import (
    ADMIN_OPCODES,
    AdminRequest,
    AdminResponse,
    decode_admin_request,
    decode_admin_response,
    encode_admin_answer,
    new_request,
)
from proto.handle.answer import decode_answer
from proto.handle.challenge import (
    Challenge,
    ChallengeAnswer,
    decode_challenge,
    decode_challenge_answer,
    encode_challenge,
    request_digest,
)
from proto.handle.credential import Credential, decode_credential
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
from proto.handle.session import (
    SessionSetup,
    SessionSetupAnswer,
    decode_session_setup,
    decode_session_setup_answer,
    mac_credential,
    session_key,
    session_mac,
    signed_bytes,
    verify_mac,
)
from proto.handle.values import decode_referral, decode_value, encode_value

__all__ = [
    "ADMIN_OPCODES",
    "AdminRequest",
    "AdminResponse",
    "Challenge",
    "ChallengeAnswer",
    "Credential",
    "SessionSetup",
    "SessionSetupAnswer",
    "decode_admin_request",
    "decode_admin_response",
    "decode_challenge",
    "decode_challenge_answer",
    "decode_credential",
    "decode_session_setup",
    "decode_session_setup_answer",
    "encode_admin_answer",
    "encode_challenge",
    "mac_credential",
    "new_request",
    "request_digest",
    "session_key",
    "session_mac",
    "signed_bytes",
    "verify_mac",
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
