"""CoAP front end (aiocoap), exactly as docs/protocol.md "CoAP" says.

    GET  /r/<prefix>/<suffix segments...>[?type=T&index=N]   resolve (CF 60 CBOR default, CF 50 JSON on Accept: 50)
    POST /d/<id segments...>/rpt                              report -> 2.04 report_ack
    GET  /d/<id segments...>/cfg   (observable)               desired config -> 2.05 config / 4.04
    POST /d/<id segments...>/cfg                              config_ack -> 2.04
    GET  /.well-known/core                                    link format

Resolve answers carry ``Max-Age`` (remaining lifetime) and an 8-byte ``ETag``; a request whose ETag matches
gets 2.03 Valid. Answers larger than one block go block-wise (RFC 7959): aiocoap's ``Block2Cache`` splits any
response bigger than the peer's maximum payload (1024 B over UDP) and serves the later blocks from the
assembled response. Errors carry an ``error`` payload (CF 60).

The front end owns the UDP socket (``gateway/frontends/coap_socket.py``) with or without the fast path. Cached
resolutions are answered by the fast path (``gateway/frontends/coap_fast.py``), which hands every other datagram to
aiocoap (``gateway/frontends/coap_aiocoap.py``, the only module that plugs into aiocoap's message layer);
:meth:`CoapFrontEnd.resolve` tells it (``learn``) each answer it may serve from then on. ``fast_path=False`` hands
every datagram to aiocoap.

Rate limits (``limiter``, gateway/ratelimit.py): per source IP for every request, and per device for
``/d/<id>/…`` (or the OSCORE-authenticated device); over the limit the answer is 4.29 with ``Max-Age`` = whole
seconds until a token is there, counted in ``ida_ratelimited_total{frontend="coap"}``.

Routing uses aiocoap's ``Site`` (``gateway/frontends/coap_site.py``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiocoap
from aiocoap import optiontypes
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber

from gateway.errors import Overloaded
from gateway.frontends import coap_aiocoap
from gateway.frontends.coap_reports import ReportPath
from gateway.frontends.coap_site import CONFIG, REPORT, build_site
from gateway.frontends.coap_socket import CoapSocket
from gateway.frontends.common import (
    InFlight,
    Listener,
    failure,
    json_etag,
    parse_filters,
    resolution_payload,
)
from gateway.logfmt import kv
from gateway.ratelimit import retry_after, source_of_sockaddr
from gateway.resolution import Answer, AnswerCache, etag_of, resolve_noted
from proto import devicemsg, identifier

if TYPE_CHECKING:
    from gateway.frontends.coap_fast import FastPath

log = logging.getLogger(__name__)

CF_CBOR = ContentFormat.CBOR  # 60
CF_JSON = ContentFormat.JSON  # 50
_CF_OPTION = {
    as_json: OptionNumber.CONTENT_FORMAT.create_option(value=CF_JSON if as_json else CF_CBOR)
    for as_json in (False, True)
}

# docs/protocol.md "Codes": wire code -> CoAP response code.
COAP_CODE: dict[int, Code] = {
    devicemsg.OK: Code.CONTENT,
    devicemsg.NOT_FOUND: Code.NOT_FOUND,
    devicemsg.VALUES_NOT_FOUND: Code.NOT_FOUND,
    devicemsg.NOT_MODIFIED: Code.VALID,
    devicemsg.BAD_REQUEST: Code.BAD_REQUEST,
    devicemsg.FORBIDDEN: Code.FORBIDDEN,
    devicemsg.TOO_LARGE: Code.REQUEST_ENTITY_TOO_LARGE,
    devicemsg.RATE_LIMITED: Code.TOO_MANY_REQUESTS,
    devicemsg.INTERNAL: Code.INTERNAL_SERVER_ERROR,
    devicemsg.UPSTREAM_UNAVAILABLE: Code.SERVICE_UNAVAILABLE,
    devicemsg.UPSTREAM_TIMEOUT: Code.GATEWAY_TIMEOUT,
}


def error_message(
    code: int, msg: str, *, ident: str | None = None, max_age: int | None = None
) -> aiocoap.Message:
    """An error response: the CoAP code for ``code`` and an ``error`` payload (CF 60)."""
    fields: dict[str, Any] = {"code": code, "msg": msg}
    if ident is not None:
        fields["id"] = ident
    if max_age is not None and code in (
        devicemsg.NOT_FOUND,
        devicemsg.VALUES_NOT_FOUND,
        devicemsg.RATE_LIMITED,
    ):
        fields["ttl"] = max_age
    m = aiocoap.Message(
        code=COAP_CODE[code], payload=devicemsg.encode("error", fields), content_format=CF_CBOR
    )
    if max_age is not None:
        m.opt.max_age = max_age
    elif code >= 500:
        m.opt.max_age = 0  # do not let an intermediary keep a failure for the default 60 s
    return m


@dataclass(eq=False, repr=False, kw_only=True)
class CoapFrontEnd(Listener):
    """The CoAP server (:class:`Listener`'s settings, and ``fast_path``; ``answers`` is the resolver's
    :class:`gateway.resolution.AnswerCache`, which the fast path keeps its table equal to)."""

    fast_path: bool = True
    answers: AnswerCache | None = None

    def __post_init__(self) -> None:
        self._ctx: aiocoap.Context | None = None
        self._inflight = InFlight()
        self._closing = False
        self.address: tuple[str, int] | None = None
        self.site, self._resolve_resource, self.devices = build_site(self)
        self._plain_site = self.site  # a wrapper (OSCORE) put in its place turns the fast path's learning off
        self.fast: FastPath | None = None
        self.socket: CoapSocket | None = None
        self.bridge: coap_aiocoap.Bridge | None = None

    @property
    def in_flight(self) -> int:
        return self._inflight.count

    async def start(self) -> tuple[str, int]:
        """Bind the socket, plug it into aiocoap's message layer (and the fast path in front of it)."""
        loop = asyncio.get_running_loop()

        def changed(ident: str, _fields: dict[str, Any]) -> None:  # may be called from another thread
            loop.call_soon_threadsafe(self.devices.notify, ident)

        self.registry.on_config_change(changed)
        sock = self.socket = CoapSocket()
        self.address = await sock.open(self.host, self.port)
        self._ctx = aiocoap.Context(loop=loop, serversite=self.site, loggername="coap-server")
        bridge = self.bridge = await coap_aiocoap.attach(self._ctx, coap_aiocoap.Bridge(sock, self._closed))
        if not self.fast_path:
            sock.serve(bridge)
            return self.address
        from gateway.frontends.coap_fast import FastPath

        self.fast = FastPath(
            self.resolver,
            bridge,
            sock,
            clock=self.clock,
            limiter=lambda: getattr(self, "limiter", None),
            learning=self.site is self._plain_site,
            miss=self.render_resolve,
            answers=self.answers,
            note=self.note,
        )
        if (
            self.fast.learning
        ):  # a plain site: reports from the socket to the registry (OSCORE: aiocoap's path)
            self.fast.reports = ReportPath(
                self.registry,
                self.fast.server,
                send=lambda out, route: sock.send(out, *route),
                arm=self.fast.arm,
                limiter=lambda: self.limiter,
                count_limited=lambda limit: self.metrics.count_ratelimited("coap", limit),
                error_answer=error_message,
                inflight=self._inflight,
            )
        sock.serve(self.fast)
        self.metrics.add_collector(self.fast.samples, add=True)
        return self.address

    def _closed(self) -> None:
        """aiocoap shut its transport down (``Context.shutdown``): close the fast path and the socket."""
        if self.fast is not None:
            self.fast.close()
        if self.socket is not None:
            self.socket.close()

    async def stop(self, timeout: float = 5.0) -> None:
        """Answer new requests with 5.03, wait up to ``timeout`` s for those in flight, then close the socket."""
        self._closing = True
        if self.fast is not None:
            self.fast.serving = False  # every request goes to aiocoap, which answers 5.03
        if not await self._inflight.drain(timeout):
            log.warning("coap stopping with requests still in flight %s", kv(count=self._inflight.count))
        if self._ctx is not None:
            await self._ctx.shutdown()
            self._ctx = None

    # -- request handling ----------------------------------------------------------------------------------
    def _finish(self, code: int, response: aiocoap.Message) -> aiocoap.Message:
        self.metrics.count_request("coap", code)
        return response

    def _fail(self, code: int, msg: str, **kw: Any) -> aiocoap.Message:
        return self._finish(code, error_message(code, msg, **kw))

    def _limited(self, request: aiocoap.Message, device: str | None) -> aiocoap.Message | None:
        """4.29 (Max-Age = seconds until allowed) when a rate limit refuses the request, else None."""
        if self.limiter is None or not getattr(self.limiter, "enabled", True):  # no bucket: nothing to take
            return None
        verdict = self.limiter.check(device=authenticated_device(request) or device, source=_source(request))
        if not verdict.limited:
            return None
        self.metrics.count_ratelimited("coap", verdict.limit or "device")
        wait = retry_after(verdict.wait)
        return self._fail(
            devicemsg.RATE_LIMITED, f"rate limited ({verdict.limit}); retry in {wait} s", max_age=wait
        )

    async def resolve(self, request: aiocoap.Message, path: tuple[str, ...] | None = None) -> aiocoap.Message:
        """``GET /r/<path>``: ``path`` is the identifier's segments (the request's Uri-Path when None)."""
        if self._closing:
            return self._fail(devicemsg.UPSTREAM_UNAVAILABLE, "gateway is shutting down")
        if (limited := self._limited(request, None)) is not None:
            return limited
        with self._inflight:
            accept = request.opt.accept
            if accept is not None and accept not in (CF_CBOR, CF_JSON):
                return self._finish(
                    devicemsg.BAD_REQUEST,
                    aiocoap.Message(
                        code=Code.NOT_ACCEPTABLE,
                        payload=devicemsg.encode(
                            "error",
                            {"code": devicemsg.BAD_REQUEST, "msg": "Accept must be 60 (CBOR) or 50 (JSON)"},
                        ),
                        content_format=CF_CBOR,
                    ),
                )
            ident = "/".join(request.opt.uri_path if path is None else path)
            try:
                types, indexes = _query(request)
                answer = await resolve_noted(self.resolver, self.note, "coap", ident, types, indexes)
            except Exception as e:
                code, msg = failure(e)
                return self._fail(code, msg)
            response = self._answer(request, answer, accept == CF_JSON)
            if self.fast is not None:  # once the answer is sent: the next loop turn, before the next datagram
                asyncio.get_running_loop().call_soon(
                    self.fast.learn, request, answer, types, indexes, accept == CF_JSON, response
                )
            return response

    async def render_resolve(self, request: aiocoap.Message) -> aiocoap.Message:
        """``GET /r/...`` rendered by the ``/r`` resource (block-wise included) for a request that did not come
        through aiocoap's routing: a fast-path miss (its Uri-Path still begins with ``r``; no Block or
        No-Response option, so what aiocoap's ``Resource.render`` would add is nothing)."""
        return await self._resolve_resource.answer(request, request.opt.uri_path[1:])

    def _answer(self, request: aiocoap.Message, answer: Answer, as_json: bool) -> aiocoap.Message:
        now = self.clock()
        max_age = answer.max_age(now)
        if answer.code != devicemsg.OK or answer.record is None:
            msg = "handle not found" if answer.code == devicemsg.NOT_FOUND else "no value matches the filter"
            return self._fail(answer.code, msg, ident=answer.handle, max_age=max_age)
        etag = answer.etag or etag_of(answer.record, answer.code)
        if as_json:
            etag = json_etag(etag)
        if etag in request.opt.etags:
            valid = aiocoap.Message(code=Code.VALID)
            valid.opt.etag = etag
            valid.opt.max_age = max_age
            return self._finish(devicemsg.NOT_MODIFIED, valid)
        payload = resolution_payload(answer, as_json, now, answer.source)
        # The options added as objects (what the content_format / etag / max_age setters would add, without their
        # delete-and-create round); the Content-Format option objects are shared, nothing changes an option.
        response = aiocoap.Message(code=Code.CONTENT, payload=payload)
        opt = response.opt
        opt.add_option(_CF_OPTION[as_json])
        opt.add_option(optiontypes.OpaqueOption(OptionNumber.ETAG, etag))
        opt.add_option(optiontypes.UintOption(OptionNumber.MAX_AGE, max_age))
        # counted on the next loop turn, once the answer is sent
        asyncio.get_running_loop().call_soon(self.metrics.count_request, "coap", devicemsg.OK)
        return response

    async def device(self, request: aiocoap.Message) -> aiocoap.Message:
        """POST .../rpt, GET .../cfg, POST .../cfg (the path is what follows /d/)."""
        if self._closing:
            return self._fail(devicemsg.UPSTREAM_UNAVAILABLE, "gateway is shutting down")
        if (limited := self._limited(request, _path_device(request.opt.uri_path))) is not None:
            return limited
        with self._inflight:
            path = request.opt.uri_path
            leaf = path[-1] if path else ""
            if leaf not in (REPORT, CONFIG) or len(path) < 2:
                return self._fail(devicemsg.NOT_FOUND, "no such resource: use /d/<id>/rpt or /d/<id>/cfg")
            allowed = (Code.POST,) if leaf == REPORT else (Code.GET, Code.POST)
            if request.code not in allowed:
                return self._finish(devicemsg.BAD_REQUEST, aiocoap.Message(code=Code.METHOD_NOT_ALLOWED))
            if request.code == Code.POST and request.opt.content_format not in (None, CF_CBOR):
                return self._finish(
                    devicemsg.BAD_REQUEST, aiocoap.Message(code=Code.UNSUPPORTED_CONTENT_FORMAT)
                )
            try:
                ident = identifier.normalise("/".join(path[:-1]))
                if leaf == CONFIG and request.code == Code.GET:
                    return self._get_config(ident)
                if leaf == REPORT:
                    report = devicemsg.decode_report(request.payload)
                    if identifier.normalise(report.id) != ident:
                        return self._fail(
                            devicemsg.FORBIDDEN, f"payload id {report.id!r} is not the device in the path"
                        )
                    return await self._report(request, ident, report)
                fields = devicemsg.decode("config_ack", request.payload)
                if identifier.normalise(fields["id"]) != ident:
                    return self._fail(
                        devicemsg.FORBIDDEN, f"payload id {fields['id']!r} is not the device in the path"
                    )
                self.registry.record_config_ack(ident, fields["cfgver"], fields["code"], fields.get("msg"))
                log.info("config ack %s", kv(device=ident, cfgver=fields["cfgver"], code=fields["code"]))
                return self._finish(devicemsg.OK, aiocoap.Message(code=Code.CHANGED))
            except (identifier.IdentifierError, devicemsg.WireError) as e:
                return self._fail(*failure(e))
            except ValueError as e:  # the registry refuses a field (a boot count beyond SQLite's integers)
                return self._fail(devicemsg.BAD_REQUEST, str(e))
            except Exception as e:
                return self._fail(*failure(e))

    async def _report(
        self, request: aiocoap.Message, ident: str, report: devicemsg.Report
    ) -> aiocoap.Message:
        """A report the fast path did not take (OSCORE-protected, or the fast path off): the same answers as
        ``coap_reports.ReportPath`` gives, through aiocoap."""
        try:
            fut = self.registry.submit_report(ident, report, "coap", _peer(request))
        except Overloaded as e:  # nothing stored: the device waits Max-Age and sends it again
            return self._fail(devicemsg.UPSTREAM_UNAVAILABLE, str(e), max_age=e.retry_after)
        new = await fut  # group commit: answered once its batch is durable
        log.debug("report %s", kv(device=ident, boot=report.boot, seq=report.seq, new=new))
        # the cfgver: the device fetches its config when it holds an older one (e.g. it missed a notification)
        ack = devicemsg.encode_report_ack(
            report.boot, report.seq, devicemsg.OK, self.registry.desired_cfgver(ident)
        )
        return self._finish(
            devicemsg.OK, aiocoap.Message(code=Code.CHANGED, payload=ack, content_format=CF_CBOR)
        )

    def _get_config(self, ident: str) -> aiocoap.Message:
        desired = self.registry.desired_config(ident)
        if desired is None:
            return self._fail(devicemsg.NOT_FOUND, "no desired config", ident=ident)
        keys = devicemsg.MESSAGES["config"][0] + devicemsg.MESSAGES["config"][1]
        payload = devicemsg.encode(
            "config", {k: v for k, v in desired.items() if k in keys and v is not None}
        )
        return self._finish(
            devicemsg.OK, aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)
        )


