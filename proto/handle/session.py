"""Sessions (RFC 3652 section 3.6) as HANDLE.NET 7.3.1 runs them: SESSION_SETUP (op 400), the session key,
and the HS_MAC credential of the requests sent in the session; plus what an HS_SIGNED credential signs.

SESSION_SETUP body (``tests/vectors/handle-admin``, sent by ``hdl-create``)::

    key exchange mode(2)  timeout(4)  identity handle (len4)  identity index(4)
    mode 1 / 4 (client cipher / Diffie-Hellman): the client's public key (len4; a DH_PUB_KEY)
    mode 3 (handle cipher): the exchange key's handle (len4) and index(4)
    2 zero bytes: HANDLE.NET counts 4 bytes for the mode and writes 2, so every body ends with 2 zeros

The answer (RD flag, signed with the server's key when the request asked CT): the request digest, the mode
(2), the data (len4), 2 zero bytes. For Diffie-Hellman the data is the session cipher (4 bytes: 1 DES,
2 DESede, 3 AES) and the server's DH_PUB_KEY in the client's group. Both sides take the DH secret (as long as
p) and derive the session key from it (:func:`session_key`): DES / DESede keys are its first 8 / 24 bytes
with odd parity bits; AES, 32 bytes after its leading zero bytes.

The requests of the session then carry the session id and an HS_MAC credential (:func:`mac_credential`):
signer "" and the session counter (1, 2, 3, ... one per request), hash name ``\\x02`` and, for protocol 2.5
and 2.6, SHA-1 over ``key[:4] + header + body + key + (len(key) + 10) zero bytes`` -- what HANDLE.NET's
``brokenTwoFiveTwoSixSignature`` hashes after its offsets overwrite each other; HMAC-SHA256 over the version,
session id, request id, counter, header and body from 2.7 on; SHA-1 over ``key + header + body + key`` below
2.5. The first request of a session is challenged once (402); after the challenge is answered, the server
checks the MAC of that request and takes the later requests on their MAC alone.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from proto.handle.credential import Credential, decode_credential
from proto.handle.envelope import Message
from proto.handle.errors import HandleFormatError
from proto.handle.numbers import (
    CRED_MAC,
    DIGEST_SHA1,
    HASH_SHA1,
    KEY_EXCHANGE_CIPHER_CLIENT,
    KEY_EXCHANGE_CIPHER_HDL,
    KEY_EXCHANGE_DH,
    OC_SESSION_SETUP,
    OPF_RD,
    SESSION_ALG_AES,
    SESSION_ALG_DES,
    SESSION_ALG_DESEDE,
)
from proto.handle.response import skip_request_digest
from proto.handle.wire import U16, Reader, blob, pack, u32

__all__ = [
    "SessionSetup",
    "SessionSetupAnswer",
    "decode_session_setup",
    "decode_session_setup_answer",
    "mac_credential",
    "session_key",
    "session_mac",
    "signed_bytes",
    "verify_mac",
]

_PAD = b"\0\0"
_KEY_SIZES = {SESSION_ALG_DES: 8, SESSION_ALG_DESEDE: 24}


@dataclass(frozen=True, slots=True)
class SessionSetup:
    """Body of SESSION_SETUP. ``public_key`` for modes 1 and 4; ``exchange_handle`` / ``_index`` for mode 3.
    ``trailer`` is what follows the fields (HANDLE.NET's 2 zero bytes)."""

    mode: int
    timeout: int
    identity_handle: str
    identity_index: int
    public_key: bytes = b""
    exchange_handle: str = ""
    exchange_index: int = 0
    trailer: bytes = _PAD

    def encode_body(self) -> bytes:
        out = pack(U16, self.mode) + u32(self.timeout)
        out += blob(self.identity_handle.encode()) + u32(self.identity_index)
        if self.mode in (KEY_EXCHANGE_CIPHER_CLIENT, KEY_EXCHANGE_DH):
            out += blob(self.public_key)
        elif self.mode == KEY_EXCHANGE_CIPHER_HDL:
            out += blob(self.exchange_handle.encode()) + u32(self.exchange_index)
        return out + self.trailer


def decode_session_setup(msg: Message) -> SessionSetup:
    """The SESSION_SETUP request in ``msg`` (node side)."""
    if msg.header.opcode != OC_SESSION_SETUP:
        raise HandleFormatError(f"opcode {msg.header.opcode} is not SESSION_SETUP (400)")
    r = Reader(msg.body, "session setup")
    (mode,) = r.unpack(U16, "key exchange mode")
    timeout = r.u32("timeout")
    handle = r.text("identity handle")
    index = r.u32("identity index")
    key, xhandle, xindex = b"", "", 0
    if mode in (KEY_EXCHANGE_CIPHER_CLIENT, KEY_EXCHANGE_DH):
        key = r.blob("public key")
    elif mode == KEY_EXCHANGE_CIPHER_HDL:
        xhandle = r.text("exchange key handle")
        xindex = r.u32("exchange key index")
    trailer = r.raw(r.remaining(), "trailer")
    if len(trailer) > 4:
        raise HandleFormatError(f"session setup: {len(trailer)} bytes after the fields")
    return SessionSetup(mode, timeout, handle, index, key, xhandle, xindex, trailer)


@dataclass(frozen=True, slots=True)
class SessionSetupAnswer:
    """Body of a successful SESSION_SETUP answer (after its request digest)."""

    mode: int
    data: bytes
    trailer: bytes = _PAD

    def encode_body(self) -> bytes:
        return pack(U16, self.mode) + blob(self.data) + self.trailer

    def dh(self) -> tuple[int, bytes]:
        """(session cipher, the server's DH_PUB_KEY) of a Diffie-Hellman answer (protocol 2.4 and later)."""
        if self.mode != KEY_EXCHANGE_DH or len(self.data) < 4:
            raise HandleFormatError(f"session setup answer: mode {self.mode} is not a Diffie-Hellman answer")
        (alg,) = struct.unpack_from(">I", self.data, 0)
        return alg, self.data[4:]


def decode_session_setup_answer(msg: Message) -> SessionSetupAnswer:
    """The SESSION_SETUP answer in ``msg`` (client side), its request digest skipped."""
    r = Reader(msg.body, "session setup answer")
    if msg.header.op_flags & OPF_RD:
        skip_request_digest(r)
    (mode,) = r.unpack(U16, "key exchange mode")
    data = r.blob("data")
    trailer = r.raw(r.remaining(), "trailer")
    if len(trailer) > 4:
        raise HandleFormatError(f"session setup answer: {len(trailer)} bytes after the data")
    return SessionSetupAnswer(mode, data, trailer)


def session_key(secret: bytes, alg: int) -> bytes:
    """The session key HANDLE.NET derives from the Diffie-Hellman secret for cipher ``alg``."""
    if alg == SESSION_ALG_AES:
        i = 0
        while i + 32 < len(secret) and secret[i] == 0:
            i += 1
        return secret[i : i + 32]
    size = _KEY_SIZES.get(alg)
    if size is None:
        raise ValueError(f"unknown session cipher {alg}")
    out = bytearray(secret[:size])
    for i, b in enumerate(out):  # odd parity in the low bit of every byte, as DES keys have it
        b &= 0xFE
        out[i] = b | ((bin(b).count("1") & 1) ^ 1)
    return bytes(out)


def session_mac(key: bytes, msg: Message, counter: int) -> tuple[bytes, bytes]:
    """(hash name, MAC) of ``msg`` under the session ``key`` as the message's protocol version computes it."""
    env = msg.envelope
    hb = msg.head_and_body()
    version = (env.major, env.minor)
    if version < (2, 5):
        return bytes([DIGEST_SHA1]), hashlib.sha1(key + hb + key).digest()
    if version < (2, 7):
        name = bytes([DIGEST_SHA1]) if version == (2, 5) else HASH_SHA1
        return name, hashlib.sha1(key[:4] + hb + key + bytes(len(key) + 10)).digest()
    head = bytes([env.major, env.minor])
    if version >= (2, 8):
        suggest = env.suggested_version or (0, 0)
        head += bytes(suggest)
    head += struct.pack(">III", env.session_id, env.request_id, counter)
    return b"HMAC-SHA256", hmac.new(key, head + hb, hashlib.sha256).digest()


def mac_credential(key: bytes, msg: Message, counter: int) -> Credential:
    """The HS_MAC credential of the ``counter``-th request of a session."""
    alg, mac = session_mac(key, msg, counter)
    return Credential(CRED_MAC, alg, mac, "", counter)


def verify_mac(key: bytes, msg: Message) -> bool:
    """``msg`` carries an HS_MAC credential that is right under ``key`` (node side)."""
    if not msg.credential:
        return False
    try:
        cred = decode_credential(msg.credential)
    except HandleFormatError:
        return False
    if cred.type != CRED_MAC:
        return False
    alg, mac = session_mac(key, msg, cred.signer_index)
    return cred.hash_alg == alg and hmac.compare_digest(mac, cred.signature)


def signed_bytes(msg: Message, counter: int = 0) -> bytes:
    """What an HS_SIGNED credential of ``msg`` signs: the header and body, and from protocol 2.7 on, before
    them, the version, session id, request id and counter (HANDLE.NET's ``signMessage``)."""
    env = msg.envelope
    version = (env.major, env.minor)
    if version < (2, 6):
        return msg.head_and_body()
    if version == (2, 6):  # the offsets of HANDLE.NET 2.6 overwrite each other: what is left of the fields
        fields = bytes([env.major, env.minor]) + struct.pack(">HI", env.session_id >> 16, counter) + bytes(6)
        return fields + msg.head_and_body()
    head = bytes([env.major, env.minor])
    if version >= (2, 8):
        head += bytes(env.suggested_version or (0, 0))
    return head + struct.pack(">III", env.session_id, env.request_id, counter) + msg.head_and_body()
