"""The shared cache tier: one Redis (or Redis Cluster) under the local caches of several gateways.

Where it sits (``gateway/resolver.py`` calls it only after the local cache missed)::

    local zone ▸ local cache ▸ shared tier (Redis GET) ▸ cross-gateway single-flight (Redis lock) ▸ upstream

* **Read.** On a local miss the resolver asks :meth:`SharedTier.begin`. A fresh shared answer is copied into
  the local cache *with the expiry the first gateway computed* and answered (no upstream request, source
  ``cache``): every gateway then counts the same Max-Age down to the same instant (gateway clocks must be NTP
  synchronised; a skew of s seconds shifts Max-Age by s). An expired shared answer still inside its stale window
  is copied too, as an expired local entry, so that this gateway can serve it stale if the upstream fails.
* **Write.** The answer of an upstream request is written with ``SET key value PX <ms>`` where the TTL is the
  remaining lifetime plus ``max_stale`` (the stale window), so Redis drops it when no gateway may use it any
  more. Negative answers (handle / values not found) are written too, with their (short) lifetime; errors never.
* **Cross-gateway single-flight.** A gateway that misses in Redis takes a short lock (``SET lock token NX PX``)
  before asking upstream; a gateway that finds the lock taken polls for the value (5 ms doubling to 50 ms) for
  at most ``lock_wait`` seconds, then asks upstream itself. It stops waiting early when the lock disappears
  without a value (the holder's upstream request failed: failures are not shared, each gateway tries on its
  own). A lock left by a killed gateway expires after ``lock_ttl``. So N gateways missing one key make about one
  upstream request, and nobody ever waits for more than ``lock_wait``.
* **Redis down.** Every Redis call has a ``timeout``; any failure counts in ``errors``, logs one line
  (``shared cache down … local-only``) and opens a circuit: for 0.5 s (doubling to 10 s while it keeps failing)
  the tier is skipped entirely, so a dead Redis costs nothing per resolution. The first call that works again
  logs ``shared cache back``. A resolution never fails because of Redis.

Keys (Redis Cluster ready): ``<prefix>c:{<h>}`` for an answer without filters and ``<prefix>c:{<h>}:<f>`` with
type/index filters, ``<prefix>l:{<h>}…`` for the lock, where ``h`` = base64url(BLAKE2b-96(normalised handle))
and ``f`` = base64url(BLAKE2b-48(filters)). The ``{h}`` hash tag puts every variant of one handle and its lock
in one hash slot (one node), so the pipelined GET + lock check and SET + unlock stay single-slot. Keys are
short and fixed-size (about 24 bytes) whatever the handle's length; the value carries the full key and is
checked on read, so a hash collision is a miss, never a wrong answer.

Values are CBOR ``[1, stored_ms, expires_ms, [types], [indexes], record]`` where ``record`` is the local cache's
own CBOR form (``gateway.cache.encode_record``: ``[code, handle, values]``) and the times are Unix
milliseconds.

URLs: ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS), ``unix:///path``, and
``redis+cluster://host:port`` (or ``rediss+cluster://``) for a Redis Cluster, given any one seed node.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import cbor2

from gateway.aio import cancel_all
from gateway.cache import ANSWER_CODES, Cache, CacheEntry, CacheKey, decode_record, encode_record
from gateway.logfmt import kv

__all__ = [
    "SharedTier",
    "Flight",
    "RedisSharedCache",
    "SharedStats",
    "SharedEntry",
    "redis_keys",
    "encode_value",
    "decode_value",
    "redact_url",
]

log = logging.getLogger(__name__)

VALUE_VERSION = 1
POLL_FIRST = 0.005
POLL_MAX = 0.05
DOWN_FIRST = 0.5
DOWN_MAX = 10.0

# Compare-and-delete: release the lock only if it is still ours (it may have expired and been re-taken).
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


# -- the interface the resolver sees ----------------------------------------------------------------------
class Flight(Protocol):
    """One local miss as the shared tier handles it (see :meth:`SharedTier.begin`)."""

    entry: CacheEntry | None  # an answer taken from the shared tier: answer it, ask no upstream

    def publish(self, entry: CacheEntry | None) -> None:
        """The upstream answer (None: failed or not cacheable): share it and release the lock, in the background."""
        ...

    def end(self) -> None:
        """Release what ``publish`` did not (idempotent; call it in a ``finally``)."""
        ...


class SharedTier(Protocol):
    async def begin(self, key: CacheKey, local: Cache) -> Flight:
        """Look the key up (copying a fresh or stale shared answer into ``local``), else take or wait for the
        cross-gateway lock. Never raises because of Redis; waits at most ``lock_wait`` plus one timeout."""
        ...

    async def close(self) -> None: ...


# -- values and keys --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SharedEntry:
    key: CacheKey
    code: int
    record_blob: bytes
    stored_at: float
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def redis_keys(key: CacheKey, prefix: str = "ida:") -> tuple[str, str]:
    """(value key, lock key) of a cache key; both carry the handle's hash tag (one cluster slot)."""
    handle, types, indexes = key
    tag = _b64(hashlib.blake2b(handle.encode("utf-8"), digest_size=12).digest())
    tail = ""
    if types or indexes:
        tail = ":" + _b64(hashlib.blake2b(cbor2.dumps([list(types), list(indexes)]), digest_size=6).digest())
    return f"{prefix}c:{{{tag}}}{tail}", f"{prefix}l:{{{tag}}}{tail}"