def _query(request: aiocoap.Message) -> tuple[tuple[str, ...], tuple[int, ...]]:
    queries = request.opt.uri_query
    if not queries:
        return (), ()
    types: list[str] = []
    indexes: list[str] = []
    for q in queries:
        key, _, value = q.partition("=")
        if key == "type":
            types.append(value)
        elif key == "index":
            indexes.append(value)
    return parse_filters(types, indexes)


def _path_device(path: tuple[str, ...]) -> str | None:
    """The device a ``/d/<id>/<leaf>`` path names (normalised), None when it names none."""
    if len(path) < 2:
        return None
    try:
        return identifier.normalise("/".join(path[:-1]))
    except identifier.IdentifierError:
        return None


def authenticated_device(request: aiocoap.Message) -> str | None:
    """The identifier an OSCORE-protected request was verified as (gateway/frontends/coap_security.py), None for
    an unprotected request."""
    try:
        claims = list(request.remote.authenticated_claims)
    except Exception:
        return None
    for c in claims:
        if isinstance(c, str):
            return c
    return None


def _source(request: aiocoap.Message) -> str | None:
    """The requester's IP address (under OSCORE, that of the UDP datagram carrying it)."""
    remote = getattr(request.remote, "underlying_address", None) or request.remote
    sockaddr = getattr(remote, "sockaddr", None)
    return source_of_sockaddr(sockaddr[0]) if sockaddr else None


def _peer(request: aiocoap.Message) -> str | None:
    try:
        return str(request.remote.hostinfo)
    except Exception:  # a transport without host info (not udp6)
        return None
