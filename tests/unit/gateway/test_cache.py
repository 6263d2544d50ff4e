"""The cache rules one by one (gateway/cache.py), with a manual clock: no test sleeps."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway.cache import ENTRY_OVERHEAD, Cache, CacheConfig, cache_key, decode_record, encode_record
from proto import devicemsg
from proto.records import TTL_ABSOLUTE, HandleValue, Record
from tests.support.upstream_fakes import PUMP, T0, Clock, record, value

KEY = cache_key(PUMP.handle)


def make(clock: Clock | None = None, path: Path | None = None, **kw: float) -> Cache:
    return Cache(CacheConfig(**kw), path=path, clock=clock or Clock())  # type: ignore[arg-type]


# -- lifetime -----------------------------------------------------------------------------------------
def test_lifetime_is_the_smallest_value_ttl() -> None:
    clock = Clock()
    c = make(clock)
    e = c.put(KEY, devicemsg.OK, PUMP)  # ttls 600, 300, 86400
    assert e is not None and e.expires_at == T0 + 300
    assert c.get(KEY) is e
    clock.advance(299.9)
    assert c.get(KEY) is e
    clock.advance(0.2)
    assert c.get(KEY) is None


def test_lifetime_clamped_to_max_ttl() -> None:
    c = make()
    e = c.put(KEY, devicemsg.OK, record(PUMP.handle, value(1, "URL", "x", ttl=86400)))
    assert e is not None and e.lifetime == 3600  # default max_ttl, as CNRI


def test_lifetime_clamped_to_min_ttl() -> None:
    c = make(min_ttl=30)
    e = c.put(KEY, devicemsg.OK, record(PUMP.handle, value(1, "URL", "x", ttl=5)))
    assert e is not None and e.lifetime == 30


def test_lifetime_zero_ttl_is_never_fresh_but_kept_for_stale() -> None:
    clock = Clock()
    c = make(clock)
    c.put(KEY, devicemsg.OK, record(PUMP.handle, value(1, "URL", "x", ttl=0)))
    assert c.get(KEY) is None
    assert c.stale(KEY) is not None


def test_absolute_ttl_counts_down() -> None:
    c = make()
    e = c.put(
        KEY, devicemsg.OK, record(PUMP.handle, value(1, "URL", "x", ttl=int(T0) + 50, ttl_type=TTL_ABSOLUTE))
    )
    assert e is not None and e.lifetime == 50


# -- negative caching ---------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [devicemsg.NOT_FOUND, devicemsg.VALUES_NOT_FOUND])
def test_negative_answers_cached_with_default_60s(code: int) -> None:
    clock = Clock()
    c = make(clock)
    e = c.put(KEY, code, None)
    assert e is not None and e.lifetime == 60 and e.record is None
    clock.advance(59)
    assert c.get(KEY) is e
    clock.advance(2)
    assert c.get(KEY) is None


@pytest.mark.parametrize("code", [devicemsg.NOT_FOUND, devicemsg.VALUES_NOT_FOUND])
def test_negative_lifetime_clamped_to_300s(code: int) -> None:
    c = make(negative_ttl=3600)  # asked for an hour, clamped to negative_max_ttl
    e = c.put(KEY, code, None)
    assert e is not None and e.lifetime == 300


def test_success_without_values_is_negative() -> None:
    c = make()
    e = c.put(KEY, devicemsg.OK, Record(PUMP.handle, ()))
    assert e is not None and e.lifetime == 60


# -- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [2, 3, 302, devicemsg.UPSTREAM_UNAVAILABLE, devicemsg.UPSTREAM_TIMEOUT])
def test_errors_are_never_cached(code: int) -> None:
    c = make()
    with pytest.raises(ValueError, match="only answers"):
        c.put(KEY, code, None)
    assert len(c) == 0 and c.stats.inserts == 0


# -- key ----------------------------------------------------------------------------------------------
def test_filters_are_part_of_the_key() -> None:
    assert cache_key("A/b", ("URL", "EMAIL", "URL"), (2, 1)) == ("A/b", ("EMAIL", "URL"), (1, 2))
    c = make()
    c.put(cache_key(PUMP.handle), devicemsg.OK, PUMP)
    c.put(cache_key(PUMP.handle, ("URL",)), devicemsg.OK, PUMP.select(("URL",)))
    c.put(cache_key(PUMP.handle, (), (2,)), devicemsg.VALUES_NOT_FOUND, None)
    assert len(c) == 3
    hit = c.get(cache_key(PUMP.handle, ("URL",)))
    assert hit is not None and hit.record is not None and [v.type for v in hit.record.values] == ["URL"]
    neg = c.get(cache_key(PUMP.handle, (), (2,)))
    assert neg is not None and neg.code == devicemsg.VALUES_NOT_FOUND
    assert c.get(cache_key(PUMP.handle, ("EMAIL",))) is None


# -- bounds -------------------------------------------------------------------------------------------
def _key(i: int) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    return cache_key(f"88.1/{i:04d}")


def test_lru_eviction_by_entries() -> None:
    c = make(max_entries=3)
    for i in range(3):
        c.put(_key(i), devicemsg.NOT_FOUND, None)
    assert c.get(_key(0)) is not None  # 0 is now the most recently used; 1 is the oldest
    c.put(_key(3), devicemsg.NOT_FOUND, None)
    assert _key(1) not in c and all(_key(i) in c for i in (0, 2, 3))
    assert c.stats.evictions == 1 and c.stats.entries == 3


def test_lru_eviction_by_bytes() -> None:
    big = record("88.1/x", value(1, "BLOB", b"\x00" * 1000, ttl=100))
    one = Cache(CacheConfig(), clock=Clock()).put(_key(0), devicemsg.OK, big)
    assert one is not None
    size = one.size
    assert size > 1000 + ENTRY_OVERHEAD
    c = make(max_bytes=3 * size + 10)
    for i in range(3):
        c.put(_key(i), devicemsg.OK, big)
    assert len(c) == 3 and c.stats.bytes == 3 * size
    c.get(_key(0))
    c.put(_key(3), devicemsg.OK, big)
    assert _key(1) not in c and len(c) == 3
    assert c.stats.evictions == 1 and c.stats.bytes == 3 * size


def test_entry_larger_than_the_cache_is_not_stored() -> None:
    c = make(max_bytes=500)
    assert c.put(KEY, devicemsg.OK, record(PUMP.handle, value(1, "BLOB", b"\x00" * 1000))) is None
    assert len(c) == 0 and c.stats.bytes == 0


# -- prefetch window, stale ---------------------------------------------------------------------------
def test_prefetch_window_is_the_last_tenth_of_the_lifetime() -> None:
    clock = Clock()
    c = make(clock)
    e = c.put(KEY, devicemsg.OK, record(PUMP.handle, value(1, "URL", "x", ttl=100)))
    assert e is not None
    clock.advance(89.9)
    assert not e.in_prefetch_window(clock(), 0.1)
    clock.advance(0.2)
    assert e.in_prefetch_window(clock(), 0.1)
    clock.advance(10)
    assert not e.in_prefetch_window(clock(), 0.1)  # expired: no longer a hit at all


def test_stale_entries_kept_up_to_max_stale() -> None:
    clock = Clock()
    c = make(clock, max_stale=1000)
    c.put(KEY, devicemsg.OK, PUMP)
    assert c.stale(KEY) is None  # fresh entries are not "stale"
    clock.advance(300 + 999)
    assert c.get(KEY) is None
    s = c.stale(KEY)
    assert s is not None and s.record == PUMP and c.stats.stale == 1
    clock.advance(2)
    assert c.stale(KEY) is None and KEY not in c and c.stats.expired == 1


def test_purge_drops_entries_past_max_stale() -> None:
    clock = Clock()
    c = make(clock, max_stale=10)
    c.put(_key(1), devicemsg.NOT_FOUND, None)
    clock.advance(50)
    c.put(_key(2), devicemsg.NOT_FOUND, None)
    clock.advance(30)  # key 1 is 80 s past its 60 s lifetime -> 20 s past expiry, key 2 still fresh
    assert c.purge() == 1 and c.keys() == [_key(2)]


# -- serialization and persistence --------------------------------------------------------------------
def test_record_blob_roundtrip_keeps_everything() -> None:
    rec = record(
        "88.1/x",
        value(7, "X", b"\xff\x00", ttl=5, ttl_type=TTL_ABSOLUTE, timestamp=123, permissions=3),
        *PUMP.values,
    )
    rec = Record(rec.handle, rec.values + (value(9, "HS_VLIST", b"", references=()),))  # type: ignore[arg-type]
    assert decode_record(encode_record(devicemsg.OK, rec.handle, rec)) == (devicemsg.OK, rec)
    assert decode_record(encode_record(devicemsg.NOT_FOUND, "88.1/x", None)) == (devicemsg.NOT_FOUND, None)


def test_restart_starts_warm_from_sqlite(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "cache.sqlite3"
    c = make(clock, path)
    c.put(KEY, devicemsg.OK, PUMP)
    c.put(cache_key("88.1/missing"), devicemsg.NOT_FOUND, None)
    c.close()

    clock.advance(50)
    c2 = make(clock, path)
    assert c2.stats.loaded == 2
    e = c2.get(KEY)
    assert e is not None and e.record == PUMP and e.expires_at == T0 + 300  # absolute expiry restored
    neg = c2.get(cache_key("88.1/missing"))
    assert neg is not None and neg.code == devicemsg.NOT_FOUND
    c2.close()


def test_restart_drops_entries_past_max_stale_and_keeps_stale_ones(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "c.db"
    c = make(clock, path, max_stale=1000)
    c.put(_key(1), devicemsg.NOT_FOUND, None)  # expires T0+60
    clock.advance(2000)
    c.put(_key(2), devicemsg.NOT_FOUND, None)  # expires T0+2060
    c.close()
    clock.advance(100)  # key 2 expired 40 s ago: stale but usable
    c2 = make(clock, path, max_stale=1000)
    assert c2.keys() == [_key(2)]
    assert c2.get(_key(2)) is None and c2.stale(_key(2)) is not None
    c2.close()


def test_sqlite_file_is_wal(tmp_path: Path) -> None:
    c = make(path=tmp_path / "c.db")
    c.close()
    con = sqlite3.connect(tmp_path / "c.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def _rows(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT count(*) FROM entries").fetchone()[0])
    finally:
        con.close()


def test_write_behind_is_bounded_by_time_and_count(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "c.db"
    c = Cache(CacheConfig(flush_interval=0.5, flush_max_pending=10), path=path, clock=clock)
    c.put(_key(0), devicemsg.NOT_FOUND, None)
    assert c.dirty == 1 and _rows(path) == 0
    assert not c.maybe_flush()  # interval not elapsed yet
    clock.advance(0.6)
    assert c.maybe_flush() and c.dirty == 0 and _rows(path) == 1
    for i in range(1, 11):  # the 10th pending change forces a flush
        c.put(_key(i), devicemsg.NOT_FOUND, None)
    assert c.dirty == 0 and _rows(path) == 11
    c.close()


def test_evictions_and_removals_reach_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    c = make(path=path, max_entries=2)
    for i in range(4):
        c.put(_key(i), devicemsg.NOT_FOUND, None)
    c.flush()
    assert _rows(path) == 2
    c.remove(_key(3))
    c.close()
    assert _rows(path) == 1


def test_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    c = make(path=path)
    c.put(KEY, devicemsg.OK, PUMP)
    c.close()
    assert _rows(path) == 1
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]


def test_bad_rows_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    c = make(path=path)
    c.put(KEY, devicemsg.OK, PUMP)
    c.close()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO entries VALUES (?, 1, ?, ?, ?)", (b"\xff", T0, T0 + 100, b"junk"))
    con.commit()
    con.close()
    c2 = make(path=path)
    assert c2.stats.loaded == 1 and c2.get(KEY) is not None
    c2.close()


def test_cache_throughput() -> None:
    """Not a benchmark, a guard: gets and puts stay well above what one gateway needs."""
    c = make(max_entries=10_000)
    keys = [_key(i) for i in range(1000)]
    t0 = time.perf_counter()
    for k in keys:
        c.put(k, devicemsg.OK, PUMP)
    for _ in range(10):
        for k in keys:
            c.get(k)
    dt = time.perf_counter() - t0
    assert dt < 2.0, f"11000 cache operations took {dt:.2f}s"


@pytest.mark.parametrize(
    "rec",
    [
        PUMP,
        Record(
            "88.123.99/ÄÖ-ü", (value(1, "URL", b"x" * 300, ttl=-5), value(70000, "ÉMAIL", b"", ttl=2**40))
        ),
        Record(
            "88.123.99/REF",
            (
                HandleValue(
                    3, "HS_ALIAS", b"a" * 24, 0x100000000, 1, 2**63, -1, (("0.NA/88", 300), ("ü/x", -(2**64)))
                ),
            ),
        ),
        Record("88.123.99/BIG", (HandleValue(1, "URL", b"y", 2**70, 0, 0, 0, ()),)),  # encoded to measure
        Record("88.123.99/EMPTY", ()),
    ],
)
def test_size_without_encoding_matches_the_encoded_form(rec: Record) -> None:
    from gateway.cache_store import key_blob, key_size, record_size

    for code in (devicemsg.OK, devicemsg.NOT_FOUND):
        r = rec if code == devicemsg.OK else None
        assert record_size(code, rec.handle, r) == len(encode_record(code, rec.handle, r))
    for key in (cache_key(rec.handle), cache_key(rec.handle, ("URL", "ÉMAIL"), (1, 300, 70000, 2**33))):
        assert key_size(key) == len(key_blob(key))


def test_pending_entries_are_encoded_at_flush(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    c = make(path=path)
    c.put(KEY, devicemsg.OK, PUMP)
    assert c.dirty == 1 and _rows(path) == 0
    c.flush()
    assert _rows(path) == 1
    con = sqlite3.connect(path)
    (blob,) = con.execute("SELECT record FROM entries").fetchone()
    con.close()
    assert blob == encode_record(devicemsg.OK, KEY[0], PUMP)
    c.close()


_MEASURED = [
    PUMP,
    Record("88.123.99/ÄÖ-ü", (value(1, "URL", b"x" * 300, ttl=-5), value(70000, "ÉMAIL", b"", ttl=2**40))),
    Record(
        "88.123.99/REF",
        (
            HandleValue(
                3, "HS_ALIAS", b"a" * 24, 0x100000000, 1, 2**63, -1, (("0.NA/88", 300), ("ü/x", -(2**64)))
            ),
        ),
    ),
    Record("88.123.99/BIG", (HandleValue(1, "URL", b"y", 2**70, 0, 0, 0, ()),)),
    Record(
        "88.123.99/IDX", (HandleValue(2**32, "URL", b"y", 5, 0, 0, 0, ()),)
    ),  # etag_of cannot take this index
    Record(
        "88.123.99/ABS",
        (
            HandleValue(1, "URL", b"y", int(T0) + 50, TTL_ABSOLUTE, 0, 0, ()),
            HandleValue(2, "URL", b"z", int(T0) - 50, TTL_ABSOLUTE, 0, 0, ()),
            HandleValue(3, "URL", b"w", 10, 0, 0, 0, ()),
        ),
    ),
    Record("88.123.99/STR", (HandleValue(1, "URL", "text", 5, 0, 0, 0, ()),)),  # type: ignore[arg-type]
    Record("88.123.99/EMPTY", ()),
]


@pytest.mark.parametrize("rec", _MEASURED, ids=lambda r: r.handle)
def test_measure_is_min_ttl_size_and_etag(rec: Record) -> None:
    """Cache.put's one pass gives what the three functions give (or raises what they raise)."""
    from gateway.cache_store import measure, record_size
    from gateway.resolution import etag_of

    def three() -> object:
        try:
            return rec.min_ttl(T0), record_size(devicemsg.OK, rec.handle, rec), etag_of(rec, devicemsg.OK)
        except Exception as e:
            return type(e)

    try:
        got: object = measure(devicemsg.OK, rec.handle, rec, T0)
    except Exception as e:
        got = type(e)
    assert got == three()


@pytest.mark.parametrize(
    "rec",
    [r for r in _MEASURED if r.handle not in ("88.123.99/IDX", "88.123.99/STR")],
    ids=lambda r: r.handle,
)
def test_put_entry_has_the_lifetime_size_and_etag_of_the_rules(rec: Record) -> None:
    from gateway.cache_store import key_blob
    from gateway.resolution import etag_of

    c = make(clock=Clock(), max_ttl=10**6)
    e = c.put(cache_key(rec.handle), devicemsg.OK, rec)
    assert e is not None
    assert e.lifetime == c.lifetime(devicemsg.OK, rec, T0)
    key_blob = key_blob(cache_key(rec.handle))
    assert e.size == len(encode_record(devicemsg.OK, rec.handle, rec)) + len(key_blob) + ENTRY_OVERHEAD
    assert e.etag == etag_of(rec, devicemsg.OK)
