"""The gateway's status page and the JSON snapshot behind it.

    GET /            the status page: ``gateway/static/status.html`` (inline CSS and JS, no external resources)
    GET /status      the same page
    GET /api/status  :func:`status_snapshot` as JSON; the page fetches it every 2 s

The snapshot holds devices, cache counters, upstream nodes, the last resolutions, the outbox and a hit-ratio
time series. Two things are kept here because nothing else in the gateway remembers them:

* :class:`RecentResolutions`, a ring buffer of the last ``RECENT_SIZE`` resolutions (time, identifier, front
  end, source, code, milliseconds). The front ends feed it through their ``note`` hook
  (:data:`gateway.resolution.ResolutionNote`; ``gateway/service.py`` gives them ``board.recent.add``).
* :class:`HitRatioSeries`, the cache hit/miss counters sampled every ``SAMPLE_INTERVAL`` seconds for the last
  ``SERIES_POINTS`` samples (10 minutes), so that the chart has history on the first load. The sampler runs
  while the HTTP application runs (:func:`add_routes` hooks it into the app's start and cleanup).

Both live in a :class:`StatusBoard`, one per resolver (:func:`board_for`): the front ends' hooks and the HTTP
routes reach the same board without the front ends knowing about each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from gateway import __version__
from gateway.aio import cancel_all
from gateway.registry import Registry
from gateway.resolution import SOURCE_ERROR, Resolving
from gateway.resolver import Resolver

__all__ = [
    "HitRatioSeries",
    "RecentResolutions",
    "Resolution",
    "StatusBoard",
    "add_routes",
    "board_for",
    "status_snapshot",
]

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent / "static" / "status.html"
RECENT_SIZE = 50  # resolutions kept for the page
SAMPLE_INTERVAL = 5.0  # seconds between hit-ratio samples
SERIES_POINTS = 120  # samples kept: 10 minutes at 5 s
DEVICE_LIMIT = 500  # device rows in one snapshot (the totals count all of them)
DEFAULT_REPORT_INTERVAL = 60  # firmware default; a device silent for 3 intervals is shown as silent
MAX_ID_CHARS = 256  # a refused identifier can be anything: keep the page's copy short


def _now() -> float:
    return time.time()


# -- recent resolutions -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Resolution:
    """One answered (or failed) resolution as the page lists it."""

    time: float  # Unix seconds
    id: str  # the identifier as answered (normalised), or as asked when it was refused
    frontend: str  # coap, mqtt, http
    source: str  # zone, cache, upstream, stale, error
    code: int  # wire code: 1, 100, 200, 400, 500, 503, 504
    ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecentResolutions:
    """The last ``size`` resolutions (oldest dropped first) and a count per source since start."""

    def __init__(self, size: int = RECENT_SIZE) -> None:
        self._items: deque[Resolution] = deque(maxlen=size)
        self.by_source: Counter[str] = Counter()

    def add(
        self, ident: str, frontend: str, source: str, code: int, ms: float, at: float | None = None
    ) -> Resolution:
        if len(ident) > MAX_ID_CHARS:
            ident = ident[:MAX_ID_CHARS] + "\u2026"
        item = Resolution(_now() if at is None else at, ident, frontend, source, int(code), round(ms, 2))
        self._items.append(item)
        self.by_source[source] += 1
        return item

    def items(self) -> list[Resolution]:
        """Newest first."""
        return list(reversed(self._items))

    def __len__(self) -> int:
        return len(self._items)


# -- hit-ratio series -------------------------------------------------------------------------------------
class HitRatioSeries:
    """Cumulative (time, hits, misses) samples; :meth:`points` turns them into per-interval hit ratios."""

    def __init__(self, interval: float | None = None, points: int | None = None) -> None:
        self.interval = SAMPLE_INTERVAL if interval is None else interval
        self._samples: deque[tuple[float, int, int]] = deque(
            maxlen=(SERIES_POINTS if points is None else points) + 1
        )

    def sample(self, t: float, hits: int, misses: int) -> None:
        self._samples.append((t, hits, misses))

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def window(self) -> float:
        return self.interval * ((self._samples.maxlen or 1) - 1)

    def points(
        self, now: float | None = None, hits: int | None = None, misses: int | None = None
    ) -> list[dict[str, Any]]:
        """One point per sampling interval: ``ratio`` = hits / lookups in that interval (None without lookups),
        ``lookups``, ``hits``, and ``total_ratio`` since start. With ``now, hits, misses`` a last, live point
        covers the time since the newest sample (once that is at least half an interval)."""
        samples = list(self._samples)
        live = now is not None and hits is not None and misses is not None
        if live and samples and now is not None and now - samples[-1][0] >= self.interval / 2:
            samples.append((now, hits or 0, misses or 0))
        out: list[dict[str, Any]] = []
        for (_t0, h0, m0), (t1, h1, m1) in zip(samples, samples[1:], strict=False):
            dh, dm = max(0, h1 - h0), max(0, m1 - m0)
            n = dh + dm
            out.append(
                {
                    "t": round(t1, 3),
                    "ratio": round(dh / n, 4) if n else None,
                    "lookups": n,
                    "hits": dh,
                    "total_ratio": round(h1 / (h1 + m1), 4) if h1 + m1 else None,
                }
            )
        return out


# -- the board: one per resolver --------------------------------------------------------------------------
class StatusBoard:
    """What the status page needs beyond the resolver's and the registry's own counters."""

    def __init__(self) -> None:
        self.recent = RecentResolutions()
        self.series = HitRatioSeries()
        self.started = time.monotonic()
        self.sampler: asyncio.Task[None] | None = None


_boards: weakref.WeakKeyDictionary[Any, StatusBoard] = weakref.WeakKeyDictionary()


def board_for(resolver: Resolving) -> StatusBoard:
    """The board of ``resolver``, made on first use (every front end of one resolver notes on the same one)."""
    inner = resolver
    try:
        board = _boards.get(inner)
        if board is None:
            board = _boards[inner] = StatusBoard()
    except TypeError:  # not weak-referenceable: a board of its own, not shared
        log.debug("status board not shared: %r is not weak-referenceable", type(inner).__name__)
        return StatusBoard()
    return board


# -- the snapshot -----------------------------------------------------------------------------------------
class StatusRegistry(Protocol):
    def devices(self) -> list[dict[str, Any]]: ...

    def stats(self) -> dict[str, Any]: ...


def _cache_counters(resolver: Resolving, board: StatusBoard) -> tuple[int, int]:
    """(hits, misses): the cache's own counters, else (a resolver without a cache) the recorded sources."""
    if isinstance(resolver, Resolver):
        c = resolver.cache.stats
        return c.hits, c.misses
    by = board.recent.by_source
    return by["cache"], by["upstream"] + by["stale"]


