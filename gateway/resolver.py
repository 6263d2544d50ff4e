"""The resolver: local zone, then cache, then one shared upstream request per key, then serve-stale.

:class:`Resolver` implements :class:`gateway.resolution.Resolving`. One resolution:

1. normalise the identifier (IdentifierError propagates: the front end answers 400);
2. the local zone answers if it has the handle (source SOURCE_ZONE; the filters are applied here);
3. a fresh cache entry answers (SOURCE_CACHE); if it is in the last 10 % of its lifetime a background
   refresh starts, once per entry;
4. otherwise one upstream request per key is in flight at a time (single-flight): concurrent callers
   for the same key await the same request. Its answer is cached and returned (SOURCE_UPSTREAM). If it
   fails, every caller waiting on it gets the failure -- or the stale entry if the cache still keeps one
   (SOURCE_STALE, max-age ``stale_reply_ttl``). The failure itself is not remembered: the next caller
   starts a new request. (The pool's node cooldown is what makes repeated requests to dead nodes cheap.)
   One failure is remembered: when every node answers that it does not serve the handle's prefix (301, or a
   302/303 referral: NameNotServed), the prefix is refused without asking for the negative TTL.
5. With a stale entry available the caller waits at most ``stale_answer_after`` (RFC 8767's client
   response timer, 1.8 s) for the upstream; after that it gets the stale answer while the request goes
   on and refreshes the cache when it completes.

Errors raised: IdentifierError; NameNotServed (no node serves the prefix; -> 404); AllUpstreamsFailed (no node could answer; -> 503) and UpstreamTimeout
(the overall upstream timeout expired; -> 504), both only when nothing stale is kept.

Settings and counters are in ``gateway/resolver_config.py``; what front ends see of it is
``gateway/resolution.py`` (answers, the AnswerCache view this module implements as :class:`ResolverAnswers`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.aio import cancel_all
from gateway.cache import Cache, CacheEntry, CacheKey, CacheStats, cache_key
from gateway.errors import NameNotServed, UpstreamError
from gateway.logfmt import kv
from gateway.resolution import Answer, CachedAnswer, etag_of
from gateway.resolver_config import (
    CACHE_FILE,
    DEFAULT_UPSTREAM,
    ZONE_FILE,
    ResolverConfig,
    ResolverStats,
    default_upstreams,
)
from gateway.upstream.pool import UpstreamPool
from gateway.zone import Zone
from proto import devicemsg, identifier
from proto.records import Record

if TYPE_CHECKING:
    from gateway.shared_cache import SharedTier

__all__ = [
    "Resolver",
    "ResolverAnswers",
    "ResolverConfig",
    "ResolverStats",
    "DEFAULT_UPSTREAM",
    "CACHE_FILE",
    "ZONE_FILE",
    "default_upstreams",
]

log = logging.getLogger(__name__)

MAX_NOT_SERVED = 10_000  # prefixes remembered as served by no node (the oldest forgotten first)


# An identifier that is plainly valid: ASCII, no control characters, a prefix of non-empty segments of letters,
# digits, '-' and '_' (proto/identifier.py's rules for such text; anything else is judged there).
_PLAIN = re.compile(r"([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)/([\x20-\x7e]+)")


def _normalise(handle: str) -> str:
    """``identifier.normalise(handle)``: the same result, the same errors; a plainly valid identifier is
    normalised here with one match (identifier.parse's per-character checks cost ~45 us on a cold miss)."""
    if type(handle) is str and len(handle) <= identifier.MAX_LENGTH:
        m = _PLAIN.fullmatch(handle)
        if m is not None:
            return m[1].upper() + "/" + m[2]
    return identifier.normalise(handle)


class _Flight:
    """The one upstream request in flight for a key (its task) and the callers waiting for its answer."""

    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[Answer] | None = None
        self.waiters: list[asyncio.Future[Answer]] = []


class ResolverAnswers:
    """The resolver's :class:`gateway.resolution.AnswerCache`: its cache, as seen through its local zone."""

    __slots__ = ("_cache", "_zone", "prefetch_fraction")

    def __init__(self, cache: Cache, zone: Zone, prefetch_fraction: float) -> None:
        self._cache = cache
        self._zone = zone
        self.prefetch_fraction = prefetch_fraction

    def current(self, handle: str, types: tuple[str, ...], indexes: tuple[int, ...]) -> CacheEntry | None:
        return self._cache.peek(cache_key(handle, types, indexes))

    def is_current(self, entry: CachedAnswer, now: float) -> bool:
        if not isinstance(entry, CacheEntry) or now >= entry.expires_at:
            return False
        key = entry.key
        return self._cache.peek(key) is entry and self._zone.get_normalised(key[0]) is None

    def count_hits(self, n: int) -> None:
        self._cache.stats.hits += n


class Resolver:
    """Zone > cache > single-flight upstream > stale. Build with a config; parts may be injected (tests)."""

    def __init__(
        self,
        config: ResolverConfig | None = None,
        *,
        pool: UpstreamPool | None = None,
        cache: Cache | None = None,
        zone: Zone | None = None,
        clock: Callable[[], float] = time.time,
        shared: SharedTier | None = None,
    ) -> None:
        self.config = cfg = config or ResolverConfig()
        self.shared = (
            shared  # the Redis tier under the local cache (gateway/shared_cache.py); the caller closes it
        )
        self._clock = clock
        self.pool = (
            pool
            if pool is not None
            else UpstreamPool.from_urls(
                cfg.upstreams,
                timeout=cfg.timeout,
                attempt_timeout=cfg.attempt_timeout,
                hedge_delay=cfg.hedge_delay,
                failure_threshold=cfg.failure_threshold,
                cooldown=cfg.cooldown,
                max_cooldown=cfg.max_cooldown,
            )
        )
        if cache is None:
            path = cfg.cache_path()
            cache = Cache(cfg.cache, path=path, clock=clock)
        self.cache = cache
        if zone is None:
            zpath = cfg.zone_path()
            zone = Zone.load(zpath) if zpath is not None and os.path.exists(zpath) else Zone(path=zpath)
        self.zone = zone
        self._inflight: dict[CacheKey, _Flight] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._closed = False
        self._zone_hits = 0
        self._fetches = 0
        self._coalesced = 0
        self._upstream_errors = 0
        self._stale_answers = 0
        # prefix -> (until, the nodes' answers): prefixes every node said it does not serve (301/302/303)
        self._not_served: dict[str, tuple[float, dict[str, UpstreamError]]] = {}
        self._not_served_answers = 0

    def answer_cache(self) -> ResolverAnswers:
        """The view of this resolver's cache that front ends answering from pre-encoded bytes use."""
        fraction = self.cache.config.prefetch_fraction if self.config.prefetch else 0.0
        return ResolverAnswers(self.cache, self.zone, fraction)

    # -- the Resolving interface ---------------------------------------------------------------------
    async def resolve(
        self, handle: str, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()
    ) -> Answer:
        name = _normalise(handle)
        if types == () and indexes == ():  # no filters (the usual request): nothing to convert or sort
            key: CacheKey = (name, (), ())
        else:
            types = tuple(types)
            indexes = tuple(int(i) for i in indexes)
            key = cache_key(name, types, indexes)
        if self._closed:
            raise RuntimeError("resolver is closed")
        if self._housekeeper is None:
            self._start_housekeeping()

        zrec = self.zone.get_normalised(name)
        if zrec is not None:
            self._zone_hits += 1
            return self._zone_answer(name, zrec, types, indexes)

        entry = self.cache.get(key)
        if entry is None and self._not_served:
            self._raise_if_not_served(name)
        if entry is not None:
            if (
                self.config.prefetch
                and not entry.prefetched
                and key not in self._inflight
                and entry.in_prefetch_window(self._clock(), self.cache.config.prefetch_fraction)
            ):
                self.cache.note_prefetch(entry)
                log.debug("resolver.prefetch handle=%s", name)
                self._fetch_task(key, types, indexes)
            return self._answer(entry, devicemsg.SOURCE_CACHE)

        flight = self._inflight.get(key)
        if flight is None:
            flight = self._fetch_task(key, types, indexes)
        else:
            self._coalesced += 1
        # Our own future, resolved by the request's task as it ends (one loop turn, no shield): cancelling this
        # caller cancels only it, never the request the others wait for.
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        flight.waiters.append(waiter)
        try:
            if self.cache.peek(key) is not None:  # a stale entry to fall back on
                async with asyncio.timeout(self.config.stale_answer_after):
                    return await waiter
            return await waiter
        except TimeoutError:
            # Only the client response timer above raises TimeoutError (the pool raises UpstreamTimeout).
            stale = self._stale(key)
            if stale is not None:
                log.info("resolver.stale handle=%s reason=slow-upstream", name)
                return stale
            assert flight.task is not None
            return await asyncio.shield(flight.task)
        except Exception as e:  # the shared fetch failed: each waiter falls back to stale on its own
            stale = self._stale(key)
            if stale is not None:
                log.info("resolver.stale handle=%s reason=%r", name, str(e))
                return stale
            raise

    # -- prefixes no node serves ------------------------------------------------------------------------
    def _raise_if_not_served(self, name: str) -> None:
        """Raise NameNotServed (no upstream request) while ``name``'s prefix is remembered as served nowhere."""
        prefix = name.partition("/")[0]
        known = self._not_served.get(prefix)
        if known is None:
            return
        until, errors = known
        if self._clock() >= until:
            del self._not_served[prefix]
            return
        self._not_served_answers += 1
        raise NameNotServed(name, errors)

    def _remember_not_served(self, e: NameNotServed) -> None:
        """Negative-cache ``e``'s prefix for the negative TTL (a bounded table: anyone can ask for any prefix)."""
        now = self._clock()
        self._not_served.pop(e.prefix, None)
        if len(self._not_served) >= MAX_NOT_SERVED:
            del self._not_served[next(iter(self._not_served))]  # the oldest
        self._not_served[e.prefix] = (now + self.cache.lifetime(devicemsg.NOT_FOUND, None, now), e.errors)
        log.info("resolver.not_served %s", kv(prefix=e.prefix, code=e.code))

    # -- upstream ------------------------------------------------------------------------------------
    def _fetch_task(self, key: CacheKey, types: tuple[str, ...], indexes: tuple[int, ...]) -> _Flight:
        flight = _Flight()
        flight.task = task = asyncio.create_task(
            self._fetch(key, types, indexes, flight), name=f"resolve {key[0]}"
        )
        self._inflight[key] = flight
        self._background.add(task)
        task.add_done_callback(self._fetch_done)
        self._fetches += 1
        return flight

    def _fetch_done(self, task: asyncio.Task[Answer]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: waiters may all be gone
            self._upstream_errors += 1

    async def _fetch(
        self, key: CacheKey, types: tuple[str, ...], indexes: tuple[int, ...], flight: _Flight
    ) -> Answer:
        """The upstream request of ``flight`` (the shared tier first, when there is one); its outcome goes to
        the flight's waiters before the task ends."""
        name = key[0]
        shared = None
        try:
            if (
                self.shared is not None
            ):  # local miss: the shared tier may answer, or make us wait for another gateway
                shared = await self.shared.begin(key, self.cache)
            if shared is not None and shared.entry is not None:
                answer = self._answer(shared.entry, devicemsg.SOURCE_CACHE)
            else:
                res = await self.pool.resolve(name, types, indexes)
                code = res.code
                record: Record | None = None
                if code == devicemsg.OK:
                    record = Record(name, res.values)
                    if types or indexes:
                        record = record.select(types, indexes)
                        if not record.values:
                            code, record = devicemsg.VALUES_NOT_FOUND, None
                entry = self.cache.put(key, code, record)
                if shared is not None:
                    shared.publish(entry)
                if entry is not None:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "resolver.fetched handle=%s code=%d node=%s ttl=%.0f",
                            name,
                            code,
                            res.node,
                            entry.lifetime,
                        )
                    answer = self._answer(entry, devicemsg.SOURCE_UPSTREAM)
                else:
                    now = self._clock()
                    answer = Answer(
                        code,
                        name,
                        record,
                        devicemsg.SOURCE_UPSTREAM,
                        now + self.cache.lifetime(code, record, now),
                        etag_of(record, code),
                    )
        except BaseException as e:
            if isinstance(e, NameNotServed):
                self._remember_not_served(e)
            self._land(key, flight, shared)
            for w in flight.waiters:
                if not w.done():
                    if isinstance(e, asyncio.CancelledError):
                        w.cancel()  # as a shielded wait on a cancelled task: the waiter is cancelled too
                    else:
                        w.set_exception(e)  # each waiter falls back to stale on its own
            raise
        self._land(key, flight, shared)
        for w in flight.waiters:
            if not w.done():  # a waiter that gave up (cancelled, or answered stale) has a done future
                w.set_result(answer)
        return answer

    def _land(self, key: CacheKey, flight: _Flight, shared: Any) -> None:
        if shared is not None:
            shared.end()
        # Before any waiter wakes up: a caller arriving after this starts a new request.
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    # -- answers -------------------------------------------------------------------------------------
    def _answer(self, entry: CacheEntry, source: int) -> Answer:
        return Answer(entry.code, entry.key[0], entry.record, source, entry.expires_at, entry.etag)

    def _stale(self, key: CacheKey) -> Answer | None:
        entry = self.cache.stale(key)
        if entry is None:
            return None
        self._stale_answers += 1
        return Answer(
            entry.code,
            entry.key[0],
            entry.record,
            devicemsg.SOURCE_STALE,
            self._clock() + self.config.stale_reply_ttl,
            entry.etag,
        )

    def _zone_answer(
        self, name: str, rec: Record, types: tuple[str, ...], indexes: tuple[int, ...]
    ) -> Answer:
        now = self._clock()
        sel = rec.select(types, indexes)
        if not sel.values and (types or indexes):
            code, out = devicemsg.VALUES_NOT_FOUND, None
        else:
            code, out = devicemsg.OK, Record(name, sel.values)
        return Answer(
            code,
            name,
            out,
            devicemsg.SOURCE_ZONE,
            now + self.cache.lifetime(code, out, now),
            etag_of(out, code),
        )

    # -- housekeeping --------------------------------------------------------------------------------
    def _start_housekeeping(self) -> None:
        if self._housekeeper is None:
            self._housekeeper = asyncio.create_task(self._housekeeping(), name="resolver housekeeping")

    async def _housekeeping(self) -> None:
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(self.config.cache.flush_interval)
            try:
                self.cache.maybe_flush()
                if time.monotonic() - last_purge >= self.config.purge_interval:
                    last_purge = time.monotonic()
                    self.cache.purge()
            except Exception:  # never let bookkeeping kill resolution
                log.exception("resolver.housekeeping_failed")

    def stats(self) -> ResolverStats:
        return ResolverStats(
            cache=CacheStats(**self.cache.stats.as_dict()),
            upstream=self.pool.stats(),
            zone_hits=self._zone_hits,
            upstream_fetches=self._fetches,
            coalesced=self._coalesced,
            upstream_errors=self._upstream_errors,
            stale_answers=self._stale_answers,
            inflight=len(self._inflight),
            zone_records=len(self.zone),
            not_served_answers=self._not_served_answers,
        )

    async def close(self) -> None:
        """Cancel background work, close the upstream clients, flush and close the cache."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._background)
        if self._housekeeper is not None:
            tasks.append(self._housekeeper)
        await cancel_all(tasks)
        await self.pool.close()
        self.cache.close()

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
