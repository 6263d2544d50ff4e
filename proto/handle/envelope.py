"""One Handle message: the 20-byte envelope, the 24-byte header, the body and the credential.

Wire layout (big-endian)::

    envelope  20 B  major(1) minor(1) flags(2) session_id(4) request_id(4) sequence(4) message_length(4)
    header    24 B  opcode(4) response_code(4) op_flags(4) site_info_serial(2) recursion_count(1)
                    reserved(1) expiration(4) body_length(4)
    body            body_length bytes
    credential      length(4) + bytes; length 0 = unsigned (the length word may be absent in old peers)

``message_length`` counts header + body + credential. Over TCP a message is one envelope followed by the
whole message; over UDP a long message comes in pieces (:mod:`proto.handle.framing`). What the body holds
is read by :mod:`proto.handle.request` and :mod:`proto.handle.response`.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.handle.errors import HandleFormatError
from proto.handle.numbers import (
    CREDENTIAL_LENGTH_SIZE,
    ENV_CP,
    ENV_EC,
    ENV_SUGGEST_MAJOR_MASK,
    ENV_SUGGEST_MINOR_MASK,
    ENV_TC,
    ENVELOPE_SIZE,
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_UDP_PAYLOAD,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    RC_RESERVED,
    SITE_INFO_SERIAL_UNKNOWN,
)
from proto.handle.wire import ENVELOPE, HEADER, U32, Reader, pack

__all__ = [
    "Envelope",
    "Header",
    "Message",
    "decode_envelope",
    "decode_head",
    "decode_message",
    "encode_message",
    "peek_envelope",
]


@dataclass(frozen=True, slots=True)
class Envelope:
    """The 20-byte message envelope. ``flags`` is the 16-bit MessageFlag (CP/EC/TC + suggested version)."""

    major: int = PROTOCOL_MAJOR
    minor: int = PROTOCOL_MINOR
    flags: int = 0
    session_id: int = 0
    request_id: int = 0
    sequence: int = 0
    message_length: int = 0

    @property
    def compressed(self) -> bool:
        return bool(self.flags & ENV_CP)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & ENV_EC)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & ENV_TC)

    @property
    def suggested_version(self) -> tuple[int, int] | None:
        """The version a HANDLE.NET peer would rather speak, None when it suggests none."""
        major = (self.flags & ENV_SUGGEST_MAJOR_MASK) >> 8
        if major == 0:
            return None
        return major, self.flags & ENV_SUGGEST_MINOR_MASK

    def encode(self) -> bytes:
        e = self
        return pack(
            ENVELOPE, e.major, e.minor, e.flags, e.session_id, e.request_id, e.sequence, e.message_length
        )


def decode_envelope(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Envelope:
    """The envelope at the start of ``data`` (a datagram or a TCP stream), checked for version and size."""
    if len(data) < ENVELOPE_SIZE:
        raise HandleFormatError(f"envelope truncated: {len(data)} bytes, need {ENVELOPE_SIZE}")
    env = Envelope(*ENVELOPE.unpack_from(data, 0))
    if env.major != PROTOCOL_MAJOR:
        raise HandleFormatError(
            f"unsupported protocol version {env.major}.{env.minor} (expected {PROTOCOL_MAJOR}.x)"
        )
    if env.message_length > max_size:
        raise HandleFormatError(f"message length {env.message_length} exceeds the limit of {max_size} bytes")
    return env


def peek_envelope(data: bytes, max_size: int) -> tuple[int, int, int, int] | None:
    """``(flags, request_id, sequence, message_length)`` of the envelope :func:`decode_envelope` would accept,
    None where it would raise (say why with :func:`decode_envelope`). For a datagram receiver's hot path: no
    object, no exception."""
    if len(data) < ENVELOPE_SIZE:
        return None
    major, _minor, flags, _session, rid, seq, length = ENVELOPE.unpack_from(data, 0)
    if major != PROTOCOL_MAJOR or length > max_size:
        return None
    return flags, rid, seq, length


@dataclass(frozen=True, slots=True)
class Header:
    """The 24-byte message header."""

    opcode: int
    response_code: int = RC_RESERVED
    op_flags: int = 0
    site_info_serial: int = SITE_INFO_SERIAL_UNKNOWN
    recursion_count: int = 0
    expiration: int = 0
    body_length: int = 0

    @property
    def is_request(self) -> bool:
        return self.response_code == RC_RESERVED

    def encode(self) -> bytes:
        return pack(
            HEADER,
            self.opcode,
            self.response_code,
            self.op_flags,
            self.site_info_serial,
            self.recursion_count,
            0,
            self.expiration,
            self.body_length,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One whole message: envelope, header, body and credential (empty = unsigned).

    ``encode()`` gives the TCP form (envelope + message) with the body and message lengths recomputed;
    a message of at most 512 bytes is also exactly one UDP datagram.
    """

    envelope: Envelope
    header: Header
    body: bytes = b""
    credential: bytes = b""

    def encode(self) -> bytes:
        return encode_message(self.envelope, self.header, self.body, self.credential)

    def head_and_body(self) -> bytes:
        """The header (with its body length) and the body: what a request digest, an HS_SIGNED signature and
        an HS_MAC cover (HANDLE.NET's ``getEncodedMessageBody``)."""
        return _header(self.header, len(self.body)) + self.body


