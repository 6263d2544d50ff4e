"""HANDLE.NET's key encodings, and signing with them (the ``cryptography`` package does the mathematics).

Public keys (the data of an ``HS_PUBKEY`` value, and ``admpub.bin``-style files)::

    DSA_PUB_KEY: type (len4 + "DSA_PUB_KEY") flags(2) q p g y     -- each number len4 + big-endian bytes
    RSA_PUB_KEY: type flags(2) e n
    DH_PUB_KEY:  type flags(2) y p g                              -- a SESSION_SETUP's key exchange

Private key files (``admpriv.bin``): an encryption type (4 bytes) and then, for type 1 (none), the key::

    DSA_PRIV_KEY: type x p q g
    RSA_PRIVCRT_KEY: type n e d p q dP dQ qInv        RSA_PRIV_KEY: type n d

Type 4 is HANDLE.NET's passphrase protection (PBKDF2-HMAC-SHA1 -> AES-128-CBC, PKCS#5 padding):
salt (len4), iterations (4), key bits (4), IV (len4), ciphertext (len4). Other types (DES of HANDLE.NET 6)
are refused with :class:`KeyFileError`. Numbers are written as Java's ``BigInteger.toByteArray`` writes
them: minimal two's complement, so a leading 0 byte when the top bit is set.

A challenge is answered by signing ``nonce + request digest`` (:func:`sign`): ``SHA1withDSA`` (DER) or
``SHA1withRSA`` (PKCS#1 v1.5) as HANDLE.NET 7.3.1 does, SHA-256 when asked.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from proto.handle.errors import HandleFormatError
from proto.handle.numbers import HASH_SHA1, HASH_SHA256
from proto.handle.wire import U16, Reader, blob, pack, u32

__all__ = [
    "OAKLEY_GROUP_2",
    "DHKey",
    "KeyFileError",
    "PassphraseNeeded",
    "PrivateKey",
    "PublicKey",
    "decode_dh_key",
    "dh_keypair",
    "dh_secret",
    "encode_dh_key",
    "encode_private_key",
    "encode_public_key",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify",
]

PrivateKey = dsa.DSAPrivateKey | rsa.RSAPrivateKey
PublicKey = dsa.DSAPublicKey | rsa.RSAPublicKey

ENCRYPT_NONE = 1
ENCRYPT_PBKDF2_AES = 4
_KDF_ITERATIONS = 10000

# RFC 2409 section 6.2 (1024-bit MODP group 2), generator 2: what hdl-create offers in SESSION_SETUP.
OAKLEY_GROUP_2 = (
    int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
        "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF",
        16,
    ),
    2,
)


class KeyFileError(ValueError):
    """Bytes that are not a HANDLE.NET key (or not one this code reads); the message says which."""


class PassphraseNeeded(KeyFileError):
    """The private key file is protected by a passphrase and none (or a wrong one) was given."""


# -- numbers as Java writes them ------------------------------------------------------------------------
def _jint(n: int) -> bytes:
    return blob(n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _read_ints(r: Reader, names: str) -> list[int]:
    return [int.from_bytes(r.blob(name, cap=8192), "big") for name in names.split()]


def _reader(data: bytes, what: str) -> tuple[Reader, str]:
    r = Reader(bytes(data), what)
    try:
        kind = r.text("key type")
    except HandleFormatError as e:
        raise KeyFileError(f"{what}: {e}") from None
    return r, kind


# -- public keys ------------------------------------------------------------------------------------------
def encode_public_key(key: PublicKey) -> bytes:
    """The ``DSA_PUB_KEY`` / ``RSA_PUB_KEY`` encoding of ``key`` (the data of its ``HS_PUBKEY`` value)."""
    if isinstance(key, dsa.DSAPublicKey):
        n = key.public_numbers()
        p = n.parameter_numbers
        return blob(b"DSA_PUB_KEY") + pack(U16, 0) + b"".join(_jint(x) for x in (p.q, p.p, p.g, n.y))
    if isinstance(key, rsa.RSAPublicKey):
        rn = key.public_numbers()
        return blob(b"RSA_PUB_KEY") + pack(U16, 0) + _jint(rn.e) + _jint(rn.n)
    raise TypeError(f"not a DSA or RSA public key: {type(key).__name__}")


def load_public_key(data: bytes) -> PublicKey:
    """The key in a ``DSA_PUB_KEY`` / ``RSA_PUB_KEY`` encoding; KeyFileError if it is not one."""
    r, kind = _reader(data, "public key")
    try:
        r.unpack(U16, "flags")
        if kind == "DSA_PUB_KEY":
            q, p, g, y = _read_ints(r, "q p g y")
            key: PublicKey = dsa.DSAPublicNumbers(y, dsa.DSAParameterNumbers(p, q, g)).public_key()
        elif kind == "RSA_PUB_KEY":
            pub_e, n = _read_ints(r, "e n")
            key = rsa.RSAPublicNumbers(pub_e, n).public_key()
        else:
            raise KeyFileError(f"public key: type {kind!r} is not DSA_PUB_KEY or RSA_PUB_KEY")
    except (HandleFormatError, ValueError) as e:
        if isinstance(e, KeyFileError):
            raise
        raise KeyFileError(f"public key {kind}: {e}") from None
    return key


# -- private key files ------------------------------------------------------------------------------------
def _private_blob(key: PrivateKey) -> bytes:
    if isinstance(key, dsa.DSAPrivateKey):
        n = key.private_numbers()
        p = n.public_numbers.parameter_numbers
        return blob(b"DSA_PRIV_KEY") + b"".join(_jint(x) for x in (n.x, p.p, p.q, p.g))
    if isinstance(key, rsa.RSAPrivateKey):
        rn = key.private_numbers()
        nums = (rn.public_numbers.n, rn.public_numbers.e, rn.d, rn.p, rn.q, rn.dmp1, rn.dmq1, rn.iqmp)
        return blob(b"RSA_PRIVCRT_KEY") + b"".join(_jint(x) for x in nums)
    raise TypeError(f"not a DSA or RSA private key: {type(key).__name__}")


def _kdf_key(passphrase: bytes, salt: bytes, iterations: int, bits: int) -> bytes:
    # Java's PBEKeySpec gets each passphrase byte as a char and hashes the chars as UTF-8.
    password = "".join(chr(b) for b in passphrase).encode("utf-8")
    kdf = PBKDF2HMAC(algorithm=hashes.SHA1(), length=bits // 8, salt=salt, iterations=iterations)
    return kdf.derive(password)[:16]


def encode_private_key(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """A private key file as HANDLE.NET writes it: unprotected, or under ``passphrase`` (type 4)."""
    plain = _private_blob(key)
    if passphrase is None:
        return u32(ENCRYPT_NONE) + plain
    salt, iv = os.urandom(16), os.urandom(16)
    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(_kdf_key(passphrase, salt, _KDF_ITERATIONS, 128)), modes.CBC(iv)).encryptor()
    cipher = enc.update(data) + enc.finalize()
    return u32(ENCRYPT_PBKDF2_AES) + blob(salt) + u32(_KDF_ITERATIONS) + u32(128) + blob(iv) + blob(cipher)


def _decrypt(data: bytes, passphrase: bytes | None) -> bytes:
    r = Reader(data, "private key file")
    kind = r.u32("encryption type")
    if kind == ENCRYPT_NONE:
        return data[4:]
    if kind != ENCRYPT_PBKDF2_AES:
        raise KeyFileError(
            f"private key file: encryption type {kind} is not supported (only 1, none, and 4, PBKDF2+AES); "
            "convert the key with HANDLE.NET 9's hdl-keyutil"
        )
    if passphrase is None:
        raise PassphraseNeeded("the private key file is protected by a passphrase: give it")
    salt = r.blob("salt", cap=1024)
    iterations = r.u32("iterations")
    bits = r.u32("key length")
    iv = r.blob("iv", cap=64)
    cipher = r.blob("ciphertext")
    if not 1 <= iterations <= 10_000_000 or bits not in (128, 192, 256) or len(iv) != 16:
        raise KeyFileError("private key file: implausible PBKDF2/AES parameters")
    dec = Cipher(algorithms.AES(_kdf_key(passphrase, salt, iterations, bits)), modes.CBC(iv)).decryptor()
    try:
        unpadder = padding.PKCS7(128).unpadder()
        return unpadder.update(dec.update(cipher) + dec.finalize()) + unpadder.finalize()
    except ValueError:
        raise PassphraseNeeded("the passphrase does not open the private key file") from None


def load_private_key(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """The key in a HANDLE.NET private key file; KeyFileError (PassphraseNeeded) if it cannot be read."""
    try:
        plain = _decrypt(bytes(data), passphrase)
    except HandleFormatError as e:
        raise KeyFileError(str(e)) from None
    r, kind = _reader(plain, "private key")
    try:
        if kind == "DSA_PRIV_KEY":
            x, p, q, g = _read_ints(r, "x p q g")
            params = dsa.DSAParameterNumbers(p, q, g)
            key: PrivateKey = dsa.DSAPrivateNumbers(
                x, dsa.DSAPublicNumbers(pow(g, x, p), params)
            ).private_key()
        elif kind == "RSA_PRIVCRT_KEY":
            n, pub_e, d, p, q, dp, dq, qi = _read_ints(r, "n e d p q dp dq qinv")
            key = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(pub_e, n)).private_key()
        elif kind == "RSA_PRIV_KEY":
            raise KeyFileError(
                "private key: RSA_PRIV_KEY (modulus and exponent only) cannot sign here; "
                "use a key HANDLE.NET generated (RSA_PRIVCRT_KEY)"
            )
        else:
            raise KeyFileError(f"private key: type {kind!r} is not DSA_PRIV_KEY or RSA_PRIVCRT_KEY")
    except HandleFormatError as e:
        raise KeyFileError(f"private key {kind}: {e}") from None
    except ValueError as e:
        if isinstance(e, KeyFileError):
            raise
        raise KeyFileError(f"private key {kind}: not a valid key: {e}") from None
    return key


# -- signatures ---------------------------------------------------------------------------------------------
def _hash(alg: bytes) -> hashes.HashAlgorithm:
    name = alg.upper().replace(b"-", b"")
    if name in (HASH_SHA1, b"SHA", b"\x02"):
        return hashes.SHA1()
    if name in (HASH_SHA256.replace(b"-", b""), b"\x03"):
        return hashes.SHA256()
    raise KeyFileError(f"unknown signature hash {alg!r}")


def sign(key: PrivateKey, data: bytes, hash_alg: bytes = HASH_SHA1) -> bytes:
    """``key``'s signature of ``data``: DER (r, s) for DSA, PKCS#1 v1.5 for RSA."""
    h = _hash(hash_alg)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, PKCS1v15(), h)
    return key.sign(data, h)


