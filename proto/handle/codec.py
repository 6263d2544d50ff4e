"""Sans-I/O codec of the Handle native protocol (RFC 3652, as deployed by HANDLE.NET 7.x).

No sockets, no asyncio: bytes in, values out, and back. Both sides are here: the client encodes requests
and decodes responses, the recursive-node simulator (``ida node``) decodes requests and encodes responses.

Wire layout (big-endian)::

    envelope  20 B  major(1) minor(1) flags(2) session_id(4) request_id(4) sequence(4) message_length(4)
    header    24 B  opcode(4) response_code(4) op_flags(4) site_info_serial(2) recursion_count(1)
                    reserved(1) expiration(4) body_length(4)
    body            body_length bytes
    credential      length(4) + bytes; length 0 = unsigned (the length word may be absent in old peers)

``message_length`` counts header + body + credential. Over TCP a message is one envelope followed by the
whole message. Over UDP a message longer than 492 bytes is cut into 492-byte pieces, each behind its own
envelope with the same request id, sequence numbers 0, 1, 2, ... and the *total* message length
(:func:`split_datagrams`, :class:`Reassembler`).

Value layout: index(4) timestamp(4) ttl_type(1) ttl(4) permissions(1) type(len4+bytes) data(len4+bytes)
references(count4, each handle(len4+bytes) index(4)). The timestamp is 4 bytes in the deployed
implementation (the captures in ``tests/vectors/handle-native`` show it).

Every decoder checks each length against the bytes that remain and against the caps in
:mod:`proto.handle.numbers`; input that does not parse raises :class:`gateway.errors.ProtocolError`
and nothing else.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from gateway.errors import ProtocolError, UpstreamBusy, UpstreamReferral, UpstreamRefused
from proto.handle.numbers import (
    CREDENTIAL_LENGTH_SIZE,
    DEFAULT_EXPIRATION,
    DEFAULT_REQUEST_FLAGS,
    DIGEST_MD5_OLD_FORMAT,
    DIGEST_SIZES,
    ENV_CP,
    ENV_EC,
    ENV_SUGGEST_MAJOR_MASK,
    ENV_SUGGEST_MINOR_MASK,
    ENV_TC,
    ENVELOPE_SIZE,
    HEADER_SIZE,
    MAX_FIELD_SIZE,
    MAX_LIST,
    MAX_MESSAGE_SIZE,
    MAX_UDP_DATAGRAM,
    MAX_UDP_MESSAGE_SIZE,
    MAX_UDP_PAYLOAD,
    MAX_VALUES,
    OC_RESOLUTION,
    OPF_AT,
    OPF_CA,
    OPF_PO,
    OPF_RD,
    OPF_REC,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    RC_AUTHEN_NEEDED,
    RC_RESERVED,
    RC_SERVER_BUSY,
    RC_SUCCESS,
    SITE_INFO_SERIAL_UNKNOWN,
    ResponseCode,
)
from proto.records import HandleValue, Record

__all__ = [
    "Envelope",
    "Header",
    "Message",
    "ResolutionRequest",
    "ResolutionResponse",
    "ErrorResponse",
    "ResolveResult",
    "Reassembler",
    "StreamFramer",
    "decode_answer",
    "decode_envelope",
    "decode_message",
    "decode_request",
    "decode_response",
    "decode_referral",
    "decode_value",
    "encode_message",
    "encode_request",
    "encode_response",
    "encode_truncated",
    "encode_value",
    "split_datagrams",
    "to_result",
]

_ENVELOPE = struct.Struct(">BBHIIII")
_HEADER = struct.Struct(">IIIHBBII")
_VALUE_FIXED = struct.Struct(">IIBIB")  # index, timestamp, ttl_type, ttl, permissions
_U32 = struct.Struct(">I")
_U32_MASK = 0xFFFFFFFF

# Smallest encodings, used to reject counts that cannot fit in the bytes that remain.
_MIN_VALUE = _VALUE_FIXED.size + 4 + 4 + 4  # fixed part, empty type, empty data, no references
_MIN_REFERENCE = 4 + 4
_MIN_TYPE = 4

# Plain ints of the flags the hot paths test (an IntFlag's ``&`` runs Python code in enum).
_CP_EC = int(ENV_CP | ENV_EC)
_TC = int(ENV_TC)
_RD = int(OPF_RD)
_OC_RESOLUTION = int(OC_RESOLUTION)
_RC_SUCCESS = int(RC_SUCCESS)
_VALUE_HEAD = struct.Struct(">IIBIBI")  # the fixed part of a value and the length of its type
_EMPTY_LISTS = bytes(8)  # an empty index list and an empty type list

assert _ENVELOPE.size == ENVELOPE_SIZE and _HEADER.size == HEADER_SIZE


# ------------------------------------------------------------------------------------------------------
# bounded reader
# ------------------------------------------------------------------------------------------------------
class _Reader:
    """Cursor over ``buf[pos:end]``; every read is checked, every failure is a ProtocolError."""

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
            raise ProtocolError(
                f"{self.what}: truncated at {field}: needs {n} bytes at offset {self.pos}, {self.end - self.pos} left"
            )

    def u8(self, field: str) -> int:
        self._need(1, field)
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def u32(self, field: str) -> int:
        self._need(4, field)
        (v,) = _U32.unpack_from(self.buf, self.pos)
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
            raise ProtocolError(f"{self.what}: {field} length {n} exceeds the limit of {cap} bytes")
        return self.raw(n, field)

    def text(self, field: str) -> str:
        b = self.blob(field)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: {field} is not UTF-8") from None

    def count(self, field: str, cap: int, min_item: int) -> int:
        n = self.u32(field)
        if n > cap:
            raise ProtocolError(f"{self.what}: {field} {n} exceeds the limit of {cap}")
        if n * min_item > self.end - self.pos:
            raise ProtocolError(
                f"{self.what}: {field} {n} cannot fit in the {self.end - self.pos} bytes left"
            )
        return n


def _pack(st: struct.Struct, *args: int) -> bytes:
    try:
        return st.pack(*args)
    except struct.error as e:
        raise ValueError(f"field out of range: {e}") from None


def _u32(v: int) -> bytes:
    return _pack(_U32, v)


def _blob(b: bytes) -> bytes:
    if len(b) > MAX_FIELD_SIZE:
        raise ValueError(f"field of {len(b)} bytes exceeds the limit of {MAX_FIELD_SIZE}")
    return _U32.pack(len(b)) + b


# ------------------------------------------------------------------------------------------------------
# envelope, header, message
# ------------------------------------------------------------------------------------------------------
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
        return _pack(
            _ENVELOPE,
            self.major,
            self.minor,
            self.flags,
            self.session_id,
            self.request_id,
            self.sequence,
            self.message_length,
        )


def decode_envelope(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Envelope:
    """The envelope at the start of ``data`` (a datagram or a TCP stream), checked for version and size."""
    if len(data) < ENVELOPE_SIZE:
        raise ProtocolError(f"envelope truncated: {len(data)} bytes, need {ENVELOPE_SIZE}")
    env = Envelope(*_ENVELOPE.unpack_from(data, 0))
    if env.major != PROTOCOL_MAJOR:
        raise ProtocolError(
            f"unsupported protocol version {env.major}.{env.minor} (expected {PROTOCOL_MAJOR}.x)"
        )
    if env.message_length > max_size:
        raise ProtocolError(f"message length {env.message_length} exceeds the limit of {max_size} bytes")
    return env


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
        return _pack(
            _HEADER,
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


def encode_message(envelope: Envelope, header: Header, body: bytes, credential: bytes = b"") -> bytes:
    """Envelope + header + body + credential, with ``body_length`` and ``message_length`` filled in."""
    length = HEADER_SIZE + len(body) + CREDENTIAL_LENGTH_SIZE + len(credential)
    if length > MAX_MESSAGE_SIZE:
        raise ValueError(f"message of {length} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")
    e, h = envelope, header
    return (
        _pack(_ENVELOPE, e.major, e.minor, e.flags, e.session_id, e.request_id, e.sequence, length)
        + _pack(
            _HEADER,
            h.opcode,
            h.response_code,
            h.op_flags,
            h.site_info_serial,
            h.recursion_count,
            0,
            h.expiration,
            len(body),
        )
        + body
        + _U32.pack(len(credential))
        + credential
    )


def decode_message(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Message:
    """Parse one complete message (one UDP datagram, a reassembled message, or one TCP frame)."""
    env = decode_envelope(data, max_size=max_size)
    if env.compressed:
        raise ProtocolError("compressed messages are not supported")
    if env.encrypted:
        raise ProtocolError("encrypted messages are not supported (no session)")
    have = len(data) - ENVELOPE_SIZE
    if have < env.message_length:
        hint = " (one datagram of a larger message: reassemble first)" if have == MAX_UDP_PAYLOAD else ""
        raise ProtocolError(
            f"message truncated: envelope announces {env.message_length} bytes, {have} present{hint}"
        )
    if have > env.message_length:
        raise ProtocolError(
            f"{have - env.message_length} bytes after the announced message length {env.message_length}"
        )
    if env.message_length < HEADER_SIZE:
        raise ProtocolError(
            f"message length {env.message_length} is shorter than the {HEADER_SIZE}-byte header"
        )
    opcode, code, flags, serial, recursion, _reserved, expiration, body_length = _HEADER.unpack_from(
        data, ENVELOPE_SIZE
    )
    header = Header(opcode, code, flags, serial, recursion, expiration, body_length)
    start = ENVELOPE_SIZE + HEADER_SIZE
    after_body = len(data) - start - header.body_length
    if after_body < 0:
        raise ProtocolError(
            f"body length {header.body_length} exceeds the {len(data) - start} bytes left in the message"
        )
    body = bytes(data[start : start + header.body_length])
    credential = b""
    if after_body:
        r = _Reader(data, "credential", start + header.body_length)
        n = r.u32("credential length")
        if n != r.remaining():
            raise ProtocolError(
                f"credential length {n} does not match the {r.remaining()} bytes left in the message"
            )
        credential = r.raw(n, "credential")
    return Message(env, header, body, credential)


# ------------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------------
def encode_value(v: HandleValue) -> bytes:
    """One handle value in the wire layout (TTL and timestamp as unsigned 32-bit, negative TTLs wrap)."""
    out = [
        _pack(_VALUE_FIXED, v.index, v.timestamp & _U32_MASK, v.ttl_type, v.ttl & _U32_MASK, v.permissions),
        _blob(v.type.encode()),
        _blob(v.data),
        _u32(len(v.references)),
    ]
    for handle, index in v.references:
        out.append(_blob(handle.encode()))
        out.append(_u32(index))
    return b"".join(out)


def _read_value(r: _Reader, i: int) -> HandleValue:
    index, timestamp, ttl_type, ttl, permissions = r.unpack(_VALUE_FIXED, f"value {i}")
    vtype = r.text(f"value {i} type")
    data = r.blob(f"value {i} data")
    nref = r.count(f"value {i} reference count", MAX_LIST, _MIN_REFERENCE)
    refs = tuple(
        (r.text(f"value {i} reference {j} handle"), r.u32(f"value {i} reference {j} index"))
        for j in range(nref)
    )
    return HandleValue(
        index=index,
        type=vtype,
        data=data,
        ttl=ttl,
        ttl_type=ttl_type,
        timestamp=timestamp,
        permissions=permissions,
        references=refs,
    )


def decode_value(data: bytes) -> HandleValue:
    """Parse exactly one encoded value."""
    r = _Reader(data, "value")
    v = _read_value(r, 0)
    if r.remaining():
        raise ProtocolError(f"value: {r.remaining()} bytes after the value")
    return v


def _read_values(r: _Reader) -> tuple[HandleValue, ...]:
    n = r.count("value count", MAX_VALUES, _MIN_VALUE)
    return tuple(_read_value(r, i) for i in range(n))


# ------------------------------------------------------------------------------------------------------
# resolution request / response bodies
# ------------------------------------------------------------------------------------------------------
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
        out = [_blob(self.handle), _u32(len(self.indexes))]
        out.extend(_u32(i) for i in self.indexes)
        out.append(_u32(len(self.types)))
        out.extend(_blob(t) for t in self.types)
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class ResolutionResponse:
    """Body of a successful resolution: the handle and its values."""

    handle: str
    values: tuple[HandleValue, ...] = ()

    def record(self) -> Record:
        return Record(self.handle, self.values)


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """Any response that is not RC_SUCCESS.

    ``message`` is the server's error text (``""`` when it sent none). ``data`` is the raw body, after any
    request digest, for responses whose body is not an error text: referrals (302, 303; see
    :func:`decode_referral`) and authentication challenges (402). It is empty otherwise.
    """

    code: int
    message: str = ""
    data: bytes = b""

    @property
    def name(self) -> str:
        return ResponseCode.describe(self.code)


@dataclass(frozen=True, slots=True)
class ResolveResult:
    """Outcome of a resolution that the node *answered*.

    ``code`` is RC_SUCCESS (1) with the values, or RC_HANDLE_NOT_FOUND (100) / RC_VALUES_NOT_FOUND (200)
    with no values: "not found" is an answer (cacheable, negative), not a failure. Every other response
    code is raised as an :class:`gateway.errors.UpstreamError` by :func:`to_result`.
    ``handle`` is the handle as it was asked for.
    """

    code: int
    handle: str
    values: tuple[HandleValue, ...] = ()

    @property
    def found(self) -> bool:
        return self.code == RC_SUCCESS

    def record(self) -> Record:
        return Record(self.handle, self.values)


def _skip_request_digest(r: _Reader) -> None:
    kind = r.u8("request digest type")
    if kind == DIGEST_MD5_OLD_FORMAT:  # no type byte: a length-prefixed digest (its length's first byte is 0)
        r.pos -= 1
        r.blob("request digest", cap=64)
        return
    size = DIGEST_SIZES.get(kind)
    if size is None:
        raise ProtocolError(f"{r.what}: unknown request digest type {kind}")
    r.raw(size, "request digest")


def _request_digest(kind: int, digest: bytes) -> bytes:
    if kind == DIGEST_MD5_OLD_FORMAT:
        return _blob(digest)
    if DIGEST_SIZES.get(kind) != len(digest):
        raise ValueError(f"a digest of type {kind} cannot be {len(digest)} bytes")
    return bytes([kind]) + digest


def decode_request(msg: Message) -> ResolutionRequest:
    """The resolution request in ``msg`` (server side). Other opcodes raise ProtocolError: check
    ``msg.header.opcode`` first to answer them with RC_OPERATION_DENIED."""
    h = msg.header
    if not h.is_request:
        raise ProtocolError(f"expected a request, got response code {ResponseCode.describe(h.response_code)}")
    if h.opcode != OC_RESOLUTION:
        raise ProtocolError(f"unsupported request opcode {h.opcode} (only resolution, 1)")
    r = _Reader(msg.body, "resolution request")
    handle = r.blob("handle")
    try:
        handle.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("resolution request: handle is not UTF-8") from None
    n = r.count("index count", MAX_LIST, 4)
    indexes = tuple(r.u32(f"index {i}") for i in range(n))
    n = r.count("type count", MAX_LIST, _MIN_TYPE)
    types = tuple(r.blob(f"type {i}") for i in range(n))
    return ResolutionRequest(handle, types, indexes)


def decode_response(msg: Message) -> ResolutionResponse | ErrorResponse:
    """The resolution response in ``msg`` (client side); a request digest (RD flag) is checked and skipped."""
    h = msg.header
    code = h.response_code
    if h.is_request:
        raise ProtocolError("expected a response, got a request (response code 0)")
    r = _Reader(msg.body, f"{ResponseCode.describe(code)} response")
    if h.op_flags & OPF_RD:
        _skip_request_digest(r)
    if code == RC_SUCCESS:
        if h.opcode != OC_RESOLUTION:
            raise ProtocolError(f"success response to opcode {h.opcode}, expected a resolution (1)")
        handle = r.text("handle")
        return ResolutionResponse(handle, _read_values(r))
    if ResponseCode.is_referral(code):
        data = r.raw(r.remaining(), "referral")
        decode_referral(data)  # reject malformed referrals here, not in whoever follows them
        return ErrorResponse(code, "", data)
    if code == RC_AUTHEN_NEEDED:
        return ErrorResponse(code, "authentication needed", r.raw(r.remaining(), "challenge"))
    if not r.remaining():  # pre-2.1 peers may leave the error text out
        return ErrorResponse(code)
    # Anything after the text (an index list for RC_VALUES_NOT_FOUND in some versions) is ignored.
    return ErrorResponse(code, r.blob("error message").decode("utf-8", "replace"))


def decode_answer(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> ResolutionResponse | ErrorResponse:
    """``decode_response(decode_message(data, max_size=max_size))``: the same result, the same errors.

    The usual answer -- one whole success message without request digest, values without references -- is
    read in one pass here; anything else (and anything that does not parse) goes through the two general
    decoders, which also word the error."""
    fast = _success_answer(data if type(data) is bytes else bytes(data), max_size)
    if fast is not None:
        return fast
    return decode_response(decode_message(data, max_size=max_size))


def _success_answer(data: bytes, max_size: int) -> ResolutionResponse | None:
    """:func:`decode_answer`'s one-pass reading, None whenever the general decoders must judge."""
    n = len(data)
    if n < ENVELOPE_SIZE + HEADER_SIZE:
        return None
    major, _minor, flags, _session, _rid, _seq, length = _ENVELOPE.unpack_from(data, 0)
    if major != PROTOCOL_MAJOR or flags & _CP_EC or length != n - ENVELOPE_SIZE or length > max_size:
        return None
    opcode, code, op_flags, _serial, _rec, _res, _exp, body_length = _HEADER.unpack_from(data, ENVELOPE_SIZE)
    if code != _RC_SUCCESS or opcode != _OC_RESOLUTION or op_flags & _RD:
        return None
    pos = ENVELOPE_SIZE + HEADER_SIZE
    end = pos + body_length
    after = n - end
    if after < 0 or (
        after and (after < CREDENTIAL_LENGTH_SIZE or _U32.unpack_from(data, end)[0] != after - 4)
    ):
        return None
    if end - pos < 8:
        return None
    (size,) = _U32.unpack_from(data, pos)
    pos += 4
    if size > MAX_FIELD_SIZE or end - pos < size + 4:
        return None
    try:
        handle = data[pos : pos + size].decode("utf-8")
    except UnicodeDecodeError:
        return None
    pos += size
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_VALUES or count * _MIN_VALUE > end - pos:
        return None
    values = []
    for _ in range(count):
        if end - pos < _VALUE_HEAD.size:
            return None
        index, timestamp, ttl_type, ttl, permissions, size = _VALUE_HEAD.unpack_from(data, pos)
        pos += _VALUE_HEAD.size
        if size > MAX_FIELD_SIZE or end - pos < size + 4:
            return None
        try:
            vtype = data[pos : pos + size].decode("utf-8")
        except UnicodeDecodeError:
            return None
        pos += size
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        if size > MAX_FIELD_SIZE or end - pos < size + 4:
            return None
        vdata = data[pos : pos + size]
        pos += size
        if _U32.unpack_from(data, pos)[0]:  # references: the general decoder
            return None
        pos += 4
        values.append(HandleValue(index, vtype, vdata, ttl, ttl_type, timestamp, permissions, ()))
    return ResolutionResponse(handle, tuple(values))


