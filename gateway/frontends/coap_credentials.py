"""OSCORE (RFC 8613) security contexts of the CoAP front end's devices (gateway/frontends/coap_security.py wraps
the site with them): the keystore lookups, each device's context, and the gateway's sequence numbers.

Security context of a device (the firmware's ``carrier/oscore.py`` derives the same one):

    Master Secret  the device key (keystore.json, by identifier)
    Master Salt    ``SALT`` = b"ida-oscore-v1"
    Sender ID      ``GATEWAY_ID`` = b"" (the gateway)          Recipient ID  ``kid_of(identifier)`` (6 bytes)
    ID Context     none          AEAD  AES-CCM-16-64-128        HKDF  SHA-256        replay window 32

:class:`KeystoreCredentials` finds a device's context by kid (keys read from the keystore file, re-read when it
changes; two devices whose kids collide are told apart by trial decryption). Responses that carry the gateway's
own Partial IV (the Echo 4.01, Observe notifications) take sequence numbers from :class:`SequenceNumbers`, one
counter shared by every device context, reserved ahead in a file under the data dir (flock'd: gateway processes
sharing a data dir never reuse a number; a crash skips at most a block). Keys never reach a log line: contexts'
``repr`` names the device and kid only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import oscore

from gateway.logfmt import kv
from proto import identifier

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SALT",
    "KID_TAG",
    "KID_LEN",
    "GATEWAY_ID",
    "ALGORITHM",
    "REPLAY_WINDOW",
    "SEQ_FILE",
    "kid_of",
    "SequenceNumbers",
    "DeviceContext",
    "KeystoreCredentials",
]

log = logging.getLogger(__name__)

SALT = b"ida-oscore-v1"
KID_TAG = b"ida-oscore-kid\x00"
KID_LEN = 6
GATEWAY_ID = b""
ALGORITHM = "AES-CCM-16-64-128"
REPLAY_WINDOW = 32
SEQ_FILE = "oscore-seq.json"


def kid_of(ident: str) -> bytes:
    """The OSCORE Sender ID of a device: the first 6 bytes of SHA-256("ida-oscore-kid" 0x00 identifier)."""
    return hashlib.sha256(KID_TAG + identifier.normalise(ident).encode()).digest()[:KID_LEN]


# -- gateway sender sequence numbers ---------------------------------------------------------------------------
class SequenceNumbers:
    """One counter for every device context's responses with a Partial IV: unique per key because unique overall.
    Blocks of ``block`` numbers are reserved in ``path`` (JSON ``{"next": n}``) under an exclusive flock before
    any number of the block is used. ``instance`` (0-255) goes in the top 8 of the 40 bits: gateways on
    different hosts (different files) that may answer the same device must have different instances."""

    def __init__(self, path: str | os.PathLike[str], block: int = 1000, instance: int = 0) -> None:
        if not 0 <= instance <= 255:
            raise ValueError("gateway instance must be 0-255")
        self.path = Path(path)
        self.block = block
        self.base = instance << 32
        self._next = 0
        self._limit = 0

    def peek(self) -> int:
        return self.base | self._next

    def take(self) -> int:
        if self._next >= self._limit:
            self._reserve()
        n = self._next
        if n >= 1 << 32:
            raise oscore.ContextUnavailable("gateway sequence numbers exhausted")
        self._next += 1
        return self.base | n

    def _reserve(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                start = int(json.loads(self.path.read_text())["next"])
            except FileNotFoundError:
                start = 0
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise oscore.ContextUnavailable(
                    f"{self.path}: unreadable sequence number file ({e})"
                ) from None
            start = max(start, self._next)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"next": start + self.block}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._next, self._limit = start, start + self.block
        finally:
            os.close(fd)


# -- one device's security context ------------------------------------------------------------------------------
class DeviceContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """The gateway's side of a device's OSCORE context (keys derived once, replay state in memory: after a
    gateway start the first request of the device goes through Echo recovery)."""

    def __init__(self, device: str, key: bytes, seqnos: SequenceNumbers) -> None:
        self.device = device
        self.authenticated_claims = [device]
        self.alg_aead = oscore.algorithms[ALGORITHM]
        self.hashfun = oscore.hashfunctions["sha256"]
        self.id_context = None
        self.sender_id = GATEWAY_ID
        self.recipient_id = kid_of(device)
        self.derive_keys(SALT, key)
        self.recipient_replay_window = oscore.ReplayWindow(REPLAY_WINDOW, lambda: None)
        self.echo_recovery = secrets.token_bytes(8)
        self._seqnos = seqnos
        self.fingerprint = hashlib.sha256(key).hexdigest()[:8]

    def __repr__(self) -> str:  # never the keys
        return f"<DeviceContext {self.device} kid={self.recipient_id.hex()}>"

    @property  # type: ignore[override]
    def sender_sequence_number(self) -> int:
        return self._seqnos.peek()

    def new_sequence_number(self) -> int:
        return self._seqnos.take()

    def post_seqnoincrease(self) -> None:
        pass  # SequenceNumbers persists ahead


class _TrialContext(oscore.CanProtect, oscore.CanUnprotect):
    """Two devices whose kids collide (6 bytes: rare): try each context; the one whose tag verifies wins. Made
    per request, so the winner is that request's."""

    def __init__(self, candidates: list[DeviceContext]) -> None:
        self._candidates = candidates
        self._winner: DeviceContext | None = None

    @property
    def authenticated_claims(self) -> list[str]:  # type: ignore[override]
        return self._winner.authenticated_claims if self._winner else []

    def unprotect(self, protected_message: aiocoap.Message, request_id: Any = None) -> Any:
        last: Exception = oscore.ProtectionInvalid("no candidate context")
        for c in self._candidates:
            try:
                res = c.unprotect(protected_message, request_id)
            except oscore.ReplayErrorWithEcho:
                self._winner = c
                raise
            except oscore.ProtectionInvalid as e:
                last = e
                continue
            self._winner = c
            return res
        raise last

    def context_for_response(self) -> Any:
        if self._winner is None:
            raise oscore.ContextUnavailable("no verified context")
        return self._winner

    def post_seqnoincrease(self) -> None:  # pragma: no cover - never protects itself
        pass


