# Symmetric primitives for OSCORE (carrier/oscore.py), built on what MicroPython offers everywhere:
# hashlib.sha256 and cryptolib.aes in ECB mode (mode 1; CBC/CTR are not available on every port).
#   hmac_sha256(key, *parts)        HMAC-SHA256 (RFC 2104) over the concatenation of parts
#   hkdf(salt, ikm, info, length)   HKDF-SHA256 (RFC 5869): extract then expand
#   CCM(key)                        AES-CCM (RFC 3610) with M = 8 (64-bit tag), L = 2 (13-byte nonce): COSE
#                                   algorithm 10, AES-CCM-16-64-128, the OSCORE default. encrypt()/decrypt()
#                                   work on caller buffers (in place allowed) with three preallocated 16-byte
#                                   blocks, shared by every CCM: no allocation per message.
# Keys and derived material never leave these objects except through the caller; nothing here logs.
import hashlib
import cryptolib
from micropython import const

TAG = const(8)        # CCM tag bytes (M)
NONCE = const(13)     # CCM nonce bytes (15 - L)
_ECB = const(1)
_B0_FLAGS = const(0x19)  # (M-2)/2 << 3 | (L-1): 3 << 3 | 1; +0x40 when there is associated data
_A_FLAGS = const(1)      # L - 1
_MAX_AAD = const(0xFEFF)  # 2-byte length prefix form (RFC 3610 2.2)
_MAX_MSG = const(0xFFFF)  # L = 2

# shared scratch (the firmware is single-threaded and no call here is interrupted by another):
_pad = bytearray(64)  # HMAC key block
_chain = bytearray(16)  # CCM: CBC-MAC chaining value
_counter = bytearray(16)  # CCM: counter block A_i
_keystream = bytearray(16)  # CCM: key stream block S_i


def hmac_sha256(key, *parts):
    """HMAC-SHA256 of the concatenation of parts (bytes-like) under key; 32 bytes."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    p = _pad
    n = len(key)
    for i in range(64):
        p[i] = (key[i] if i < n else 0) ^ 0x36
    h = hashlib.sha256(p)
    for x in parts:
        h.update(x)
    inner = h.digest()
    for i in range(64):
        p[i] ^= 0x6A  # 0x36 ^ 0x5C: inner pad -> outer pad
    h = hashlib.sha256(p)
    h.update(inner)
    for i in range(64):
        p[i] = 0
    return h.digest()


def hkdf(salt, ikm, info, length):
    """HKDF-SHA256 (RFC 5869); an empty or None salt means 32 zero bytes. Returns length bytes (<= 8160)."""
    if length > 255 * 32:
        raise ValueError("hkdf length")
    prk = hmac_sha256(salt or bytes(32), ikm)
    out = bytearray(length)
    t = b""
    pos = 0
    i = 0
    while pos < length:
        i += 1
        t = hmac_sha256(prk, t, info, bytes((i,)))
        k = min(32, length - pos)
        out[pos:pos + k] = t[:k]
        pos += k
    return bytes(out)


class CCM:
    """AES-CCM-16-64-128 under one 16-byte key (RFC 3610 with M = 8, L = 2)."""

    def __init__(self, key):
        if len(key) != 16:
            raise ValueError("AES-128 key must be 16 bytes")
        self._aes = cryptolib.aes(key, _ECB).encrypt

    def _absorb(self, data, off, n, j):
        """CBC-MAC over data[off:off+n] continuing at byte j of the current block; returns the new j."""
        x = _chain
        e = self._aes
        for k in range(off, off + n):
            x[j] ^= data[k]
            j += 1
            if j == 16:
                e(x, x)
                j = 0
        return j

    def _mac(self, nonce, aad, la, msg, off, n):
        """T (in _chain[:8]) for msg[off:off+n] under nonce with associated data aad[:la]."""
        x = _chain
        x[0] = _B0_FLAGS | (0x40 if la else 0)
        for k in range(13):
            x[1 + k] = nonce[k]
        x[14] = n >> 8
        x[15] = n & 255
        self._aes(x, x)
        if la:
            x[0] ^= la >> 8
            x[1] ^= la & 255
            j = self._absorb(aad, 0, la, 2)
            if j:
                self._aes(x, x)
        if n:
            if self._absorb(msg, off, n, 0):
                self._aes(x, x)

    def _stream(self, nonce, i):
        """S_i = E(K, A_i) into _keystream."""
        a = _counter
        a[0] = _A_FLAGS
        for k in range(13):
            a[1 + k] = nonce[k]
        a[14] = i >> 8
        a[15] = i & 255
        self._aes(a, _keystream)

    def _ctr(self, nonce, src, so, dst, do, n):
        s = _keystream
        for k in range(n):
            j = k & 15
            if j == 0:
                self._stream(nonce, (k >> 4) + 1)
            dst[do + k] = src[so + k] ^ s[j]

    def encrypt(self, nonce, aad, src, n, dst, alen=-1, so=0, do=0):
        """dst[do:do+n] = ciphertext of src[so:so+n], then the 8-byte tag; returns n + 8. The associated data is
        aad[:alen] (all of aad by default). dst may be src at the same offset (in place)."""
        la = len(aad) if alen < 0 else alen
        if len(nonce) != NONCE or la > _MAX_AAD or n > _MAX_MSG:
            raise ValueError("CCM parameters")
        self._mac(nonce, aad, la, src, so, n)
        self._ctr(nonce, src, so, dst, do, n)
        self._stream(nonce, 0)
        x = _chain
        s = _keystream
        for j in range(TAG):
            dst[do + n + j] = x[j] ^ s[j]
        return n + TAG

    def decrypt(self, nonce, aad, src, n, dst, alen=-1, so=0, do=0):
        """Decrypt and verify src[so:so+n] (ciphertext then 8-byte tag) into dst[do:do+n-8]; returns the plaintext
        length, or -1 when the tag does not match (dst then holds garbage, not a plaintext: do not use it)."""
        la = len(aad) if alen < 0 else alen
        if n < TAG or len(nonce) != NONCE or la > _MAX_AAD:
            return -1
        m = n - TAG
        self._ctr(nonce, src, so, dst, do, m)
        self._mac(nonce, aad, la, dst, do, m)
        self._stream(nonce, 0)
        x = _chain
        s = _keystream
        diff = 0
        for j in range(TAG):  # constant time over the tag
            diff |= src[so + m + j] ^ x[j] ^ s[j]
        return m if diff == 0 else -1
