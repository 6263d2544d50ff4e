"""The resolver's cache: DNS-grade rules (Unbound / RFC 2308 / RFC 8767), bounded, persisted in SQLite.

Rules
-----
* **Key** = (normalised handle, type filter, index filter); :func:`cache_key` sorts and de-duplicates the
  filters, so ``type=URL&type=EMAIL`` and ``type=EMAIL&type=URL`` share an entry.
* **Lifetime** of a positive answer = the smallest value TTL (absolute TTLs count down) clamped to
  ``[min_ttl, max_ttl]`` (defaults 0 and 3600 s, as CNRI's MemCache). A lifetime of 0 means "always
  revalidate" but the entry is still kept for serve-stale.
* **Negative answers** (handle not found 100, values not found 200, and a success without values) live
  ``negative_ttl`` seconds (default 60), clamped to ``[0, negative_max_ttl]`` (default 300).
* **Errors are never cached**: :meth:`Cache.put` refuses any other code.
* **Serve-stale**: an expired entry is kept up to ``max_stale`` (1 day) past its expiry;
  :meth:`Cache.stale` hands it out when every upstream failed (the resolver answers it with a short TTL).
* **Prefetch window**: :meth:`CacheEntry.in_prefetch_window` is true in the last ``prefetch_fraction``
  (10 %) of the lifetime; the resolver refreshes such entries in the background, once per entry.
* **Bounds**: at most ``max_entries`` entries and ``max_bytes`` bytes; least recently used out first.
  An entry's size is its serialized form (key + CBOR record) plus ``ENTRY_OVERHEAD`` bytes.

Persistence
-----------
With a ``path``, entries live in one SQLite file (WAL, synchronous=NORMAL) and a new :class:`Cache` on the
same file starts warm: entries come back with their absolute expiry (wall-clock ``clock``, default
``time.time``) in least-recently-stored order; their records are decoded on first use, so a warm start
only reads keys and times (a damaged row is dropped when it is first used). Writes are write-behind: changes collect in memory and
go to SQLite in one transaction on :meth:`Cache.flush`, which runs when ``flush_max_pending`` changes
are waiting, when :meth:`Cache.maybe_flush` finds ``flush_interval`` elapsed (the resolver calls it on a
timer), and on :meth:`Cache.close`. A crash loses at most the changes of the last interval. A file that
is not a readable cache database is moved aside (``*.corrupt-<time>``) and a fresh one started: the cache
is disposable. A record is CBOR-encoded when it is flushed, not when it is stored (its size is computed
without encoding). Records are stored as CBOR ``[code, handle, [[index, type, data, ttl, ttlType, timestamp,
permissions, [[ref handle, ref index], ...]], ...]]``.

No I/O except SQLite, no asyncio, no global state; time comes from the injectable ``clock``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

from gateway.cache_store import (
    ANSWER_CODES,
    CacheKey,
    Row,
    Store,
    decode_record,
    encode_record,
    key_blob,
    key_from_blob,
    key_size,
    measure,
    record_size,
)
from gateway.resolution import etag_of
from proto import devicemsg
from proto.records import Record

__all__ = [
    "ANSWER_CODES",
    "Cache",
    "CacheConfig",
    "CacheEntry",
    "CacheKey",
    "CacheStats",
    "cache_key",
    "decode_record",
    "encode_record",
    "ENTRY_OVERHEAD",
]

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 256  # bytes charged per entry for the Python objects around the serialized form


def cache_key(handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()) -> CacheKey:
    """The cache key of an (already normalised) handle and its filters."""
    return handle, tuple(sorted(set(types))), tuple(sorted({int(i) for i in indexes}))


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 100_000
    max_bytes: int = 64 << 20
    min_ttl: float = 0.0
    max_ttl: float = 3600.0
    negative_ttl: float = 60.0
    negative_max_ttl: float = 300.0
    max_stale: float = 86400.0
    prefetch_fraction: float = 0.1
    flush_interval: float = 0.5
    flush_max_pending: int = 1000

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("cache max_entries and max_bytes must be positive")
        if not 0 <= self.min_ttl <= self.max_ttl:
            raise ValueError(f"cache needs 0 <= min_ttl <= max_ttl, got {self.min_ttl}, {self.max_ttl}")
        if self.negative_ttl < 0 or self.negative_max_ttl < 0 or self.max_stale < 0:
            raise ValueError("negative_ttl, negative_max_ttl and max_stale must not be negative")
        if not 0 <= self.prefetch_fraction < 1:
            raise ValueError("prefetch_fraction must be in [0, 1)")


@dataclass(slots=True, eq=False)
class CacheEntry:
    """One cached answer. ``record`` and ``etag`` of an entry restored from SQLite are decoded on first use
    (a warm start only reads keys and expiry times: the entry is made with ``_record`` None and the serialized
    record as ``_blob``); read them through the properties."""

    key: CacheKey
    code: int
    _record: Record | None
    stored_at: float
    expires_at: float
    size: int
    _etag: bytes | None = None
    _: KW_ONLY
    _blob: bytes | None = None  # serialized record still to decode
    prefetched: bool = field(default=False, init=False)  # a background refresh was started for this entry

    def materialise(self) -> None:
        """Decode a restored record now; raises ValueError (or a CBOR error) for a damaged one."""
        if self._blob is not None:
            code, record = decode_record(self._blob)
            if code != self.code:
                raise ValueError(f"stored code {code} != row code {self.code}")
            self._record, self._blob = record, None
        if self._etag is None:
            self._etag = etag_of(self._record, self.code)

    @property
    def record(self) -> Record | None:
        self.materialise()
        return self._record

    @property
    def etag(self) -> bytes:
        self.materialise()
        assert self._etag is not None
        return self._etag

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.stored_at

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def in_prefetch_window(self, now: float, fraction: float) -> bool:
        """Fresh, but in the last ``fraction`` of its lifetime."""
        life = self.lifetime
        return life > 0 and self.expires_at - fraction * life <= now < self.expires_at


@dataclass(slots=True)
class CacheStats:
    hits: int = 0  # fresh entry found
    misses: int = 0  # nothing, or only an expired entry
    stale: int = 0  # expired entries handed out by stale()
    prefetches: int = 0  # background refreshes started (counted by the resolver via note_prefetch)
    evictions: int = 0  # LRU evictions for the entry / byte bounds
    expired: int = 0  # entries dropped because they were more than max_stale past expiry
    inserts: int = 0
    entries: int = 0
    bytes: int = 0
    flushes: int = 0  # SQLite transactions written
    loaded: int = 0  # entries restored from SQLite at start

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# -- SQLite rows ------------------------------------------------------------------------------------------
def _row(key: CacheKey, entry: CacheEntry) -> Row:
    """The SQLite row of an entry stored by :meth:`Cache.put` (its record is in memory, never a blob)."""
    return (
        key_blob(key),
        entry.code,
        entry.stored_at,
        entry.expires_at,
        encode_record(entry.code, key[0], entry._record),
    )


# -- the cache ---------------------------------------------------------------------------------------------
class Cache:
    """LRU cache of answers with TTL rules, serve-stale and optional SQLite persistence (module doc)."""

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or CacheConfig()
        self._clock = clock
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()
        self._bytes = 0
        # not yet in SQLite: an entry to encode at flush (or its row, after a failed write); None = delete
        self._pending: dict[CacheKey, CacheEntry | Row | None] = {}
        self._last_flush = clock()
        self.stats = CacheStats()
        self._store: Store | None = None
        if path is not None:
            self._store = Store(Path(path))
            self._load()

    # -- rules ---------------------------------------------------------------------------------------
    def lifetime(self, code: int, record: Record | None, now: float) -> float:
        """Seconds an answer stays fresh (module doc)."""
        return self._clamp(
            code, record, record.min_ttl(now) if code == devicemsg.OK and record is not None else None
        )

    def _clamp(self, code: int, record: Record | None, min_ttl: float | None) -> float:
        """:meth:`lifetime` given the record's smallest value lifetime (None: no values)."""
        c = self.config
        if code == devicemsg.OK and record is not None and min_ttl is not None:
            return min(c.max_ttl, max(c.min_ttl, min_ttl))
        return min(c.negative_max_ttl, max(0.0, c.negative_ttl))

    # -- lookups -------------------------------------------------------------------------------------
    def get(self, key: CacheKey) -> CacheEntry | None:
        """The entry if it is fresh (a hit, moved to most recently used); None otherwise (a miss)."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and entry.fresh(now) and self._usable(key, entry):
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry
        self.stats.misses += 1
        entry = self._entries.get(key)
        if entry is not None and now > entry.expires_at + self.config.max_stale:
            self._drop(key, entry)
            self.stats.expired += 1
        return None

    def peek(self, key: CacheKey) -> CacheEntry | None:
        """The entry, fresh or expired, without counting or touching the LRU order."""
        return self._entries.get(key)

    def stale(self, key: CacheKey) -> CacheEntry | None:
        """An expired entry still within ``max_stale`` (counted as served stale), else None."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or entry.fresh(now):
            return None
        if now > entry.expires_at + self.config.max_stale:
            self._drop(key, entry)
            self.stats.expired += 1
            return None
        if not self._usable(key, entry):
            return None
        self._entries.move_to_end(key)
        self.stats.stale += 1
        return entry

    def _usable(self, key: CacheKey, entry: CacheEntry) -> bool:
        """Decode a restored entry; a damaged one is dropped (and deleted from SQLite)."""
        try:
            entry.materialise()
        except Exception as e:  # cbor2 raises several types; a bad row must never fail a resolution
            log.warning("cache.bad_row handle=%s error=%r", key[0], str(e))
            self._drop(key, entry)
            return False
        return True

    def note_prefetch(self, entry: CacheEntry) -> None:
        entry.prefetched = True
        self.stats.prefetches += 1

    # -- updates -------------------------------------------------------------------------------------
    def put(
        self,
        key: CacheKey,
        code: int,
        record: Record | None,
        *,
        stored_at: float | None = None,
        expires_at: float | None = None,
    ) -> CacheEntry | None:
        """Store an answer; returns its entry, or None when it alone exceeds ``max_bytes``.

        ``stored_at`` and ``expires_at`` (both or neither) keep times decided elsewhere -- an answer taken from
        the shared tier (gateway/shared_cache.py) keeps the expiry the first gateway computed, even when that
        is already past (kept for serve-stale). Raises ValueError for a code that is not an answer (errors
        are never cached).
        """
        if code not in ANSWER_CODES:
            raise ValueError(f"only answers are cached (codes {ANSWER_CODES}), not code {code}")
        now = self._clock()
        rec = record if code == devicemsg.OK else None
        if rec is not None:
            min_ttl, size, etag = measure(code, key[0], rec, now)
        else:
            min_ttl, size, etag = None, record_size(code, key[0], None), etag_of(None, code)
        if stored_at is not None and expires_at is not None:
            now, life = stored_at, max(0.0, expires_at - stored_at)
        else:
            life = self._clamp(code, rec, min_ttl)
        size += key_size(key) + ENTRY_OVERHEAD
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        if size > self.config.max_bytes:
            log.info("cache.too_large handle=%s size=%d max_bytes=%d", key[0], size, self.config.max_bytes)
            if old is not None and self._store is not None:
                self._pending[key] = None
            self._sync_gauges()
            return None
        entry = CacheEntry(key, code, rec, now, now + life, size, etag)
        self._entries[key] = entry
        self._bytes += size
        self.stats.inserts += 1
        if self._store is not None:
            self._pending[key] = entry  # encoded when flushed
        self._evict()
        self._sync_gauges()
        if len(self._pending) >= self.config.flush_max_pending:
            self.flush()
        return entry

    def remove(self, key: CacheKey) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._drop(key, entry)
        return True

    def purge(self) -> int:
        """Drop every entry more than ``max_stale`` past its expiry; returns how many."""
        limit = self._clock() - self.config.max_stale
        dead = [(k, e) for k, e in self._entries.items() if e.expires_at < limit]
        for k, e in dead:
            self._drop(k, e)
        self.stats.expired += len(dead)
        return len(dead)

    def _drop(self, key: CacheKey, entry: CacheEntry) -> None:
        del self._entries[key]
        self._bytes -= entry.size
        if self._store is not None:
            self._pending[key] = None
        self._sync_gauges()

    def _evict(self) -> None:
        c = self.config
        while self._entries and (len(self._entries) > c.max_entries or self._bytes > c.max_bytes):
            key, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size
            self.stats.evictions += 1
            if self._store is not None:
                self._pending[key] = None
            log.debug("cache.evict handle=%s size=%d", key[0], entry.size)

    def _sync_gauges(self) -> None:
        self.stats.entries = len(self._entries)
        self.stats.bytes = self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[CacheKey]:
        """Keys from least to most recently used."""
        return list(self._entries)

    # -- persistence ---------------------------------------------------------------------------------
    @property
    def dirty(self) -> int:
        """Changes waiting to be written to SQLite."""
        return len(self._pending)

    def maybe_flush(self) -> bool:
        """Flush when ``flush_interval`` has elapsed since the last flush and something is waiting."""
        if self._pending and self._clock() - self._last_flush >= self.config.flush_interval:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Write every pending change to SQLite in one transaction (no-op without a path)."""
        self._last_flush = self._clock()
        if self._store is None or not self._pending:
            self._pending.clear()
            return
        pending, self._pending = self._pending, {}
        rows = {k: _row(k, r) if isinstance(r, CacheEntry) else r for k, r in pending.items()}
        upserts = [r for r in rows.values() if r is not None]
        deletes = [key_blob(k) for k, r in rows.items() if r is None]
        t0 = time.perf_counter()
        try:
            self._store.write(upserts, deletes)
        except sqlite3.Error as e:  # disk full, file gone: keep serving from memory, retry later
            log.warning("cache.flush_failed path=%s rows=%d error=%r", self._store.path, len(rows), str(e))
            for k, r in rows.items():
                self._pending.setdefault(k, r)
            return
        self.stats.flushes += 1
        log.debug(
            "cache.flush upserts=%d deletes=%d ms=%.2f",
            len(upserts),
            len(deletes),
            (time.perf_counter() - t0) * 1000,
        )

    def _load(self) -> None:
        assert self._store is not None
        now = self._clock()
        try:
            rows = self._store.load(now - self.config.max_stale)
        except sqlite3.Error as e:
            log.warning("cache.load_failed path=%s error=%r", self._store.path, str(e))
            return
        bad: list[bytes] = []
        for kblob, code, stored_at, expires_at, blob in rows:
            try:
                key = key_from_blob(kblob)
                if code not in ANSWER_CODES or not isinstance(blob, bytes):
                    raise ValueError(f"row with code {code!r}")
            except Exception as e:  # a row we cannot read is dropped, never fatal
                log.warning("cache.bad_row error=%r", str(e))
                bad.append(kblob)
                continue
            size = len(blob) + len(kblob) + ENTRY_OVERHEAD
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[key] = CacheEntry(
                key, code, None, float(stored_at), float(expires_at), size, _blob=blob
            )
            self._bytes += size
            self.stats.loaded += 1
        if bad:
            self._store.write([], bad)
        self._evict()
        self._sync_gauges()
        log.info(
            "cache.loaded path=%s entries=%d bytes=%d", self._store.path, len(self._entries), self._bytes
        )

    def close(self) -> None:
        """Flush and close the SQLite file; the cache stays usable in memory."""
        self.flush()
        if self._store is not None:
            self._store.close()
            self._store = None