class KeystoreCredentials:
    """The server credentials aiocoap's OscoreSiteWrapper asks: ``find_oscore(unprotected)`` -> the context of
    the device whose kid the request carries. Keys come from the keystore file (``tools/commands/flash/keystore.py``
    format), re-read at most every ``reload_interval`` s when the file changed (mtime, ctime, size or inode: an
    atomic replace within the file system's timestamp granularity is still seen), so a newly flashed device is
    accepted without a restart. Derived contexts are kept (LRU, ``max_contexts``)."""

    def __init__(
        self,
        keystore: str | os.PathLike[str],
        seqnos: SequenceNumbers,
        *,
        max_contexts: int = 10000,
        reload_interval: float = 2.0,
    ) -> None:
        self.path = Path(keystore)
        self.seqnos = seqnos
        self.max_contexts = max_contexts
        self.reload_interval = reload_interval
        self._keys: dict[str, bytes] = {}
        self._by_kid: dict[bytes, list[str]] = {}
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = 0.0
        self._contexts: OrderedDict[str, DeviceContext] = OrderedDict()
        self.reload()

    @property
    def devices(self) -> int:
        return len(self._keys)

    def reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._keys:
                log.warning("keystore gone; no device can authenticate %s", kv(path=str(self.path)))
            self._keys, self._by_kid, self._stamp = {}, {}, None
            self._contexts.clear()
            return
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            entries = doc["keys"]
            keys = {identifier.normalise(i): bytes.fromhex(e["key"]) for i, e in entries.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error(
                "keystore unreadable, keeping the previous keys %s",
                kv(path=str(self.path), error=type(e).__name__),
            )
            return
        by_kid: dict[bytes, list[str]] = {}
        for ident in keys:
            by_kid.setdefault(kid_of(ident), []).append(ident)
        for k, idents in by_kid.items():
            if len(idents) > 1:
                log.warning(
                    "kid collision, resolved by trial decryption %s", kv(kid=k, devices=",".join(idents))
                )
        for ident in [
            i for i, c in self._contexts.items() if keys.get(i) is None or c.fingerprint != _fp(keys[i])
        ]:
            del self._contexts[ident]  # removed or re-keyed device
        self._keys, self._by_kid, self._stamp = keys, by_kid, stamp
        log.info("keystore loaded %s", kv(path=str(self.path), devices=len(keys)))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked >= self.reload_interval:
            self._checked = now
            self.reload()

    def context(self, ident: str) -> DeviceContext | None:
        c = self._contexts.get(ident)
        if c is not None:
            self._contexts.move_to_end(ident)
            return c
        key = self._keys.get(ident)
        if key is None:
            return None
        c = DeviceContext(ident, key, self.seqnos)
        self._contexts[ident] = c
        while len(self._contexts) > self.max_contexts:
            # its replay state is gone: that device's next request goes via Echo
            self._contexts.popitem(last=False)
        return c

    def find_oscore(self, unprotected: dict[int, Any]) -> Any:
        if oscore.COSE_KID_CONTEXT in unprotected:
            raise KeyError("kid context not used")
        kid = unprotected.get(oscore.COSE_KID)
        if not isinstance(kid, bytes):
            raise KeyError("no kid")
        idents = self._by_kid.get(kid)
        if not idents:
            self._maybe_reload()
            idents = self._by_kid.get(kid)
        if not idents:
            raise KeyError(kid)
        ctxs = [c for c in (self.context(i) for i in idents) if c is not None]
        if not ctxs:
            raise KeyError(kid)
        return ctxs[0] if len(ctxs) == 1 else _TrialContext(ctxs)

    def get(self, _key: str, default: Any = None) -> Any:
        return default  # no EDHOC credentials (OscoreSiteWrapper asks for them on /.well-known/edhoc)

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        return set(self._by_kid)


def _fp(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]
