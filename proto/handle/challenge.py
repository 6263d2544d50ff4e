"""The authentication exchange (RFC 3652 section 3.5): the 402 challenge and the CHALLENGE_RESPONSE (op 200).

A server that wants to know who sends an administration request answers it with RC_AUTHENTICATION_NEEDED
(402). The answer has the RD flag; its body is the request digest -- digest type (2 = SHA-1) and the hash of
the request's header and body (:func:`request_digest`) -- then a length-prefixed 16-byte nonce.

The client answers on a new TCP connection with a CHALLENGE_RESPONSE under the same session id and a new
request id. Its body: the authentication type (``HS_PUBKEY``), the admin handle, the admin index, and a
length-prefixed response; for ``HS_PUBKEY`` the response is the hash name (``SHA1``) and the signature, made
with the admin's private key over **the nonce followed by the digest** (without its type byte) -- the captured
signature verifies with the captured public key on exactly those bytes. The server then answers the
*original* request (its opcode), under the challenge response's request id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from proto.handle.envelope import Message
from proto.handle.errors import HandleFormatError
from proto.handle.numbers import (
    AUTH_PUBKEY,
    DIGEST_MD5,
    DIGEST_SHA1,
    DIGEST_SHA256,
    DIGEST_SIZES,
    OC_CHALLENGE_RESPONSE,
    RC_AUTHEN_NEEDED,
    ResponseCode,
)
from proto.handle.response import ErrorResponse, encode_response
from proto.handle.wire import Reader, blob, u32

__all__ = [
    "Challenge",
    "ChallengeAnswer",
    "decode_challenge",
    "decode_challenge_answer",
    "encode_challenge",
    "request_digest",
]

_HASHES = {DIGEST_MD5: hashlib.md5, DIGEST_SHA1: hashlib.sha1, DIGEST_SHA256: hashlib.sha256}


def request_digest(request: Message, kind: int = DIGEST_SHA1) -> bytes:
    """The digest of ``request`` a server puts in its answer: the hash of the header and the body (SHA-1
    for protocol 2.1 to 2.6, as HANDLE.NET 7.3.1 does)."""
    try:
        return _HASHES[kind](request.head_and_body()).digest()
    except KeyError:
        raise ValueError(f"unknown digest type {kind}") from None


@dataclass(frozen=True, slots=True)
class Challenge:
    """A 402 challenge: the digest of the challenged request (``digest_type`` 2 = SHA-1) and the nonce."""

    digest_type: int
    digest: bytes
    nonce: bytes

    def signed_bytes(self) -> bytes:
        """What the admin signs: the nonce, then the digest."""
        return self.nonce + self.digest

    def matches(self, request: Message) -> bool:
        """The digest is the digest of ``request``: never sign a challenge to something we did not send."""
        try:
            return request_digest(request, self.digest_type) == self.digest
        except ValueError:
            return False


def decode_challenge(msg: Message) -> Challenge:
    """The challenge in a 402 answer; HandleFormatError for any other answer or a body that does not parse."""
    h = msg.header
    if h.response_code != RC_AUTHEN_NEEDED:
        raise HandleFormatError(f"not a challenge: response code {ResponseCode.describe(h.response_code)}")
    r = Reader(msg.body, "challenge")
    kind = r.u8("digest type")
    size = DIGEST_SIZES.get(kind)
    if size is None:
        raise HandleFormatError(f"challenge: unknown digest type {kind}")
    digest = r.raw(size, "request digest")
    nonce = r.blob("nonce", cap=1024)
    if r.remaining():
        raise HandleFormatError(f"challenge: {r.remaining()} bytes after the nonce")
    return Challenge(kind, digest, nonce)


def encode_challenge(request: Message, nonce: bytes, *, site_info_serial: int = 1) -> bytes:
    """The node's 402 answer to ``request``, laid out as the captured HANDLE.NET server lays it out."""
    digest = request_digest(request)
    return encode_response(
        request,
        ErrorResponse(int(RC_AUTHEN_NEEDED), data=blob(nonce)),
        site_info_serial=site_info_serial,
        request_digest=(DIGEST_SHA1, digest),
    )


@dataclass(frozen=True, slots=True)
class ChallengeAnswer:
    """Body of a CHALLENGE_RESPONSE: who answers (``handle``, ``index``), how (``auth_type``), and the
    response -- for HS_PUBKEY the hash name and the signature (:meth:`signature`)."""

    handle: str
    index: int
    response: bytes
    auth_type: str = AUTH_PUBKEY

    @classmethod
    def signed(cls, handle: str, index: int, hash_alg: bytes, signature: bytes) -> ChallengeAnswer:
        return cls(handle, index, blob(hash_alg) + blob(signature))

    def signature(self) -> tuple[bytes, bytes]:
        """(hash name, signature) of an HS_PUBKEY response; HandleFormatError if it does not parse."""
        r = Reader(self.response, "challenge answer signature")
        alg = r.blob("hash name", cap=64)
        sig = r.blob("signature")
        if r.remaining():
            raise HandleFormatError(f"challenge answer: {r.remaining()} bytes after the signature")
        return alg, sig

    def encode_body(self) -> bytes:
        return (
            blob(self.auth_type.encode()) + blob(self.handle.encode()) + u32(self.index) + blob(self.response)
        )


def decode_challenge_answer(msg: Message) -> ChallengeAnswer:
    """The CHALLENGE_RESPONSE in ``msg`` (node side)."""
    if msg.header.opcode != OC_CHALLENGE_RESPONSE:
        raise HandleFormatError(f"opcode {msg.header.opcode} is not CHALLENGE_RESPONSE (200)")
    r = Reader(msg.body, "challenge answer")
    auth_type = r.text("authentication type")
    handle = r.text("admin handle")
    index = r.u32("admin index")
    response = r.blob("response")
    if r.remaining():
        raise HandleFormatError(f"challenge answer: {r.remaining()} bytes after the response")
    return ChallengeAnswer(handle, index, response, auth_type)