def decode_referral(data: bytes) -> tuple[str, tuple[HandleValue, ...]]:
    """Body of a 302/303 referral: the service handle to ask next and, when present, its values."""
    r = _Reader(data, "referral")
    handle = r.text("service handle")
    values = _read_values(r) if r.remaining() else ()
    return handle, values


def to_result(
    response: ResolutionResponse | ErrorResponse, *, handle: str, node: str | None = None
) -> ResolveResult:
    """Map a decoded response to a :class:`ResolveResult` or raise the matching ``gateway.errors`` type.

    RC_SERVER_BUSY -> UpstreamBusy; 302/303 -> UpstreamReferral; other error codes -> UpstreamRefused(code);
    a success for another handle -> ProtocolError.
    """
    if isinstance(response, ResolutionResponse):
        if (
            response.handle.encode().lower() != handle.encode().lower()
        ):  # ASCII case-insensitive, as servers match
            raise ProtocolError(f"answer is for {response.handle!r}, asked for {handle!r}", node)
        return ResolveResult(RC_SUCCESS, handle, response.values)
    code = response.code
    if ResponseCode.is_not_found(code):
        return ResolveResult(code, handle)
    detail = f"{handle}: {response.name}" + (f": {response.message}" if response.message else "")
    if code == RC_SERVER_BUSY:
        raise UpstreamBusy(detail, node)
    if ResponseCode.is_referral(code):
        raise UpstreamReferral(detail, node, code=code, referral=response.data)
    if code == RC_SUCCESS:  # an ErrorResponse built by hand with code 1
        raise ProtocolError(f"{handle}: success code without values", node)
    raise UpstreamRefused(detail, node, code=code)