def encode_value(entry: CacheEntry) -> bytes:
    blob = encode_record(entry.code, entry.key[0], entry.record)
    return cbor2.dumps(
        [
            VALUE_VERSION,
            round(entry.stored_at * 1000),
            round(entry.expires_at * 1000),
            list(entry.key[1]),
            list(entry.key[2]),
            blob,
        ]
    )


def decode_value(data: bytes, key: CacheKey) -> SharedEntry | None:
    """The value if it is ours and for exactly ``key``; None for another version, another key (a hash
    collision) or bytes that do not parse."""
    try:
        ver, stored_ms, expires_ms, types, indexes, blob = cbor2.loads(data)
        if ver != VALUE_VERSION or not isinstance(blob, bytes):
            return None
        code, handle, _values = cbor2.loads(blob)
        if (handle, tuple(types), tuple(indexes)) != key or code not in ANSWER_CODES:
            return None
        return SharedEntry(key, int(code), blob, int(stored_ms) / 1000, int(expires_ms) / 1000)
    except Exception:  # cbor2 raises several types; a bad value is a miss
        return None


def redact_url(url: str) -> str:
    """The URL without a password (for log lines)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


@dataclass(slots=True)
class SharedStats:
    hits: int = 0  # fresh answers taken from Redis
    stale: int = 0  # expired answers copied for serve-stale
    misses: int = 0  # nothing usable in Redis
    locks: int = 0  # cross-gateway locks taken (this gateway asked upstream for everybody)
    waits: int = 0  # lock held elsewhere: waited for that gateway's answer
    wait_hits: int = 0  # ... and got it
    wait_fallbacks: int = (
        0  # ... and did not (lock_wait expired, or the holder failed): asked upstream itself
    )
    writes: int = 0  # answers written to Redis
    errors: int = 0  # Redis calls that failed or timed out
    skipped: int = 0  # lookups skipped while Redis was down (local-only)
    up: int = 1  # 1 = Redis answering, 0 = degraded to local-only

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# -- the Redis tier ---------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class _RedisFlight:
    """One :meth:`RedisSharedCache.begin`: ``entry`` what the tier had (or another gateway answered), ``token``
    the lock this gateway holds (it publishes its answer and lets go once)."""

    tier: RedisSharedCache
    key: CacheKey
    entry: CacheEntry | None = None
    token: str | None = None
    done: bool = field(default=False, init=False)

    def publish(self, entry: CacheEntry | None) -> None:
        if self.done:
            return
        self.done = True
        if entry is not None or self.token is not None:
            self.tier._spawn(self.tier._finish(self.key, entry, self.token))

    def end(self) -> None:
        self.publish(None)


class RedisSharedCache:
    """:class:`SharedTier` on Redis (module doc). Build once per gateway; ``close()`` at stop."""

    def __init__(
        self,
        url: str,
        *,
        max_stale: float = 86400.0,
        lock_wait: float = 1.0,
        lock_ttl: float = 6.0,
        timeout: float = 0.25,
        prefix: str = "ida:",
        password: str | None = None,
        max_connections: int = 16,
        clock: Callable[[], float] = time.time,
        client: Any = None,
    ) -> None:
        if lock_wait < 0 or lock_ttl <= 0 or timeout <= 0 or max_stale < 0 or max_connections < 1:
            raise ValueError(
                "shared cache: lock_wait >= 0, lock_ttl > 0, timeout > 0, max_stale >= 0, max_connections >= 1"
            )
        self.url = url
        self.max_stale = max_stale
        self.lock_wait = lock_wait
        self.lock_ttl = lock_ttl
        self.timeout = timeout
        self.prefix = prefix
        self._clock = clock
        self._client = (
            client if client is not None else self._connect(url, timeout, password, max_connections)
        )
        # At most this many Redis calls at a time (so at most this many connections per Redis node): a burst of
        # misses queues here for microseconds instead of opening a connection per miss.
        self._slots = asyncio.Semaphore(max_connections)
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self._down_for = DOWN_FIRST
        self._closed = False
        self.stats = SharedStats()

    @staticmethod
    def _connect(url: str, timeout: float, password: str | None, max_connections: int) -> Any:
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        opts: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # no client-side retries: a failure opens our circuit instead
            "max_connections": max_connections,
        }
        if password:
            opts["password"] = password
        scheme, sep, rest = url.partition("://")
        if scheme in ("redis+cluster", "rediss+cluster"):
            return RedisCluster.from_url(scheme.split("+")[0] + sep + rest, **opts)
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"shared cache URL {redact_url(url)!r}: use redis://, rediss://, unix:// or redis+cluster://"
            )
        return Redis.from_url(url, **opts)

    @property
    def up(self) -> bool:
        return bool(self.stats.up)

    # -- circuit ---------------------------------------------------------------------------------------
    def _available(self) -> bool:
        if self._closed:
            return False
        if self.stats.up or time.monotonic() >= self._down_until:
            return True
        self.stats.skipped += 1
        return False

    def _failed(self, op: str, e: BaseException) -> None:
        self.stats.errors += 1
        self._down_until = time.monotonic() + self._down_for
        if self.stats.up:
            self.stats.up = 0
            log.warning(
                "shared cache down, resolving local-only %s",
                kv(
                    redis=redact_url(self.url),
                    op=op,
                    error=f"{type(e).__name__}: {e}",
                    retry_in=self._down_for,
                ),
            )
        else:
            log.debug(
                "shared cache still down %s", kv(op=op, error=type(e).__name__, retry_in=self._down_for)
            )
        self._down_for = min(DOWN_MAX, self._down_for * 2)

    def _worked(self) -> None:
        if not self.stats.up:
            self.stats.up = 1
            log.info("shared cache back %s", kv(redis=redact_url(self.url)))
        self._down_for = DOWN_FIRST

    async def _call(self, op: str, coro: Any, timeout: float | None = None) -> tuple[bool, Any]:
        """(True, result) or (False, None) after recording the failure. Never raises (except cancellation)."""
        try:
            async with self._slots:
                if not self.stats.up and time.monotonic() < self._down_until:  # went down while we queued
                    coro.close()
                    self.stats.skipped += 1
                    return False, None
                async with asyncio.timeout(timeout or self.timeout):
                    result = await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RedisError, OSError, TimeoutError, a cluster error: all mean "not now"
            self._failed(op, e)
            return False, None
        self._worked()
        return True, result

    async def ping(self, timeout: float = 2.0) -> bool:
        """One PING at start, with a longer timeout: it connects, and a cluster client learns the slot map."""
        ok, _ = await self._call("ping", self._client.ping(), max(timeout, self.timeout))
        return ok

    # -- the lookup ------------------------------------------------------------------------------------
    async def begin(self, key: CacheKey, local: Cache) -> Flight:
        if not self._available():
            return _RedisFlight(self, key)
        vkey, lkey = redis_keys(key, self.prefix)
        ok, raw = await self._call("get", self._client.get(vkey))
        if not ok:
            return _RedisFlight(self, key)
        adopted = self._adopt(key, raw, local)
        if adopted is not None:
            return _RedisFlight(self, key, adopted)
        token = secrets.token_hex(8)
        ok, taken = await self._call(
            "lock", self._client.set(lkey, token, nx=True, px=max(1, round(self.lock_ttl * 1000)))
        )
        if not ok:
            return _RedisFlight(self, key)
        if taken:
            self.stats.locks += 1
            return _RedisFlight(self, key, token=token)
        return _RedisFlight(self, key, await self._wait(key, vkey, lkey, local))

    def _adopt(self, key: CacheKey, raw: bytes | None, local: Cache) -> CacheEntry | None:
        """Copy a usable shared answer into ``local``; returns the local entry when it is fresh (answer it)."""
        shared = decode_value(raw, key) if raw else None
        now = self._clock()
        if shared is None or now > shared.expires_at + self.max_stale:
            self.stats.misses += 1
            return None
        mine = local.peek(key)
        newer = mine is None or shared.expires_at > mine.expires_at
        if now < shared.expires_at:
            if not newer:  # the same answer we hold (a prefetch): not a hit, a refresh is wanted
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            return self._put_local(local, shared)
        if newer:  # expired, but better than nothing if the upstream fails
            self.stats.stale += 1
            self._put_local(local, shared)
        else:
            self.stats.misses += 1
        return None

    @staticmethod
    def _put_local(local: Cache, shared: SharedEntry) -> CacheEntry | None:
        try:
            code, record = decode_record(shared.record_blob)
        except Exception:  # noqa: BLE001 -- a value we cannot read is a miss
            return None
        return local.put(shared.key, code, record, stored_at=shared.stored_at, expires_at=shared.expires_at)

    async def _wait(self, key: CacheKey, vkey: str, lkey: str, local: Cache) -> CacheEntry | None:
        """Another gateway holds the lock: poll for its answer, at most ``lock_wait`` seconds."""
        self.stats.waits += 1
        deadline = time.monotonic() + self.lock_wait
        delay = POLL_FIRST
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(delay, left))
            delay = min(POLL_MAX, delay * 2)
            pipe = self._client.pipeline(transaction=False)
            pipe.get(vkey)
            pipe.exists(lkey)
            ok, res = await self._call("wait", pipe.execute())
            if not ok:
                break
            raw, locked = res
            if raw:
                shared = decode_value(raw, key)
                if shared is not None and self._clock() < shared.expires_at:
                    entry = self._put_local(local, shared)
                    if entry is not None:
                        self.stats.wait_hits += 1
                        return entry
            if not locked:  # released without an answer: the holder failed; try for ourselves
                break
        self.stats.wait_fallbacks += 1
        return None

    # -- the write -------------------------------------------------------------------------------------
    async def _finish(self, key: CacheKey, entry: CacheEntry | None, token: str | None) -> None:
        vkey, lkey = redis_keys(key, self.prefix)
        if not self._available():
            return  # the lock (if any) expires by itself
        px = 0
        if entry is not None:
            px = round((entry.expires_at + self.max_stale - self._clock()) * 1000)
        pipe = self._client.pipeline(transaction=False)
        if px > 0:
            assert entry is not None
            pipe.set(vkey, encode_value(entry), px=px)
        if token is not None:
            pipe.eval(_UNLOCK, 1, lkey, token)
        if not len(pipe):
            return
        ok, _ = await self._call("put", pipe.execute())
        if ok and px > 0:
            self.stats.writes += 1

    def _spawn(self, coro: Any) -> None:
        if self._closed:
            coro.close()
            return
        task: asyncio.Task[None] = asyncio.create_task(coro, name="shared-cache write")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait for the writes in flight (tests, and stop)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        if self._closed:
            return
        await self.flush(min(2.0, self.timeout * 4))
        self._closed = True
        await cancel_all(self._tasks)
        with contextlib.suppress(Exception):
            await self._client.aclose()