def verify(key: PublicKey, hash_alg: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``key``'s signature of ``data`` (an unknown hash name is False)."""
    try:
        h = _hash(hash_alg)
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, PKCS1v15(), h)
        else:
            key.verify(signature, data, h)
    except (InvalidSignature, KeyFileError, ValueError):
        return False
    return True


# -- Diffie-Hellman (SESSION_SETUP) ---------------------------------------------------------------------------
def encode_dh_key(y: int, p: int, g: int) -> bytes:
    """A ``DH_PUB_KEY`` encoding (y, then the group)."""
    return blob(b"DH_PUB_KEY") + pack(U16, 0) + _jint(y) + _jint(p) + _jint(g)


def decode_dh_key(data: bytes) -> tuple[int, int, int]:
    """(y, p, g) of a ``DH_PUB_KEY`` encoding; HandleFormatError if it is not one."""
    r = Reader(bytes(data), "DH public key")
    kind = r.text("key type")
    if kind != "DH_PUB_KEY":
        raise HandleFormatError(f"DH public key: type {kind!r} is not DH_PUB_KEY")
    r.unpack(U16, "flags")
    y, p, g = _read_ints(r, "y p g")
    if r.remaining():
        raise HandleFormatError(f"DH public key: {r.remaining()} bytes after g")
    return y, p, g


