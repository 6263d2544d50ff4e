"""OSCORE (RFC 8613) for the CoAP front end: device authentication and encryption with the per-device key that
``ida flash`` put in the keystore (docs/security.md).

Wiring (service assembly), before ``CoapFrontEnd.start()``::

    self.coap_security = secure_frontend(self.coap, mode, keystore_path, data_dir)   # wraps self.coap.site

Security context of a device (the firmware's ``carrier/oscore.py`` derives the same one):

    Master Secret  the device key (keystore.json, by identifier)
    Master Salt    ``SALT`` = b"ida-oscore-v1"
    Sender ID      ``GATEWAY_ID`` = b"" (the gateway)          Recipient ID  ``kid_of(identifier)`` (6 bytes)
    ID Context     none          AEAD  AES-CCM-16-64-128        HKDF  SHA-256        replay window 32

What the wrapper does, in this order:

1. ``mode="oscore"``: a request without an OSCORE option gets **4.01 Unauthorized** unless it is for
   ``/.well-known/core`` (or ``/r/...`` when ``plain_resolve``). ``mode="plain"`` (factory bench): unprotected
   requests pass, logged as a warning at start and shown in /healthz and /metrics; protected ones are still
   verified.
2. aiocoap's ``OscoreSiteWrapper`` finds the device's context by kid (:class:`KeystoreCredentials`; keys are
   read from the keystore file, re-read when it changes), verifies and decrypts. Unknown kid -> 4.01, bad tag ->
   4.00 "Decryption failed", replay -> 4.01; a context the gateway has no replay state for yet (first request
   after a gateway start) answers one protected 4.01 with an Echo option and accepts the repetition carrying it
   (RFC 8613 B.1.2 / RFC 9175).
3. The decrypted request reaches the site with ``request.remote.authenticated_claims == [identifier]`` -- the
   interface resources use (:func:`authenticated_device`). Before the site sees it, the guard answers
   **4.03** (protected) when an authenticated device addresses ``/d/<another identifier>/...`` or sends a
   report / config ack whose ``id`` (key 2) is not its own.

Responses that carry the gateway's own Partial IV (the Echo 4.01, Observe notifications) take sequence numbers
from :class:`SequenceNumbers`, one counter shared by every device context, reserved ahead in a file under the
data dir (flock'd: gateway processes sharing a data dir never reuse a number; a crash skips at most a block).
Keys never reach a log line: contexts' ``repr`` names the device and kid only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiocoap
import cbor2
from aiocoap import interfaces, oscore
from aiocoap.numbers.codes import Code
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from gateway.logfmt import kv
from gateway.metrics import COUNTER, GAUGE, Sample
from proto import devicemsg, identifier

if TYPE_CHECKING:
    from gateway.frontends.coap import CoapFrontEnd

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

OSCORE = "oscore"
PLAIN = "plain"
MODES = (OSCORE, PLAIN)

SALT = b"ida-oscore-v1"
KID_TAG = b"ida-oscore-kid\x00"
KID_LEN = 6
GATEWAY_ID = b""
ALGORITHM = "AES-CCM-16-64-128"
REPLAY_WINDOW = 32
SEQ_FILE = "oscore-seq.json"
UNAUTHORIZED = 401  # code in the error payload of a 4.01 (the device reports it as is)
PLAIN_WARNING = "PLAIN (unauthenticated, factory bench only)"
REPORT = "rpt"  # docs/protocol.md: /d/<id>/rpt and /d/<id>/cfg
CONFIG = "cfg"


def kid_of(ident: str) -> bytes:
    """The OSCORE Sender ID of a device: the first 6 bytes of SHA-256("ida-oscore-kid" 0x00 identifier)."""
    return hashlib.sha256(KID_TAG + identifier.normalise(ident).encode()).digest()[:KID_LEN]


def authenticated_device(request: aiocoap.Message) -> str | None:
    """The identifier the request was authenticated as (OSCORE), None for an unprotected request."""
    try:
        claims = list(request.remote.authenticated_claims)
    except Exception:
        return None
    for c in claims:
        if isinstance(c, str):
            return c
    return None


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
            self._contexts.popitem(
                last=False
            )  # its replay state is gone: that device's next request goes via Echo
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


# -- the site wrappers ------------------------------------------------------------------------------------------
class _Resource(interfaces.Resource):
    """render_to_pipe only (like OscoreSiteWrapper); the abstract methods are not used."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self._inner = inner

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:  # pragma: no cover
        raise RuntimeError("render_to_pipe only")

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:  # pragma: no cover
        raise RuntimeError("render_to_pipe only")

    def get_resources_as_linkheader(self) -> Any:
        return self._inner.get_resources_as_linkheader()


