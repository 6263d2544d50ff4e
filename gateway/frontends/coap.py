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

Cached resolutions are answered by the fast path (``gateway/frontends/coap_fast.py``), which owns the UDP socket
and hands every other datagram to aiocoap; :meth:`CoapFrontEnd.resolve` tells it (``learn``) each answer it may
serve from then on. ``fast_path=False`` serves everything through aiocoap's own udp6 transport.

Rate limits (``limiter``, gateway/ratelimit.py): per source IP for every request, and per device for
``/d/<id>/…`` (or the OSCORE-authenticated device); over the limit the answer is 4.29 with ``Max-Age`` = whole
seconds until a token is there, counted in ``ida_ratelimited_total{frontend="coap"}``.

Routing uses aiocoap's ``Site``: the two resources under ``/r`` and ``/d`` are ``PathCapable`` and receive the
rest of the path as ``uri_path``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiocoap
from aiocoap import optiontypes, resource
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.util.linkformat import Link, LinkFormat

from gateway.frontends.common import DeviceRegistry, InFlight, failure, json_etag, parse_filters
from gateway.logfmt import kv
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter, retry_after, source_of_sockaddr
from gateway.registry import Registry
from gateway.resolution import Answer, AnswerCache, ResolutionNote, Resolving, etag_of, resolve_noted
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

REPORT = "rpt"
CONFIG = "cfg"


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


_U64 = (1 << 64) - 1


def _head(major: int, n: int) -> bytes:
    """A CBOR head: major type (already shifted) and argument ``n`` (0 <= n < 2**64), shortest form."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


def _uint(v: Any) -> bytes:
    if type(v) is not int or not 0 <= v <= _U64:
        raise _Unusual
    return _head(0x00, v)


def _text(v: Any) -> bytes:
    if type(v) is not str:
        raise _Unusual
    b = v.encode()
    return _head(0x60, len(b)) + b


class _Unusual(Exception):
    """A field :func:`resolve_payload` leaves to wire's encoder."""


def resolve_payload(code: int, ident: str, values: list[list[Any]], source: int) -> bytes:
    """``devicemsg.encode_resolve_response({"code", "id", "values", "source"})``, the same bytes (canonical CBOR: keys
    id 2, code 3, values 4, source 23), written out here for the answers the gateway builds -- cbor2's encoder
    costs several times more on a cold miss. Anything else (a negative or huge number, a value of another
    shape, text without a UTF-8 form) is left to wire, which checks it in full."""
    try:
        out = [b"\xa4\x02", _text(ident), b"\x03", _uint(code), b"\x04", _head(0x80, len(values))]
        for v in values:
            if type(v) is not list or len(v) != 4:
                raise _Unusual
            data = v[2]
            if type(data) is bytes:
                encoded = _head(0x40, len(data)) + data
            else:
                encoded = _text(data)
            out += (b"\x84", _uint(v[0]), _text(v[1]), encoded, _uint(v[3]))
        if type(source) is not int or not 0 <= source <= 3:
            raise _Unusual
        out += (b"\x17", _head(0x00, source))
        return b"".join(out)
    except (_Unusual, UnicodeEncodeError):
        return devicemsg.encode_resolve_response(
            {"code": code, "id": ident, "values": values, "source": source}
        )


class CoapFrontEnd:
    """The CoAP server. ``start()`` binds (port 0 = any free port) and returns the bound (host, port)."""

    def __init__(
        self,
        host: str,
        port: int,
        resolver: Resolving,
        registry: DeviceRegistry,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
        fast_path: bool = True,
        answers: AnswerCache | None = None,
        note: ResolutionNote | None = None,
    ) -> None:
        self._bind = (host, port)
        self.resolver = resolver
        self.answers = answers
        self.note = note
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.limiter = limiter
        self._ctx: aiocoap.Context | None = None
        self._inflight = InFlight()
        self._closing = False
        self.address: tuple[str, int] | None = None
        self.site = resource.Site()
        self.site.add_resource(
            (".well-known", "core"),
            resource.WKCResource(self.site.get_resources_as_linkheader, impl_info=None),
        )
        self._resolve_resource = _ResolveResource(self)
        self.site.add_resource(("r",), self._resolve_resource)
        self.devices = _DeviceResource(self)
        self.site.add_resource(("d",), self.devices)
        self._plain_site = self.site  # a wrapper (OSCORE) put in its place turns the fast path's learning off
        self._fast_path = fast_path
        self.fast: FastPath | None = None

    @property
    def in_flight(self) -> int:
        return self._inflight.count

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()

        def changed(ident: str, _fields: dict[str, Any]) -> None:  # may be called from another thread
            loop.call_soon_threadsafe(self.devices.notify, ident)

        self.registry.on_config_change(changed)
        if self._fast_path:
            from gateway.frontends.coap_fast import FastPath

            self.fast = FastPath(
                self.resolver,
                clock=self.clock,
                limiter=lambda: getattr(self, "limiter", None),
                learning=self.site is self._plain_site,
                miss=self.render_resolve,
                answers=self.answers,
                note=self.note,
            )
            self._ctx = await self.fast.start(self.site, *self._bind)
            self.metrics.add_collector(self.fast.samples, add=True)
            self.address = self.fast.address
            return self.address
        self._ctx = await aiocoap.Context.create_server_context(
            self.site, bind=self._bind, transports=["udp6"], loggername="coap-server"
        )
        self.address = (self._bind[0], _bound_port(self._ctx))
        return self.address

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
        if self.limiter is None or not getattr(
            self.limiter, "enabled", True
        ):  # no bucket: nothing to take from
            return None
        verdict = self.limiter.check(device=_authenticated(request) or device, source=_source(request))
        if not verdict.limited:
            return None
        self.metrics.count_ratelimited("coap", verdict.limit or "device")
        wait = retry_after(verdict.wait)
        return self._fail(
            devicemsg.RATE_LIMITED, f"rate limited ({verdict.limit}); retry in {wait} s", max_age=wait
        )

    async def resolve(self, request: aiocoap.Message) -> aiocoap.Message:
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
            ident = "/".join(request.opt.uri_path)
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
        """``GET /r/...`` rendered as the ``/r`` resource renders it, block-wise (RFC 7959) included, for a request
        that did not come through aiocoap's routing (the fast path's misses; ``uri_path`` is what follows ``r``).

        A request without Block2 (every miss of the fast path) is answered by :meth:`resolve` directly, and what
        ``Resource.render`` and ``Block2Cache`` would do to it is done here: the default code (ours always carry
        one), the No-Response option copied, an answer larger than one datagram cut into blocks."""
        res = self._resolve_resource
        if request.opt.block2 is not None or request.code != Code.GET:
            return await res._block2.extract_or_insert(request, lambda: res.render(request))
        response = await self.resolve(request)
        no_response = request.opt.no_response
        if no_response is not None and response.opt.no_response is None:
            response.opt.no_response = no_response
        if len(response.payload) > request.remote.maximum_payload_size:  # block-wise: the /r resource's cache

            async def rendered() -> aiocoap.Message:
                return response

            return await res._block2.extract_or_insert(request, rendered)
        return response

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
        if as_json:
            payload = json.dumps(answer.record.to_rest(), ensure_ascii=False, separators=(",", ":")).encode()
        else:
            payload = resolve_payload(
                devicemsg.OK, answer.handle, answer.record.to_device_values(now), answer.source
            )
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
                name = "report" if leaf == REPORT else "config_ack"
                fields = devicemsg.decode(name, request.payload)
                if identifier.normalise(fields["id"]) != ident:
                    return self._fail(
                        devicemsg.FORBIDDEN, f"payload id {fields['id']!r} is not the device in the path"
                    )
                if leaf == REPORT:
                    return await self._report(request, ident, fields)
                self.registry.record_config_ack(ident, fields["cfgver"], fields["code"], fields.get("msg"))
                log.info("config ack %s", kv(device=ident, cfgver=fields["cfgver"], code=fields["code"]))
                return self._finish(devicemsg.OK, aiocoap.Message(code=Code.CHANGED))
            except (identifier.IdentifierError, devicemsg.WireError) as e:
                return self._fail(*failure(e))
            except (
                ValueError
            ) as e:  # the registry refuses a field (e.g. a boot count beyond SQLite's integers)
                return self._fail(devicemsg.BAD_REQUEST, str(e))
            except Exception as e:
                return self._fail(*failure(e))

    async def _report(self, request: aiocoap.Message, ident: str, fields: dict[str, Any]) -> aiocoap.Message:
        if isinstance(self.registry, Registry):  # group commit: answered once its batch is committed
            new = await self.registry.record_report_async(ident, fields, "coap", _peer(request))
        else:
            new = self.registry.record_report(ident, fields, "coap", _peer(request))
        log.debug("report %s", kv(device=ident, boot=fields["boot"], seq=fields["seq"], new=new))
        ack_fields = {"boot": fields["boot"], "seq": fields["seq"], "code": devicemsg.OK}
        cfgver = _desired_cfgver(self.registry, ident)
        if (
            cfgver is not None
        ):  # the device fetches it when it holds an older one (e.g. missed a notification)
            ack_fields["cfgver"] = cfgver
        ack = devicemsg.encode("report_ack", ack_fields)
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