@dataclass(frozen=True, slots=True)
class DHKey:
    """One side's Diffie-Hellman key in the group (p, g): the secret exponent and the public value y."""

    p: int
    g: int
    x: int = field(repr=False)

    @property
    def y(self) -> int:
        return pow(self.g, self.x, self.p)


def dh_keypair(p: int, g: int) -> tuple[DHKey, int]:
    """A fresh key in the group (p, g) and its public value y. Finite-field DH in RFC 2409 group 2 is what
    HANDLE.NET speaks; it is one modular exponentiation (``pow``), and the ``cryptography`` package deprecates
    it, so it is done here. The exponent has 256 random bits (``secrets``), as Java's DH provider draws."""
    if p < 23 or not 1 < g < p - 1:
        raise ValueError("not a Diffie-Hellman group")
    key = DHKey(p, g, secrets.randbits(256) | (1 << 255))
    return key, key.y


def dh_secret(key: DHKey, peer_y: int) -> bytes:
    """The shared secret with the peer's public value, big-endian and as long as p (as Java's DH gives it).
    ValueError for a peer value outside 2 .. p-2 (which would force a known secret)."""
    if not 1 < peer_y < key.p - 1:
        raise ValueError("the peer's Diffie-Hellman value is out of range")
    return pow(peer_y, key.x, key.p).to_bytes((key.p.bit_length() + 7) // 8, "big")