def _header(h: Header, body_length: int) -> bytes:
    return pack(
        HEADER,
        h.opcode,
        h.response_code,
        h.op_flags,
        h.site_info_serial,
        h.recursion_count,
        0,
        h.expiration,
        body_length,
    )


def encode_message(envelope: Envelope, header: Header, body: bytes, credential: bytes = b"") -> bytes:
    """Envelope + header + body + credential, with ``body_length`` and ``message_length`` filled in."""
    length = HEADER_SIZE + len(body) + CREDENTIAL_LENGTH_SIZE + len(credential)
    if length > MAX_MESSAGE_SIZE:
        raise ValueError(f"message of {length} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")
    e = envelope
    return (
        pack(ENVELOPE, e.major, e.minor, e.flags, e.session_id, e.request_id, e.sequence, length)
        + _header(header, len(body))
        + body
        + U32.pack(len(credential))
        + credential
    )


def decode_message(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Message:
    """Parse one complete message (one UDP datagram, a reassembled message, or one TCP frame)."""
    env = decode_envelope(data, max_size=max_size)
    if env.compressed:
        raise HandleFormatError("compressed messages are not supported")
    if env.encrypted:
        raise HandleFormatError("encrypted messages are not supported (no session)")
    have = len(data) - ENVELOPE_SIZE
    if have < env.message_length:
        hint = " (one datagram of a larger message: reassemble first)" if have == MAX_UDP_PAYLOAD else ""
        raise HandleFormatError(
            f"message truncated: envelope announces {env.message_length} bytes, {have} present{hint}"
        )
    if have > env.message_length:
        raise HandleFormatError(
            f"{have - env.message_length} bytes after the announced message length {env.message_length}"
        )
    if env.message_length < HEADER_SIZE:
        raise HandleFormatError(
            f"message length {env.message_length} is shorter than the {HEADER_SIZE}-byte header"
        )
    opcode, code, flags, serial, recursion, _reserved, expiration, body_length = HEADER.unpack_from(
        data, ENVELOPE_SIZE
    )
    header = Header(opcode, code, flags, serial, recursion, expiration, body_length)
    start = ENVELOPE_SIZE + HEADER_SIZE
    after_body = len(data) - start - header.body_length
    if after_body < 0:
        raise HandleFormatError(
            f"body length {header.body_length} exceeds the {len(data) - start} bytes left in the message"
        )
    body = bytes(data[start : start + header.body_length])
    credential = b""
    if after_body:
        r = Reader(data, "credential", start + header.body_length)
        n = r.u32("credential length")
        if n != r.remaining():
            raise HandleFormatError(
                f"credential length {n} does not match the {r.remaining()} bytes left in the message"
            )
        credential = r.raw(n, "credential")
    return Message(env, header, body, credential)


def decode_head(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Message:
    """The envelope and header of a message whose lengths or body may not parse (body and credential left
    empty): enough to address an error answer to a broken request. Raises HandleFormatError when even the
    envelope does not parse or the 24-byte header is not all there."""
    env = decode_envelope(data, max_size=max_size)
    if len(data) < ENVELOPE_SIZE + HEADER_SIZE:
        raise HandleFormatError(f"{len(data)} bytes: no complete {HEADER_SIZE}-byte header")
    opcode, code, flags, serial, recursion, _reserved, expiration, _length = HEADER.unpack_from(
        data, ENVELOPE_SIZE
    )
    return Message(env, Header(opcode, code, flags, serial, recursion, expiration, 0))
