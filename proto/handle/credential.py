"""The credential after a message's body (RFC 3652 section 2.2.4): who signed it, how, and the signature.

Layout (big-endian), as HANDLE.NET 7.3.1 writes it::

    version(1) reserved(1) flags(2)
    signer handle (len4 + UTF-8) signer index(4)   -- HANDLE.NET writes "" and the session counter here
    type (len4 + UTF-8)                            -- HS_SIGNED (a key pair's signature) or HS_MAC (session)
    section length(4) = hash name (len4 + bytes) + signature (len4 + bytes)

The hash name is ``SHA1`` for a DSA/RSA signature and the one byte ``\\x02`` (SHA-1) for the MAC of a
protocol 2.5 session message. What the bytes sign is :func:`proto.handle.session.signed_bytes` (HS_SIGNED)
or :func:`proto.handle.session.session_mac` (HS_MAC); this module only lays the credential out.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.handle.errors import HandleFormatError
from proto.handle.wire import U16, Reader, blob, pack, u32

__all__ = ["Credential", "decode_credential"]


@dataclass(frozen=True, slots=True)
class Credential:
    """One credential. ``signer_index`` carries the session counter in HANDLE.NET's HS_MAC credentials."""

    type: str
    hash_alg: bytes
    signature: bytes
    signer: str = ""
    signer_index: int = 0
    version: int = 0
    reserved: int = 0
    flags: int = 0

    def encode(self) -> bytes:
        section = blob(self.hash_alg) + blob(self.signature)
        return (
            bytes([self.version & 0xFF, self.reserved & 0xFF])
            + pack(U16, self.flags)
            + blob(self.signer.encode())
            + u32(self.signer_index)
            + blob(self.type.encode())
            + u32(len(section))
            + section
        )


def decode_credential(data: bytes) -> Credential:
    """Parse the credential bytes of a message (after its length word); HandleFormatError if they do not."""
    r = Reader(data, "credential")
    version = r.u8("version")
    reserved = r.u8("reserved")
    (flags,) = r.unpack(U16, "flags")
    signer = r.text("signer handle")
    index = r.u32("signer index")
    ctype = r.text("type")
    size = r.u32("signature section length")
    if size != r.remaining():
        raise HandleFormatError(
            f"credential: signature section of {size} bytes, {r.remaining()} left in the credential"
        )
    alg = r.blob("hash name", cap=64)
    signature = r.blob("signature")
    if r.remaining():
        raise HandleFormatError(f"credential: {r.remaining()} bytes after the signature")
    return Credential(ctype, alg, signature, signer, index, version, reserved, flags)
