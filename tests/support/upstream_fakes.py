"""Test doubles for the resolver side: a fake recursive node with counters and controllable latency/failure,
a manual clock, and record builders."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from urllib.parse import unquote

from aiohttp import web

from gateway.errors import UpstreamError
from gateway.upstream.base import Result
from proto.records import AdminRef, HandleValue, Record
from tests.support.webapp import LoopbackApp
from tools.support import procs

T0 = 1_700_000_000.0


class Clock:
    """A wall clock that only moves when told to."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def value(index: int, vtype: str, data: str | bytes, ttl: int = 86400, **kw: int) -> HandleValue:
    return HandleValue(index, vtype, data.encode() if isinstance(data, str) else data, ttl=ttl, **kw)  # type: ignore[arg-type]


def record(handle: str, *values: HandleValue) -> Record:
    return Record(handle, tuple(values))


PUMP = record(
    "88.123.99/PUMP-0001",
    value(1, "URL", "https://example.org/pump/0001", ttl=600),
    value(2, "EMAIL", "service@example.org", ttl=300),
    value(100, "HS_ADMIN", AdminRef("0.NA/88.123.99", 200, 0xFFF).encode(), ttl=86400),
)


class FakeUpstream:
    """Implements the client shape (``resolve`` + ``close``) from a dict of records.

    ``latency`` delays every answer; ``error`` (an exception, or a callable making one) is raised instead of
    answering; after :meth:`hold` every request waits until :meth:`release`. Counts calls, cancellations, and
    keeps the (loop time, handle, types, indexes) of every request.
    """

    def __init__(
        self,
        records: Sequence[Record] = (),
        *,
        latency: float = 0.0,
        error: BaseException | None = None,
    ) -> None:
        self.records = {r.handle: r for r in records}
        self.latency = latency
        self.error = error
        self._open = asyncio.Event()
        self._open.set()
        self.calls = 0
        self.cancelled = 0
        self.completed = 0
        self.closed = False
        self.requests: list[tuple[float, str, tuple[str, ...], tuple[int, ...]]] = []

    def hold(self) -> None:
        """From now on every request (one already waiting too) waits for :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def resolve(self, handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()) -> Result:
        self.calls += 1
        self.requests.append((asyncio.get_running_loop().time(), handle, tuple(types), tuple(indexes)))
        try:
            await self._open.wait()
            if self.latency:
                await asyncio.sleep(self.latency)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.completed += 1
        if self.error is not None:
            raise self.error
        rec = self.records.get(handle)
        if rec is None:
            return Result(100, handle)
        sel = rec.select(tuple(types), tuple(indexes))
        if (types or indexes) and not sel.values:
            return Result(200, handle)
        return Result(1, handle, sel.values)

    async def close(self) -> None:
        self.closed = True


def refused(node: str = "fake") -> UpstreamError:
    return UpstreamError("connection refused", node)


# -- a Handle REST server (aiohttp) -------------------------------------------------------------------
class RestNode(LoopbackApp):
    """A tiny Handle REST API server on 127.0.0.1 serving ``records``.

    ``canned`` maps a handle to (HTTP status, body bytes, delay s) served instead of the record. Every request's
    raw target (path and query, still percent-encoded) is kept in ``targets``.
    """

    def __init__(
        self, records: Sequence[Record] = (), canned: dict[str, tuple[int, bytes, float]] | None = None
    ):
        super().__init__()
        self.records = {r.handle.upper(): r for r in records}
        self.canned = canned or {}
        self.targets: list[str] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path
        self.targets.append(raw)
        path = raw.split("?", 1)[0]
        handle = unquote(path[len("/api/handles/") :])
        if handle in self.canned:
            status, body, delay = self.canned[handle]
            if delay:
                await asyncio.sleep(delay)
            return web.Response(status=status, body=body, content_type="application/json")
        rec = self.records.get(handle.upper())
        if rec is None:
            return web.json_response({"responseCode": 100, "handle": handle}, status=404)
        types = tuple(request.query.getall("type", []))
        indexes = tuple(int(i) for i in request.query.getall("index", []))
        sel = rec.select(types, indexes)
        if (types or indexes) and not sel.values:
            return web.json_response({"responseCode": 200, "handle": handle})
        return web.json_response(sel.to_rest())

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/handles/{tail:.*}", self._handle)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (connections to it are refused)."""
    return procs.free_port(socket.SOCK_STREAM)