class _Guard(_Resource):
    """Inside OSCORE: an authenticated device may only act as itself under /d/."""

    def __init__(self, inner: Any, security: CoapSecurity) -> None:
        super().__init__(inner)
        self._sec = security

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        device = authenticated_device(request)
        if device is not None:
            self._sec.counts["authenticated"] += 1
            refusal = _impersonation(request, device)
            if refusal is not None:
                self._sec.counts["forbidden"] += 1
                log.warning("device refused %s", kv(device=device, reason=refusal))
                self._sec.metrics_count(devicemsg.FORBIDDEN)
                pipe.add_response(_error(Code.FORBIDDEN, devicemsg.FORBIDDEN, refusal), is_last=True)
                return
        await self._inner.render_to_pipe(pipe)


def _error(coap_code: Code, code: int, msg: str) -> aiocoap.Message:
    """An error answer with an ``error`` payload (CF 60), as the front end writes them."""
    return aiocoap.Message(code=coap_code, payload=devicemsg.dumps({3: code, 9: msg}), content_format=60)


def _impersonation(request: aiocoap.Message, device: str) -> str | None:
    """Why ``device`` may not make this request (it names another device), or None."""
    path = request.opt.uri_path
    if not path or path[0] != "d":
        return None
    rest = path[1:]
    if len(rest) < 2 or rest[-1] not in (REPORT, CONFIG):
        return None  # the front end answers 4.04
    try:
        target = identifier.normalise("/".join(rest[:-1]))
    except identifier.IdentifierError:
        return None  # the front end answers 4.00
    if target != device:
        return f"authenticated as {device}, not {target}"
    if request.code == Code.POST and request.payload:
        try:
            claimed = cbor2.loads(request.payload).get(2)
        except Exception:
            return None  # not a map: the front end answers 4.00
        if isinstance(claimed, str):
            try:
                if identifier.normalise(claimed) != device:
                    return f"authenticated as {device}, payload claims {claimed}"
            except identifier.IdentifierError:
                return None
    return None


class _Gate(_Resource):
    """Outside OSCORE: in oscore mode, unprotected requests get 4.01 except the allowed paths."""

    def __init__(self, inner: Any, security: CoapSecurity) -> None:
        super().__init__(inner)
        self._sec = security

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        path = request.opt.uri_path
        if path[:2] == (".well-known", "edhoc"):
            pipe.add_response(aiocoap.Message(code=Code.NOT_FOUND), is_last=True)
            return
        if request.opt.oscore is None:
            if self._sec.mode == OSCORE and not self._sec.open_path(path):
                self._sec.counts["unauthenticated"] += 1
                self._sec.metrics_count(UNAUTHORIZED)
                msg = "OSCORE required: this gateway only serves authenticated devices"
                pipe.add_response(_error(Code.UNAUTHORIZED, UNAUTHORIZED, msg), is_last=True)
                return
            if path[:1] != (".well-known",):
                self._sec.counts["plain"] += 1
        else:
            try:
                oscore.verify_start(request)
            except (oscore.DecodeError, IndexError):
                # Fuzz finding: aiocoap's site wrapper lets these out of a malformed OSCORE option (reserved
                # bits, a kid context or Partial IV announced but missing): 5.00 and an ERROR traceback per
                # datagram, on demand. RFC 8613 8.2: 4.02 Bad Option.
                self._sec.metrics_count(devicemsg.BAD_REQUEST)
                bad = _error(Code.BAD_OPTION, devicemsg.BAD_REQUEST, "malformed OSCORE option")
                pipe.add_response(bad, is_last=True)
                return
            self._sec.counts["protected"] += 1
        await self._inner.render_to_pipe(pipe)


class CoapSecurity:
    """Mode, credentials and counters of the secured CoAP front end."""

    def __init__(
        self,
        mode: str,
        keystore: str | os.PathLike[str],
        data_dir: str | os.PathLike[str],
        *,
        plain_resolve: bool = False,
        metrics: Any = None,
        instance: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"[coap] security must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.plain_resolve = plain_resolve
        self.metrics = metrics
        self.credentials = KeystoreCredentials(
            keystore, SequenceNumbers(Path(data_dir) / SEQ_FILE, instance=instance)
        )
        self.counts = {"protected": 0, "authenticated": 0, "unauthenticated": 0, "forbidden": 0, "plain": 0}

    def open_path(self, path: tuple[str, ...]) -> bool:
        return path == (".well-known", "core") or (self.plain_resolve and path[:1] == ("r",))

    def wrap(self, site: Any) -> interfaces.Resource:
        """The site to serve instead of ``site``."""
        return _Gate(OscoreSiteWrapper(_Guard(site, self), self.credentials), self)

    def label(self) -> str:
        return "oscore" if self.mode == OSCORE else PLAIN_WARNING

    def health(self) -> dict[str, str]:
        """For /healthz: ``{"coap_security": "oscore"}`` or the plain-mode warning."""
        return {"coap_security": self.label()}

    def metrics_count(self, code: int) -> None:
        if self.metrics is not None:
            self.metrics.count_request("coap", code)

    def samples(self) -> Iterable[Sample]:
        yield "ida_coap_plain_mode", {}, 1.0 if self.mode == PLAIN else 0.0
        yield "ida_coap_keystore_devices", {}, float(self.credentials.devices)
        for result, n in self.counts.items():
            yield "ida_coap_security_requests_total", {"result": result}, float(n)


def secure_frontend(
    fe: CoapFrontEnd,
    mode: str,
    keystore: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    plain_resolve: bool = False,
    instance: int = 0,
) -> CoapSecurity:
    """Wrap ``fe.site`` (call before ``fe.start()``), register metrics, log the mode. Returns the CoapSecurity
    (``.health()`` for /healthz). ``instance``: see :class:`SequenceNumbers`."""
    sec = CoapSecurity(
        mode, keystore, data_dir, plain_resolve=plain_resolve, metrics=fe.metrics, instance=instance
    )
    fe.site = sec.wrap(fe.site)
    m = fe.metrics
    m.declare(
        "ida_coap_plain_mode",
        GAUGE,
        "1 when the CoAP front end accepts unauthenticated requests (factory bench).",
    )
    m.declare(
        "ida_coap_keystore_devices", GAUGE, "Devices with a key in the keystore the CoAP front end reads."
    )
    m.declare(
        "ida_coap_security_requests_total",
        COUNTER,
        "CoAP requests by security outcome (protected, authenticated, unauthenticated, forbidden, plain).",
        ("result",),
    )
    m.add_collector(sec.samples)
    if mode == PLAIN:
        log.warning(
            "coap security is PLAIN: unauthenticated requests are served (factory bench only) %s",
            kv(keystore=str(keystore), devices=sec.credentials.devices),
        )
    else:
        log.info(
            "coap security oscore %s",
            kv(keystore=str(keystore), devices=sec.credentials.devices, plain_resolve=plain_resolve),
        )
    return sec
