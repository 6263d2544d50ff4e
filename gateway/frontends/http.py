"""HTTP front end (aiohttp): Handle REST resolution, device registry and remote management, health, metrics.

    GET  /api/handles/{handle}?type=T&index=N   Handle.Net REST API shape and status codes
    GET  /api/devices                           {"devices": [...]}
    GET  /api/devices/{id}                      one device (404 when unknown)
    PUT  /api/devices/{id}/config               {"interval": N, "meta": {...}} -> desired config (POST works too)
    GET  /healthz                               {"status": "ok", "uptime": s, "components": {...}}
    GET  /metrics                               Prometheus text format 0.0.4

Handle.Net REST status codes (HANDLE.NET proxy REST API): responseCode 1 -> 200, 100 handle not found -> 404,
200 values not found -> 200, 102 invalid handle -> 400, 2 error -> 500. A gateway adds 503 / 504 (responseCode 2
with a message) when no upstream answered. Found and not-found answers carry ``Cache-Control: max-age`` (the
remaining lifetime) and found ones an ``ETag``; ``If-None-Match`` gets 304.

Rate limit (``limiter``, per source IP, ``/api/…`` only: health checks and scrapes are never refused): 429 with
``Retry-After`` (whole seconds), counted in ``ida_ratelimited_total{frontend="http"}``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import __version__, status
from gateway.frontends.common import HTTP_STATUS, Listener, failure, json_etag, parse_filters
from gateway.logfmt import kv
from gateway.metrics import CONTENT_TYPE
from gateway.ratelimit import retry_after, source_of_sockaddr
from gateway.resolution import etag_of, resolve_noted
from proto import devicemsg, identifier
from proto.identifier import IdentifierError
from proto.records import RC_ERROR, rest_error

log = logging.getLogger(__name__)

RC_INVALID_HANDLE = 102  # Handle protocol code the REST API answers with 400

Health = Callable[[], dict[str, str]]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


@dataclass(eq=False, repr=False, kw_only=True)
class HttpFrontEnd(Listener):
    """The HTTP server (:class:`Listener`'s settings; ``health`` gives /healthz its components, ``shutdown_timeout``
    bounds the wait for requests in flight at stop)."""

    health: Health = dict
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.started_at = time.monotonic()
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[self._rate_limit])
        app.router.add_get("/api/handles/{handle:.*}", self.get_handle)
        app.router.add_get("/api/devices", self.list_devices)
        app.router.add_route("PUT", "/api/devices/{id:.*}/config", self.set_config)
        app.router.add_route("POST", "/api/devices/{id:.*}/config", self.set_config)
        app.router.add_get("/api/devices/{id:.*}", self.get_device)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.get_metrics)
        status.add_routes(
            app, self.resolver, self.registry, health=self.health
        )  # GET /, /status, /api/status
        return app

    @web.middleware
    async def _rate_limit(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.limiter is not None and request.path.startswith("/api/"):
            verdict = self.limiter.check(source=source_of_sockaddr(request.remote))
            if verdict.limited:
                self.metrics.count_ratelimited("http", verdict.limit or "source")
                wait = retry_after(verdict.wait)
                return self._json(
                    devicemsg.RATE_LIMITED,
                    {"responseCode": RC_ERROR, "message": f"rate limited; retry in {wait} s"},
                    headers={"Retry-After": str(wait)},
                )
        result: web.StreamResponse = await handler(request)
        return result

    async def start(self) -> tuple[str, int]:
        self._runner = web.AppRunner(
            self.application(), shutdown_timeout=self.shutdown_timeout, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockname = self._runner.addresses[0]
        self.address = (self.host, int(sockname[1]))
        return self.address

    async def stop(self, timeout: float | None = None) -> None:
        """Stop listening, let requests in flight finish, close connections. Requests get the constructor's
        ``shutdown_timeout`` (aiohttp fixes it when the runner is made); ``timeout`` is accepted for symmetry
        with the other front ends and not used."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- Handle REST -------------------------------------------------------------------------------------
    def _json(
        self, code: int, body: Any, status: int | None = None, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.metrics.count_request("http", code)
        return web.json_response(body, status=status or HTTP_STATUS[code], headers=headers, dumps=_dumps)

    async def get_handle(self, request: web.Request) -> web.Response:
        raw = request.match_info["handle"]
        try:
            types, indexes = parse_filters(
                request.query.getall("type", []), request.query.getall("index", [])
            )
            answer = await resolve_noted(self.resolver, self.note, "http", raw, types, indexes)
        except Exception as e:
            code, msg = failure(e)
            rc = RC_INVALID_HANDLE if isinstance(e, IdentifierError) else RC_ERROR
            return self._json(code, rest_error(rc, raw, msg))
        max_age = answer.max_age(self.clock())
        headers = {"Cache-Control": f"max-age={max_age}"}
        if answer.code != devicemsg.OK or answer.record is None:
            return self._json(answer.code, rest_error(answer.code, answer.handle), headers=headers)
        etag = '"' + json_etag(answer.etag or etag_of(answer.record, answer.code)).hex() + '"'
        headers["ETag"] = etag
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            self.metrics.count_request("http", devicemsg.NOT_MODIFIED)
            return web.Response(status=304, headers=headers)
        return self._json(devicemsg.OK, answer.record.to_rest(), headers=headers)

    # -- devices and remote management -------------------------------------------------------------------
    async def list_devices(self, request: web.Request) -> web.Response:
        return self._json(devicemsg.OK, {"devices": self.registry.devices()})

    async def get_device(self, request: web.Request) -> web.Response:
        try:
            ident = identifier.normalise(request.match_info["id"])
        except IdentifierError as e:
            return self._json(devicemsg.BAD_REQUEST, {"error": f"bad identifier: {e}"})
        dev = self.registry.device(ident)
        if dev is None:
            return self._json(devicemsg.NOT_FOUND, {"error": "unknown device", "id": ident})
        return self._json(devicemsg.OK, dev)

    async def set_config(self, request: web.Request) -> web.Response:
        try:
            ident = identifier.normalise(request.match_info["id"])
            body = await request.json(loads=json.loads)
            interval, meta = _config_body(body)
        except IdentifierError as e:
            return self._json(devicemsg.BAD_REQUEST, {"error": f"bad identifier: {e}"})
        except (ValueError, UnicodeDecodeError) as e:
            return self._json(
                devicemsg.BAD_REQUEST,
                {"error": str(e) if isinstance(e, _BodyError) else f"body is not JSON: {e}"},
            )
        try:
            fields = self.registry.set_desired_config(ident, interval=interval, meta=meta)
        except ValueError as e:  # e.g. a config too big for a device to hold
            return self._json(devicemsg.BAD_REQUEST, {"error": str(e)})
        log.info(
            "desired config set %s",
            kv(
                device=ident,
                cfgver=fields.get("cfgver"),
                interval=interval,
                meta=None if meta is None else ",".join(sorted(meta)),
            ),
        )
        return self._json(devicemsg.OK, {"id": ident, "config": fields})

    # -- operations --------------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        components = self.health()
        down = sorted(k for k, v in components.items() if v in ("down", "error"))
        body = {
            "status": "degraded" if down else "ok",
            "version": __version__,
            "uptime": round(time.monotonic() - self.started_at, 3),
            "components": components,
        }
        return web.json_response(body, dumps=_dumps)

    async def get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})


class _BodyError(ValueError):
    pass


def _config_body(body: Any) -> tuple[int | None, dict[str, str] | None]:
    """Check ``{"interval": 10..86400, "meta": {str: str}}`` (at least one of them, nothing else)."""
    if not isinstance(body, dict):
        raise _BodyError('body must be a JSON object {"interval": N, "meta": {...}}')
    unknown = sorted(set(body) - {"interval", "meta"})
    if unknown:
        raise _BodyError(f"unknown field(s) {', '.join(unknown)}: only interval and meta can be set")
    interval = body.get("interval")
    meta = body.get("meta")
    if interval is None and meta is None:
        raise _BodyError("give interval and/or meta")
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, int) or not 10 <= interval <= 86400
    ):
        raise _BodyError("interval must be an integer number of seconds, 10-86400")
    if meta is not None and (
        not isinstance(meta, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise _BodyError("meta must be an object of strings (value type -> text)")
    return interval, meta


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags
