"""Responses: a resolution's values, or a response code with its text or data -- and how a node lays them out.

:func:`decode_response` reports what a response says and judges nothing: RC_SUCCESS gives a
:class:`ResolutionResponse` (the handle and its values); every other code an :class:`ErrorResponse` with the
code, the server's text, and for referrals (302/303) and authentication challenges (402) the raw body. What
a code means for a resolution (an answer, busy, refused, referred elsewhere) is the upstream layer's call.
:func:`encode_response` and :func:`encode_truncated` are the node's side, laid out as the captured HANDLE.NET
7.3.1 server lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proto.handle.envelope import Envelope, Header, Message, encode_message
from proto.handle.errors import HandleFormatError
from proto.handle.numbers import (
    DIGEST_MD5_OLD_FORMAT,
    DIGEST_SIZES,
    ENV_TC,
    OC_RESOLUTION,
    OPF_AT,
    OPF_CA,
    OPF_PO,
    OPF_RD,
    OPF_REC,
    RC_AUTHEN_NEEDED,
    RC_RESERVED,
    RC_SUCCESS,
    ResponseCode,
)
from proto.handle.values import decode_referral, encode_value, read_values
from proto.handle.wire import U32_MASK, Reader, blob, u32
from proto.records import HandleValue, Record

__all__ = [
    "ErrorResponse",
    "ResolutionResponse",
    "Response",
    "decode_response",
    "encode_response",
    "answer_flags",
    "encode_truncated",
    "skip_request_digest",
]


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
    request digest, for responses whose body is not an error text: referrals (302, 303; read it with
    :meth:`referral`) and authentication challenges (402). It is empty otherwise.
    """

    code: int
    message: str = ""
    data: bytes = b""

    @property
    def name(self) -> str:
        return ResponseCode.describe(self.code)

    def referral(self) -> tuple[str, tuple[HandleValue, ...]] | None:
        """The service handle to ask next and its values, for a 302/303 (checked when it was decoded)."""
        return decode_referral(self.data) if ResponseCode.is_referral(self.code) else None


Response = ResolutionResponse | ErrorResponse


def skip_request_digest(r: Reader) -> None:
    """Read past the request digest at the start of a body whose header has the RD flag."""
    kind = r.u8("request digest type")
    if kind == DIGEST_MD5_OLD_FORMAT:  # no type byte: a length-prefixed digest (its length's first byte is 0)
        r.pos -= 1
        r.blob("request digest", cap=64)
        return
    size = DIGEST_SIZES.get(kind)
    if size is None:
        raise HandleFormatError(f"{r.what}: unknown request digest type {kind}")
    r.raw(size, "request digest")


def _request_digest(kind: int, digest: bytes) -> bytes:
    if kind == DIGEST_MD5_OLD_FORMAT:
        return blob(digest)
    if DIGEST_SIZES.get(kind) != len(digest):
        raise ValueError(f"a digest of type {kind} cannot be {len(digest)} bytes")
    return bytes([kind]) + digest


def decode_response(msg: Message) -> Response:
    """The resolution response in ``msg`` (client side); a request digest (RD flag) is checked and skipped."""
    h = msg.header
    code = h.response_code
    if h.is_request:
        raise HandleFormatError("expected a response, got a request (response code 0)")
    r = Reader(msg.body, f"{ResponseCode.describe(code)} response")
    if h.op_flags & OPF_RD:
        skip_request_digest(r)
    if code == RC_SUCCESS:
        if h.opcode != OC_RESOLUTION:
            raise HandleFormatError(f"success response to opcode {h.opcode}, expected a resolution (1)")
        handle = r.text("handle")
        return ResolutionResponse(handle, read_values(r))
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


def answer_flags(request: Header, authoritative: bool = True) -> int:
    """AT (when authoritative) | REC | the request's CA and PO bits: 0x99000000 for hdl-qresolver's 0x19000000."""
    return (OPF_AT if authoritative else 0) | OPF_REC | (request.op_flags & (OPF_CA | OPF_PO))


def encode_response(
    request: Message,
    response: Response,
    *,
    authoritative: bool = True,
    site_info_serial: int = 1,
    op_flags: int | None = None,
    expiration: int | None = None,
    request_digest: tuple[int, bytes] | None = None,
) -> bytes:
    """The answer to ``request`` laid out as a HANDLE.NET server lays it out (TCP form; see
    :func:`proto.handle.framing.split_datagrams` for UDP).

    Echoed from the request: version, session id, request id, opcode, recursion count, expiration (the
    captured server answers with the request's expiration). Op flags default to AT (when ``authoritative``)
    | REC | the request's CA and PO bits, i.e. 0x99000000 for hdl-qresolver's 0x19000000; RD is added when
    ``request_digest`` = (hash type, digest) is given. Not found (100) and values not found (200) are sent
    as an ErrorResponse with an empty text, as the captured server does.
    """
    req_env, req_h = request.envelope, request.header
    code = RC_SUCCESS if isinstance(response, ResolutionResponse) else response.code
    if code == RC_RESERVED:
        raise ValueError("a response cannot carry response code 0")
    if op_flags is None:
        op_flags = answer_flags(req_h, authoritative)
    body = b""
    if request_digest is not None:
        op_flags |= OPF_RD
        body = _request_digest(*request_digest)
    if isinstance(response, ResolutionResponse):
        parts = [blob(response.handle.encode()), u32(len(response.values))]
        parts.extend(encode_value(v) for v in response.values)
        body += b"".join(parts)
    elif ResponseCode.is_referral(code) or code == RC_AUTHEN_NEEDED:
        body += response.data
    else:
        body += blob(response.message.encode())
    env = Envelope(
        major=req_env.major, minor=req_env.minor, session_id=req_env.session_id, request_id=req_env.request_id
    )
    header = Header(
        opcode=req_h.opcode,
        response_code=code,
        op_flags=op_flags,
        site_info_serial=site_info_serial,
        recursion_count=req_h.recursion_count,
        expiration=req_h.expiration if expiration is None else expiration & U32_MASK,
    )
    return encode_message(env, header, body)


def encode_truncated(request: Message, *, site_info_serial: int = 1) -> bytes:
    """One self-contained datagram with the TC flag: "the answer does not fit, ask again over TCP".

    HANDLE.NET splits large answers instead (:func:`proto.handle.framing.split_datagrams`); this is the
    DNS-style alternative, used by the node simulator's truncation knob. Its body is empty: clients must not
    decode it.
    """
    env = replace(request.envelope, flags=int(ENV_TC), sequence=0)
    h = request.header
    header = Header(
        opcode=h.opcode,
        response_code=RC_SUCCESS,
        op_flags=answer_flags(h),
        site_info_serial=site_info_serial,
        recursion_count=h.recursion_count,
        expiration=h.expiration,
    )
    return encode_message(env, header, b"")