# ------------------------------------------------------------------------------------------------------
# client side: requests
# ------------------------------------------------------------------------------------------------------
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
    now + 12 h (Unix seconds), no credential. Returns the TCP form, which is also the single UDP datagram."""
    name = _as_bytes(handle)
    if types == () and indexes == ():  # the usual request: no filters
        body = _blob(name) + _EMPTY_LISTS
    else:
        body = ResolutionRequest(name, tuple(_as_bytes(t) for t in types), tuple(indexes)).encode_body()
    if expiration is None:
        expiration = int(time.time()) + DEFAULT_EXPIRATION
    length = HEADER_SIZE + len(body) + CREDENTIAL_LENGTH_SIZE
    if length > MAX_MESSAGE_SIZE:
        raise ValueError(f"message of {length} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")
    return (
        _pack(_ENVELOPE, version[0], version[1], 0, session_id, request_id, 0, length)
        + _pack(
            _HEADER,
            _OC_RESOLUTION,
            RC_RESERVED,
            op_flags,
            site_info_serial,
            recursion_count,
            0,
            expiration & _U32_MASK,
            len(body),
        )
        + body
        + b"\0\0\0\0"  # no credential
    )


# ------------------------------------------------------------------------------------------------------
# server side: responses
# ------------------------------------------------------------------------------------------------------
def encode_response(
    request: Message,
    response: ResolutionResponse | ErrorResponse | ResolveResult,
    *,
    authoritative: bool = True,
    site_info_serial: int = 1,
    op_flags: int | None = None,
    expiration: int | None = None,
    request_digest: tuple[int, bytes] | None = None,
) -> bytes:
    """The answer to ``request`` laid out as a HANDLE.NET server lays it out (TCP form; see
    :func:`split_datagrams` for UDP).

    Echoed from the request: version, session id, request id, opcode, recursion count, expiration (the
    captured server answers with the request's expiration). Op flags default to AT (when ``authoritative``)
    | REC | the request's CA and PO bits, i.e. 0x99000000 for hdl-qresolver's 0x19000000; RD is added when
    ``request_digest`` = (hash type, digest) is given. A ResolveResult with code 100/200 is sent as an error
    response with an empty text, as the captured server does.
    """
    req_env, req_h = request.envelope, request.header
    if isinstance(response, ResolveResult):
        if response.code == RC_SUCCESS:
            response = ResolutionResponse(response.handle, response.values)
        else:
            response = ErrorResponse(response.code)
    code = RC_SUCCESS if isinstance(response, ResolutionResponse) else response.code
    if code == RC_RESERVED:
        raise ValueError("a response cannot carry response code 0")
    if op_flags is None:
        op_flags = (OPF_AT if authoritative else 0) | OPF_REC | (req_h.op_flags & (OPF_CA | OPF_PO))
    body = b""
    if request_digest is not None:
        op_flags |= OPF_RD
        body = _request_digest(*request_digest)
    if isinstance(response, ResolutionResponse):
        parts = [_blob(response.handle.encode()), _u32(len(response.values))]
        parts.extend(encode_value(v) for v in response.values)
        body += b"".join(parts)
    elif ResponseCode.is_referral(code) or code == RC_AUTHEN_NEEDED:
        body += response.data
    else:
        body += _blob(response.message.encode())
    env = Envelope(
        major=req_env.major, minor=req_env.minor, session_id=req_env.session_id, request_id=req_env.request_id
    )
    header = Header(
        opcode=req_h.opcode,
        response_code=code,
        op_flags=op_flags,
        site_info_serial=site_info_serial,
        recursion_count=req_h.recursion_count,
        expiration=req_h.expiration if expiration is None else expiration & _U32_MASK,
    )
    return encode_message(env, header, body)


def encode_truncated(request: Message, *, site_info_serial: int = 1) -> bytes:
    """One self-contained datagram with the TC flag: "the answer does not fit, ask again over TCP".

    HANDLE.NET splits large answers instead (:func:`split_datagrams`); this is the DNS-style alternative,
    used by the node simulator's truncation knob. Its body is empty: clients must not decode it.
    """
    env = replace(request.envelope, flags=int(ENV_TC), sequence=0)
    h = request.header
    header = Header(
        opcode=h.opcode,
        response_code=RC_SUCCESS,
        op_flags=OPF_AT | OPF_REC | (h.op_flags & (OPF_CA | OPF_PO)),
        site_info_serial=site_info_serial,
        recursion_count=h.recursion_count,
        expiration=h.expiration,
    )
    return encode_message(env, header, b"")


def split_datagrams(
    message: bytes, *, max_datagram: int = MAX_UDP_DATAGRAM, set_tc: bool = False
) -> list[bytes]:
    """Cut an encoded message (TCP form) into UDP datagrams of at most ``max_datagram`` bytes.

    A message that fits is returned as is. Otherwise each piece of ``max_datagram - 20`` message bytes gets
    a copy of the envelope with sequence numbers 0, 1, 2, ... and the total message length, exactly as
    HANDLE.NET servers send (MessageFlag unchanged; ``set_tc`` sets TC on every piece, as HANDLE.NET
    clients do for split requests).
    """
    env = decode_envelope(message)
    if len(message) - ENVELOPE_SIZE != env.message_length:
        raise ValueError("not one complete encoded message")
    if len(message) <= max_datagram:
        return [message]
    piece = max_datagram - ENVELOPE_SIZE
    if piece <= 0:
        raise ValueError(f"max_datagram {max_datagram} leaves no room after the envelope")
    flags = env.flags | ENV_TC if set_tc else env.flags
    body = memoryview(message)[ENVELOPE_SIZE:]
    return [
        replace(env, flags=flags, sequence=seq).encode() + bytes(body[off : off + piece])
        for seq, off in enumerate(range(0, len(body), piece))
    ]


# ------------------------------------------------------------------------------------------------------
# UDP reassembly
# ------------------------------------------------------------------------------------------------------
class Reassembler:
    """Collects the datagrams of one message (one request id) and returns the whole message once every
    sequence number is in. Out-of-order and duplicate datagrams are fine; anything inconsistent (another
    request id, another total length, a sequence number out of range, a piece of the wrong size) raises
    ProtocolError. Pieces are ``piece_size`` bytes (492, HANDLE.NET's size) except the last one; a first
    datagram that holds the whole message is accepted whatever its size.
    """

    def __init__(
        self,
        request_id: int | None = None,
        *,
        max_size: int = MAX_UDP_MESSAGE_SIZE,
        piece_size: int = MAX_UDP_PAYLOAD,
    ) -> None:
        if piece_size <= 0:
            raise ValueError("piece_size must be positive")
        self.request_id = request_id
        self.max_size = max_size
        self.piece_size = piece_size
        self.duplicates = 0
        self._envelope: Envelope | None = None
        self._pieces: dict[int, bytes] = {}
        self._count = 0
        self._done = False

    @property
    def expected(self) -> int | None:
        """Number of datagrams of the message, None before the first one arrived."""
        return self._count if self._envelope is not None else None

    @property
    def received(self) -> int:
        return len(self._pieces)

    @property
    def complete(self) -> bool:
        return self._done

    @property
    def missing(self) -> tuple[int, ...]:
        """Sequence numbers still missing (empty before the first datagram and once complete)."""
        return tuple(i for i in range(self._count) if i not in self._pieces)

    def feed(self, datagram: bytes) -> bytes | None:
        """Add one datagram; returns the whole message (TCP form, sequence 0) when it completes it, else None.
        Datagrams that arrive after completion are counted as duplicates and ignored."""
        env = decode_envelope(datagram, max_size=self.max_size)
        if self.request_id is not None and env.request_id != self.request_id:
            raise ProtocolError(
                f"datagram for request {env.request_id:#010x}, expected {self.request_id:#010x}"
            )
        payload = bytes(datagram[ENVELOPE_SIZE:])
        first, count = self._envelope, self._count
        if first is None:
            if env.message_length == 0:
                raise ProtocolError("datagram announces an empty message")
            if env.sequence == 0 and len(payload) == env.message_length:
                self._envelope, self._count, self._pieces[0] = env, 1, payload
                return self._finish()
            first, count = env, -(-env.message_length // self.piece_size)
        elif self._done:
            self.duplicates += 1
            return None
        if (env.message_length, env.session_id, env.major, env.minor) != (
            first.message_length,
            first.session_id,
            first.major,
            first.minor,
        ):
            raise ProtocolError(
                f"datagram {env.sequence} disagrees with the first one about length/session/version "
                f"({env.message_length} vs {first.message_length} bytes)"
            )
        if env.sequence >= count:
            raise ProtocolError(f"sequence number {env.sequence} out of range for a {count}-datagram message")
        last = count - 1
        want = self.piece_size if env.sequence < last else first.message_length - last * self.piece_size
        if len(payload) != want:
            raise ProtocolError(
                f"datagram {env.sequence} carries {len(payload)} message bytes, expected {want}"
            )
        if self._envelope is None:  # the first datagram is consistent: commit to its message
            self._envelope, self._count, self.request_id = first, count, env.request_id
        if env.sequence in self._pieces:
            self.duplicates += 1
            return None
        self._pieces[env.sequence] = payload
        return self._finish() if len(self._pieces) == count else None

    def _finish(self) -> bytes:
        assert self._envelope is not None
        self._done = True
        env = replace(self._envelope, sequence=0, flags=self._envelope.flags & ~ENV_TC)
        return env.encode() + b"".join(self._pieces[i] for i in range(self._count))


# ------------------------------------------------------------------------------------------------------
# TCP framing
# ------------------------------------------------------------------------------------------------------
class StreamFramer:
    """Cuts a TCP byte stream into messages (each: one envelope + the whole message).

    ``feed(data)`` returns the messages completed by ``data`` (TCP form, ready for :func:`decode_message`);
    ``eof()`` raises ProtocolError when the stream ends inside a message. A bad envelope or an oversized
    length raises ProtocolError, and so does every later call (the stream cannot be resynchronised).
    """

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise ProtocolError(str(self._error))
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= ENVELOPE_SIZE:
            try:
                env = decode_envelope(bytes(self._buf[:ENVELOPE_SIZE]), max_size=self.max_size)
            except ProtocolError as e:
                self._error = e
                raise
            end = ENVELOPE_SIZE + env.message_length
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[:end]))
            del self._buf[:end]
        return out

    def eof(self) -> None:
        if self._buf:
            raise ProtocolError(f"stream ended inside a message ({len(self._buf)} bytes buffered)")