def _device_row(d: Mapping[str, Any], now: float) -> dict[str, Any]:
    last = d.get("last_report") or {}
    desired = (d.get("config") or {}).get("desired") or {}
    interval = desired.get("interval") or DEFAULT_REPORT_INTERVAL
    online, seen = d.get("online"), d.get("last_seen")
    if online is True:
        state = "online"
    elif online is False:
        state = "offline"
    elif seen is None:
        state = "never"
    else:  # CoAP devices do not announce themselves: judge by the last time they were heard of
        state = "active" if now - seen <= 3 * interval else "silent"
    return {
        "id": d.get("id"),
        "board": d.get("board"),
        "fw": d.get("fw"),
        "transport": d.get("transport"),
        "online": online,
        "state": state,
        "last_seen": seen,
        "last_report": last.get("received"),
        "seq": last.get("seq"),
        "queue": d.get("queue"),
        "dropped": d.get("dropped"),
        "reports": d.get("reports_total"),
        "duplicates": d.get("duplicates_total"),
        "config": (d.get("config") or {}).get("state"),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def status_snapshot(
    resolver: Resolving,
    registry: StatusRegistry | None = None,
    *,
    board: StatusBoard | None = None,
    components: Mapping[str, str] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything the status page shows, JSON-ready. The cache and upstream sections are filled when
    ``resolver`` is a :class:`gateway.resolver.Resolver`."""
    now = _now() if now is None else now
    board = board if board is not None else board_for(resolver)
    inner = resolver
    comps = dict(components or {})
    down = sorted(k for k, v in comps.items() if v in ("down", "error"))
    out: dict[str, Any] = {
        "time": round(now, 3),
        "version": __version__,
        "uptime": round(time.monotonic() - board.started, 1),
        "status": "degraded" if down else "ok",
        "components": comps,
    }

    # devices
    rows = [_device_row(d, now) for d in (registry.devices() if registry is not None else [])]
    out["devices"] = rows[:DEVICE_LIMIT]
    out["devices_total"] = len(rows)
    out["devices_online"] = sum(1 for r in rows if r["state"] in ("online", "active"))

    # cache and upstream
    hits, misses = _cache_counters(inner, board)
    cache: dict[str, Any] = {
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
    }
    upstream: list[dict[str, Any]] = []
    if isinstance(inner, Resolver):
        st = inner.stats()
        c, cfg = st.cache, inner.config
        cache.update(
            entries=c.entries,
            bytes=c.bytes,
            max_entries=cfg.cache.max_entries,
            max_bytes=cfg.cache.max_bytes,
            stale=st.stale_answers,
            prefetches=c.prefetches,
            evictions=c.evictions,
            zone_hits=st.zone_hits,
            zone_records=st.zone_records,
            coalesced=st.coalesced,
            inflight=st.inflight,
        )
        for url, n in st.upstream.items():
            upstream.append(
                {
                    "url": url,
                    "healthy": n.healthy,
                    "consecutive_failures": n.consecutive_failures,
                    "latency_ewma_ms": _ms(n.latency_ewma),
                    "latency_mean_ms": _ms(n.latency.sum / n.latency.count) if n.latency.count else None,
                    "requests": n.requests,
                    "answers": n.answers,
                    "failures": n.failures,
                }
            )
    else:
        cache.update(stale=board.recent.by_source["stale"])
    out["cache"] = cache
    out["upstream"] = upstream
    out["series"] = {
        "interval": board.series.interval,
        "window": board.series.window,
        "points": board.series.points(now, hits, misses),
    }

    # resolutions
    out["recent"] = [r.as_dict() for r in board.recent.items()]
    by = board.recent.by_source
    out["resolutions"] = {
        "total": sum(by.values()),
        **{k: by[k] for k in ("zone", "cache", "upstream", "stale", SOURCE_ERROR)},
    }

    # outbox
    outbox: dict[str, Any] = {"depth": None}
    if isinstance(registry, Registry) and registry.outbox is not None:
        outbox = registry.outbox.stats()
    elif registry is not None:
        outbox["depth"] = registry.stats().get("outbox_depth")
    out["outbox"] = outbox
    return out


# -- routes -----------------------------------------------------------------------------------------------
def _take_sample(resolver: Resolving, board: StatusBoard) -> None:
    hits, misses = _cache_counters(resolver, board)
    board.series.sample(_now(), hits, misses)


def add_routes(
    app: web.Application,
    resolver: Resolving,
    registry: StatusRegistry | None = None,
    *,
    health: Callable[[], dict[str, str]] | None = None,
) -> StatusBoard:
    """Mount ``/``, ``/status`` and ``/api/status`` on ``app`` and sample the hit ratio while it runs."""
    board = board_for(resolver)
    page = PAGE.read_bytes()

    async def get_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)

    async def get_status(request: web.Request) -> web.Response:
        try:
            components = health() if health is not None else {}
        except Exception:
            log.exception("status: health check failed")
            components = {"health": "error"}
        body = status_snapshot(resolver, registry, board=board, components=components)
        return web.json_response(body, dumps=_dumps, headers={"Cache-Control": "no-store"})

    async def sampler(_app: web.Application) -> AsyncIterator[None]:
        task: asyncio.Task[None] | None = None
        if board.sampler is None or board.sampler.done():  # one sampler per board, however many apps mount it
            task = board.sampler = asyncio.create_task(
                _sample_forever(resolver, board), name="status sampler"
            )
        yield
        if task is not None:
            await cancel_all([task])
            if board.sampler is task:
                board.sampler = None

    app.router.add_get("/", get_page)
    app.router.add_get("/status", get_page)
    app.router.add_get("/api/status", get_status)
    app.cleanup_ctx.append(sampler)
    return board


async def _sample_forever(resolver: Resolving, board: StatusBoard) -> None:
    while True:
        try:
            _take_sample(resolver, board)
        except Exception:  # never let the page's bookkeeping take anything down
            log.exception("status: sampling failed")
        await asyncio.sleep(board.series.interval)


PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Everything is inline; the page talks to its own origin only.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)