class _ResolveResource(resource.Resource, resource.PathCapable):
    """``/r/<identifier path>``: receives the identifier's segments as ``uri_path``."""

    def __init__(self, frontend: CoapFrontEnd) -> None:
        super().__init__()
        self._fe = frontend

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._fe.resolve(request)

    def get_resources_as_linkheader(self) -> LinkFormat:
        return LinkFormat([Link("", [("rt", "ida.resolve"), ("ct", "60 50")])])


class _DeviceResource(resource.ObservableResource, resource.PathCapable):
    """``/d/<identifier path>/<rpt|cfg>``; GET .../cfg is observable (notified on a desired-config change)."""

    def __init__(self, frontend: CoapFrontEnd) -> None:
        super().__init__()
        self._fe = frontend
        self._watchers: dict[str, set[Any]] = {}

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._fe.device(request)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._fe.device(request)

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        path = request.opt.uri_path
        if request.code != Code.GET or len(path) < 2 or path[-1] != CONFIG:
            _decline(serverobservation)
            return
        try:
            ident = identifier.normalise("/".join(path[:-1]))
        except identifier.IdentifierError:
            _decline(serverobservation)
            return
        watchers = self._watchers.setdefault(ident, set())
        watchers.add(serverobservation)

        def cancel() -> None:
            watchers.discard(serverobservation)
            if not watchers and self._watchers.get(ident) is watchers:
                del self._watchers[ident]

        serverobservation.accept(cancel)

    def observers(self, ident: str) -> int:
        return len(self._watchers.get(ident, ()))

    def notify(self, ident: str) -> None:
        """Re-render GET .../cfg for everyone observing ``ident`` (called when its desired config changed)."""
        try:
            ident = identifier.normalise(ident)
        except identifier.IdentifierError:
            return
        for obs in list(self._watchers.get(ident, ())):
            obs.trigger()

    def get_resources_as_linkheader(self) -> LinkFormat:
        return LinkFormat([Link("", [("rt", "ida.device"), ("ct", "60")])])


def _decline(serverobservation: Any) -> None:
    """Serve an Observe request as a plain one. aiocoap 0.4.17 calls the cancellation callback of every
    observation it offered, accepted or not: one left unaccepted raised AttributeError after the answer went
    out, logged as "Task exception was never retrieved" (fuzz finding). Accept with nothing to cancel, then
    deregister at once: the answer goes out without Observe and ends the observation."""
    serverobservation.accept(lambda: None)
    serverobservation.deregister()


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


def _authenticated(request: aiocoap.Message) -> str | None:
    """The device an OSCORE-protected request was verified as (gateway/frontends/coap_security.py)."""
    try:
        claims = list(request.remote.authenticated_claims)
    except Exception:
        return None
    return claims[0] if claims and isinstance(claims[0], str) else None


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


def _bound_port(ctx: aiocoap.Context) -> int:
    """The UDP port the server socket got (for bind port 0). aiocoap has no public accessor; this walks
    Context -> TokenManager -> MessageManager -> MessageInterfaceUDP6 (aiocoap 0.4.x)."""
    for ri in ctx.request_interfaces:
        mi = getattr(getattr(ri, "token_interface", None), "message_interface", None)
        transport = getattr(mi, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            return int(sock.getsockname()[1])
    raise RuntimeError("cannot find the CoAP server socket (aiocoap internals changed?)")


def _desired_cfgver(registry: Any, ident: str) -> int | None:
    """The desired config version a report ack carries (None: no desired config, or a registry without it)."""
    get = getattr(registry, "desired_cfgver", None)
    return get(ident) if get is not None else None
