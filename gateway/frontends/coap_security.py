"""OSCORE (RFC 8613) for the CoAP front end: device authentication and encryption with the per-device key that
``ida flash`` put in the keystore (docs/security.md).

Wiring (service assembly), before ``CoapFrontEnd.start()``::

    self.coap_security = secure_frontend(self.coap, mode, keystore_path, data_dir)   # wraps self.coap.site

The devices' security contexts (keys from the keystore, kids, the gateway's sequence numbers) are
``gateway/frontends/coap_credentials.py``.

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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiocoap
import cbor2
from aiocoap import interfaces, oscore
from aiocoap.numbers.codes import Code
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from gateway.frontends.coap import authenticated_device
from gateway.frontends.coap_credentials import (  # the names the wiring and the tests use from here
    ALGORITHM,
    SALT,
    SEQ_FILE,
    DeviceContext,
    KeystoreCredentials,
    SequenceNumbers,
    kid_of,
)
from gateway.frontends.coap_site import CONFIG, REPORT
from gateway.logfmt import kv
from gateway.metrics import COUNTER, GAUGE, Sample
from proto import devicemsg, identifier

if TYPE_CHECKING:
    from gateway.frontends.coap import CoapFrontEnd

log = logging.getLogger(__name__)

OSCORE = "oscore"
PLAIN = "plain"
MODES = (OSCORE, PLAIN)

UNAUTHORIZED = 401  # code in the error payload of a 4.01 (the device reports it as is)
PLAIN_WARNING = "PLAIN (unauthenticated, factory bench only)"
__all__ = [
    "OSCORE",
    "PLAIN",
    "MODES",
    "PLAIN_WARNING",
    "CoapSecurity",
    "secure_frontend",
    "authenticated_device",
    "ALGORITHM",
    "SALT",
    "SEQ_FILE",
    "DeviceContext",
    "KeystoreCredentials",
    "SequenceNumbers",
    "kid_of",
]


# -- the site wrappers ------------------------------------------------------------------------------------------
class _Resource(interfaces.Resource):
    """render_to_pipe only (like OscoreSiteWrapper); the abstract methods are not used."""

    def __init__(self, inner: Any, security: CoapSecurity) -> None:
        super().__init__()
        self._inner = inner
        self._sec = security

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:  # pragma: no cover
        raise RuntimeError("render_to_pipe only")

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:  # pragma: no cover
        raise RuntimeError("render_to_pipe only")

    def get_resources_as_linkheader(self) -> Any:
        return self._inner.get_resources_as_linkheader()


class _Guard(_Resource):
    """Inside OSCORE: an authenticated device may only act as itself under /d/."""

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
