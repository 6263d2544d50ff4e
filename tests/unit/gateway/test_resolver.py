"""Resolver: zone > cache > single-flight upstream > stale, prefetch, persistence, counters."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cache import Cache, CacheConfig, cache_key
from gateway.errors import AllUpstreamsFailed, NameNotServed, UpstreamBusy, UpstreamRefused, UpstreamTimeout
from gateway.resolution import Resolving, etag_of
from gateway.resolver import Resolver, ResolverConfig
from gateway.upstream.pool import UpstreamPool
from gateway.zone import Zone
from proto import devicemsg
from proto.identifier import IdentifierError
from tests.support.upstream_fakes import (
    PUMP,
    T0,
    Clock,
    FakeUpstream,
    RestNode,
    free_port,
    record,
    refused,
    value,
)

H = PUMP.handle


def make(
    *nodes: FakeUpstream,
    clock: Clock | None = None,
    cache: Cache | None = None,
    zone: Zone | None = None,
    pool_kw: dict[str, float] | None = None,
    **cfg: object,
) -> Resolver:
    """A resolver over ``nodes`` (``fake://0``, ``fake://1``...); its cache, unless given, is the one the config
    makes (kept in ``data_dir`` when the config has one), on ``clock``."""
    config = ResolverConfig(**cfg)  # type: ignore[arg-type]
    pool = UpstreamPool([(f"fake://{i}", n) for i, n in enumerate(nodes)], **(pool_kw or {}))  # type: ignore[arg-type]
    return Resolver(config, pool=pool, cache=cache, zone=zone, clock=clock or Clock())


def test_resolver_is_a_resolving() -> None:
    r: Resolving = make(FakeUpstream())
    assert r is not None


async def test_miss_then_hit() -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    r = make(up, clock=clock)
    a = await r.resolve("88.123.99/PUMP-0001")
    assert (a.code, a.source, a.handle, a.record) == (devicemsg.OK, devicemsg.SOURCE_UPSTREAM, H, PUMP)
    assert a.expires_at == T0 + 300 and a.max_age(T0) == 300
    assert a.etag == etag_of(PUMP, devicemsg.OK)
    clock.advance(10)
    b = await r.resolve("88.123.99/PUMP-0001")
    assert (b.source, b.expires_at, b.etag, b.record) == (devicemsg.SOURCE_CACHE, a.expires_at, a.etag, PUMP)
    assert up.calls == 1
    await r.close()


async def test_identifier_is_normalised_and_bad_ones_raise() -> None:
    up = FakeUpstream([PUMP])
    r = make(up)
    a = await r.resolve("88.123.99/PUMP-0001")
    b = await r.resolve("88.123.99/PUMP-0001".lower().replace("pump", "PUMP"))  # same after normalising
    assert a.handle == b.handle == H and up.calls == 1
    with pytest.raises(IdentifierError) as e:
        await r.resolve("no-slash")
    assert e.value.reason == "NO_SEPARATOR" and up.calls == 1
    await r.close()


async def test_negative_answers_are_cached() -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    r = make(up, clock=clock)
    a = await r.resolve("88.123.99/NOPE")
    assert (a.code, a.record, a.source, a.max_age(T0)) == (
        devicemsg.NOT_FOUND,
        None,
        devicemsg.SOURCE_UPSTREAM,
        60,
    )
    b = await r.resolve("88.123.99/NOPE")
    assert (b.code, b.source) == (devicemsg.NOT_FOUND, devicemsg.SOURCE_CACHE) and up.calls == 1
    clock.advance(61)
    await r.resolve("88.123.99/NOPE")
    assert up.calls == 2
    await r.close()


async def test_a_prefix_no_node_serves_is_remembered_for_the_negative_ttl() -> None:
    """Every node answers 301 (not responsible) for a foreign prefix: the resolver remembers the prefix for the
    negative TTL and refuses other handles under it without asking; other prefixes still go upstream."""
    up = FakeUpstream([PUMP], error=UpstreamRefused("not responsible", "fake://0", code=301))
    clock = Clock()
    r = make(up, clock=clock)
    with pytest.raises(NameNotServed) as first:
        await r.resolve("99.999/A")
    assert (first.value.prefix, first.value.code, up.calls) == ("99.999", 301, 1)
    with pytest.raises(NameNotServed):
        await r.resolve("99.999/B")  # same prefix, another handle: answered from the table
    assert up.calls == 1 and r.stats().not_served_answers == 1
    up.error = None
    assert (await r.resolve(H)).code == devicemsg.OK and up.calls == 2  # another prefix: asked as usual
    clock.advance(61)  # the negative TTL (60 s) is over: the prefix is asked again
    assert (await r.resolve("99.999/C")).code == devicemsg.NOT_FOUND and up.calls == 3
    await r.close()


async def test_the_table_of_prefixes_no_node_serves_is_bounded() -> None:
    from gateway import resolver as resolver_module

    up = FakeUpstream(error=UpstreamRefused("not responsible", "fake://0", code=301))
    r = make(up)
    limit = resolver_module.MAX_NOT_SERVED
    resolver_module.MAX_NOT_SERVED = 3
    try:
        for i in range(5):
            with pytest.raises(NameNotServed):
                await r.resolve(f"99.{i}/X")
        assert list(r._not_served) == ["99.2", "99.3", "99.4"]  # the oldest forgotten first
    finally:
        resolver_module.MAX_NOT_SERVED = limit
        await r.close()


async def test_filters_go_upstream_and_into_the_key() -> None:
    up = FakeUpstream([PUMP])
    r = make(up)
    a = await r.resolve(H, ("URL",))
    assert [v.type for v in a.record.values] == ["URL"]  # type: ignore[union-attr]
    assert up.requests[-1][1:] == (H, ("URL",), ())
    b = await r.resolve(H, (), (2,))
    assert [v.index for v in b.record.values] == [2]  # type: ignore[union-attr]
    assert up.requests[-1][1:] == (H, (), (2,))
    c = await r.resolve(H, ("NOPE",))
    assert (c.code, c.record) == (devicemsg.VALUES_NOT_FOUND, None)
    await r.resolve(H, ("URL",))
    await r.resolve(H)
    assert up.calls == 4  # URL (cached), index 2, NOPE, unfiltered
    assert len(r.cache) == 4
    await r.close()


async def test_upstream_ignoring_the_filter_is_filtered_locally() -> None:
    class Sloppy(FakeUpstream):
        async def resolve(self, handle, types=(), indexes=()):  # type: ignore[no-untyped-def]
            return await super().resolve(handle)

    r = make(Sloppy([PUMP]))
    a = await r.resolve(H, ("EMAIL",))
    assert [v.type for v in a.record.values] == ["EMAIL"]  # type: ignore[union-attr]
    assert (await r.resolve(H, ("NOPE",))).code == devicemsg.VALUES_NOT_FOUND
    await r.close()


# -- single-flight --------------------------------------------------------------------------------------
async def test_1000_concurrent_misses_make_one_upstream_request() -> None:
    up = FakeUpstream([PUMP])
    up.hold()
    r = make(up)
    tasks = [asyncio.create_task(r.resolve(H)) for _ in range(1000)]
    await asyncio.sleep(0.01)
    assert up.calls == 1
    up.release()
    answers = await asyncio.gather(*tasks)
    assert up.calls == 1
    assert {(a.code, a.source, a.etag) for a in answers} == {
        (devicemsg.OK, devicemsg.SOURCE_UPSTREAM, etag_of(PUMP, devicemsg.OK))
    }
    st = r.stats()
    assert st.upstream_fetches == 1 and st.coalesced == 999 and st.upstream["fake://0"].requests == 1
    assert st.cache.misses == 1000 and st.cache.inserts == 1
    await r.close()


async def test_single_flight_error_goes_to_waiters_but_is_not_remembered() -> None:
    up = FakeUpstream([PUMP], error=UpstreamBusy("busy"))
    up.hold()
    r = make(up)
    waiters = [asyncio.create_task(r.resolve(H)) for _ in range(50)]
    await asyncio.sleep(0.01)
    up.release()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert up.calls == 1
    assert all(isinstance(e, AllUpstreamsFailed) for e in results)
    assert isinstance(results[0].errors["fake://0"], UpstreamBusy)  # type: ignore[union-attr]
    assert len(r.cache) == 0  # errors are never cached
    up.error = None  # the node is fine again: the next caller asks again and gets the answer
    a = await r.resolve(H)
    assert (a.code, a.source) == (devicemsg.OK, devicemsg.SOURCE_UPSTREAM) and up.calls == 2
    assert r.stats().upstream_errors == 1
    await r.close()


async def test_caller_cancelled_does_not_cancel_the_shared_request() -> None:
    up = FakeUpstream([PUMP])
    up.hold()
    r = make(up)
    first = asyncio.create_task(r.resolve(H))
    second = asyncio.create_task(r.resolve(H))
    await asyncio.sleep(0.01)
    first.cancel()
    up.release()
    assert (await second).code == devicemsg.OK
    assert up.cancelled == 0 and up.calls == 1
    await r.close()


async def test_cancelled_waiters_leave_the_outcome_to_the_others() -> None:
    """Callers that give up (cancelled) are skipped when the answer -- or the error -- is handed out; nothing is
    left unretrieved (asyncio would log it)."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
    try:
        for error in (None, UpstreamBusy("busy")):
            up = FakeUpstream([PUMP], error=error)
            up.hold()
            r = make(up)
            callers = [asyncio.create_task(r.resolve(H)) for _ in range(4)]
            await asyncio.sleep(0.01)
            callers[0].cancel()  # the caller that started the request
            callers[2].cancel()
            up.release()
            results = await asyncio.gather(*callers, return_exceptions=True)
            assert isinstance(results[0], asyncio.CancelledError) and isinstance(
                results[2], asyncio.CancelledError
            )
            for res in (results[1], results[3]):
                if error is None:
                    assert not isinstance(res, BaseException) and res.code == devicemsg.OK
                else:
                    assert isinstance(res, AllUpstreamsFailed)
            assert up.calls == 1 and r.stats().inflight == 0
            await r.close()
            del callers, results
        gc.collect()
        await asyncio.sleep(0)
        assert unhandled == []
    finally:
        loop.set_exception_handler(None)


async def test_close_cancels_the_request_and_its_waiters() -> None:
    up = FakeUpstream([PUMP])
    up.hold()
    r = make(up)
    callers = [asyncio.create_task(r.resolve(H)) for _ in range(3)]
    await asyncio.sleep(0.01)
    await r.close()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(x, asyncio.CancelledError) for x in results)
    assert r.stats().inflight == 0


# -- serve-stale ----------------------------------------------------------------------------------------
async def test_all_upstreams_down_cached_expired_is_answered_stale() -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    r = make(up, clock=clock)
    await r.resolve(H)
    clock.advance(3600)  # long expired (lifetime 300), within max_stale
    up.error = refused()
    a = await r.resolve(H)
    assert (a.code, a.source, a.record) == (devicemsg.OK, devicemsg.SOURCE_STALE, PUMP)
    assert a.max_age(clock()) == 30  # stale reply TTL
    assert a.etag == etag_of(PUMP, devicemsg.OK)
    assert r.stats().cache.stale == 1 and r.stats().stale_answers == 1
    await r.close()


async def test_all_upstreams_down_uncached_fails_fast() -> None:
    a_node, b_node = FakeUpstream(error=refused()), FakeUpstream(error=refused())
    r = make(a_node, b_node, timeout=2.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(AllUpstreamsFailed) as e:
        await r.resolve("88.123.99/UNCACHED")
    assert loop.time() - t0 < 0.5  # the timeout is 2 s
    assert set(e.value.errors) == {"fake://0", "fake://1"}
    await r.close()


async def test_all_real_rest_nodes_refused_stale_and_fast_failure() -> None:
    """Same two rules with real sockets: the nodes are ports nobody listens on."""
    node = await RestNode([PUMP]).start()
    clock = Clock()
    dead = f"http://127.0.0.1:{free_port()}"
    config = ResolverConfig(upstreams=[node.url, dead], timeout=2.0, attempt_timeout=1.0)
    r = Resolver(config, cache=Cache(config.cache, clock=clock), clock=clock)
    assert (await r.resolve(H)).source == devicemsg.SOURCE_UPSTREAM
    await node.stop()  # now every upstream is down
    clock.advance(400)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    a = await r.resolve(H)
    assert a.source == devicemsg.SOURCE_STALE and a.record is not None
    with pytest.raises(AllUpstreamsFailed):
        await r.resolve("88.123.99/NEVER-SEEN")
    assert loop.time() - t0 < 0.5
    await r.close()


async def test_timeout_without_stale_raises_upstream_timeout() -> None:
    r = make(FakeUpstream([PUMP], latency=1.0), pool_kw={"timeout": 0.05, "attempt_timeout": 1.0})
    with pytest.raises(UpstreamTimeout):
        await r.resolve(H)
    await r.close()


async def test_slow_upstream_with_stale_entry_answers_stale_after_the_client_timer() -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    r = make(up, clock=clock, stale_answer_after=0.05)
    await r.resolve(H)
    clock.advance(400)
    up.hold()  # the upstream now hangs
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    a = await r.resolve(H)
    assert a.source == devicemsg.SOURCE_STALE and 0.04 < loop.time() - t0 < 0.5
    up.release()  # the request went on and now refreshes the cache
    await asyncio.sleep(0.01)
    b = await r.resolve(H)
    assert b.source == devicemsg.SOURCE_CACHE and up.calls == 2
    await r.close()


# -- prefetch -------------------------------------------------------------------------------------------
async def test_prefetch_in_the_last_tenth_of_the_lifetime() -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    r = make(up, clock=clock)
    await r.resolve(H)  # lifetime 300 s
    clock.advance(260)  # 87 %: a plain hit
    assert (await r.resolve(H)).source == devicemsg.SOURCE_CACHE
    await asyncio.sleep(0)
    assert up.calls == 1
    clock.advance(15)  # 92 %: a hit that also refreshes in the background
    up.hold()
    a = await r.resolve(H)
    assert a.source == devicemsg.SOURCE_CACHE and a.expires_at == T0 + 300  # answered at once, from the cache
    await asyncio.sleep(0.01)
    assert up.calls == 2
    for _ in range(5):  # once per entry: more hits do not start more refreshes
        await r.resolve(H)
    assert up.calls == 2 and r.stats().cache.prefetches == 1
    up.release()
    await asyncio.sleep(0.01)
    c = await r.resolve(H)
    assert c.source == devicemsg.SOURCE_CACHE and c.expires_at == T0 + 275 + 300  # the refreshed entry
    await r.close()


async def test_prefetch_can_be_turned_off() -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    r = make(up, clock=clock, prefetch=False)
    await r.resolve(H)
    clock.advance(290)
    await r.resolve(H)
    await asyncio.sleep(0.01)
    assert up.calls == 1
    await r.close()


# -- zone -----------------------------------------------------------------------------------------------
async def test_zone_answers_before_cache_and_without_upstream() -> None:
    up = FakeUpstream(error=refused())
    local = record("88.123.99/LOCAL-1", value(1, "URL", "https://factory.local/1", ttl=120))
    r = make(up, zone=Zone([local]))
    a = await r.resolve("88.123.99/LOCAL-1")
    assert (a.code, a.source, a.record, a.max_age(T0)) == (devicemsg.OK, devicemsg.SOURCE_ZONE, local, 120)
    assert a.etag == etag_of(local, devicemsg.OK)
    b = await r.resolve("88.123.99/LOCAL-1", ("EMAIL",))
    assert (b.code, b.source) == (devicemsg.VALUES_NOT_FOUND, devicemsg.SOURCE_ZONE)
    r.zone.add(record("88.123.99/LOCAL-2", value(1, "URL", "x")), persist=False)  # added at run time
    assert (await r.resolve("88.123.99/LOCAL-2")).source == devicemsg.SOURCE_ZONE
    assert up.calls == 0 and len(r.cache) == 0 and r.stats().zone_hits == 3
    await r.close()


async def test_zone_file_in_the_data_dir_is_loaded(tmp_path: Path) -> None:
    (tmp_path / "zone.json").write_text(
        json.dumps(
            {"88.123.99/Z": [{"index": 1, "type": "URL", "data": {"format": "string", "value": "https://z"}}]}
        )
    )
    r = Resolver(ResolverConfig(upstreams=["http://127.0.0.1:9"], data_dir=tmp_path))
    a = await r.resolve("88.123.99/Z")
    assert (
        a.source == devicemsg.SOURCE_ZONE and a.record is not None and a.record.values[0].data == b"https://z"
    )
    await r.close()


# -- persistence ----------------------------------------------------------------------------------------
async def test_restart_answers_from_sqlite_without_upstream(tmp_path: Path) -> None:
    clock = Clock()
    r = make(FakeUpstream([PUMP]), clock=clock, upstreams=["fake://0"], data_dir=tmp_path)
    first = await r.resolve(H)
    await r.resolve("88.123.99/NOPE")
    await r.close()  # flushes
    assert (tmp_path / "cache.sqlite3").exists()

    clock.advance(30)
    down = FakeUpstream(error=refused())
    r2 = make(down, clock=clock, upstreams=["fake://0"], data_dir=tmp_path)
    a = await r2.resolve(H)
    assert (a.source, a.record, a.expires_at, a.etag) == (
        devicemsg.SOURCE_CACHE,
        PUMP,
        first.expires_at,
        first.etag,
    )
    assert (await r2.resolve("88.123.99/NOPE")).code == devicemsg.NOT_FOUND
    assert down.calls == 0
    await r2.close()


async def test_write_behind_flushes_on_a_timer(tmp_path: Path) -> None:
    config = ResolverConfig(data_dir=tmp_path, cache=CacheConfig(flush_interval=0.02))
    up = FakeUpstream([PUMP])
    r = Resolver(config, pool=UpstreamPool([("fake://0", up)]))
    await r.resolve(H)
    assert r.cache.dirty == 1
    await asyncio.sleep(0.1)
    assert r.cache.dirty == 0 and r.cache.stats.flushes >= 1
    await r.close()


# -- stats and lifecycle --------------------------------------------------------------------------------
async def test_stats_for_metrics() -> None:
    r = make(FakeUpstream([PUMP]))
    await r.resolve(H)
    await r.resolve(H)
    d = r.stats().as_dict()
    assert d["cache"]["hits"] == 1 and d["cache"]["misses"] == 1 and d["cache"]["entries"] == 1
    assert d["upstream"]["fake://0"]["requests"] == 1
    assert d["upstream"]["fake://0"]["latency"]["count"] == 1
    json.dumps(d, default=str)
    await r.close()


async def test_close_closes_upstreams_and_refuses_more_work() -> None:
    up = FakeUpstream([PUMP])
    r = make(up)
    await r.resolve(H)
    await r.close()
    await r.close()  # idempotent
    assert up.closed
    with pytest.raises(RuntimeError):
        await r.resolve(H)


async def test_default_config_uses_the_native_upstream() -> None:
    r = Resolver(ResolverConfig())
    assert r.pool.nodes == ["hdl://127.0.0.1:2641"]
    await r.close()


def test_cache_config_from_resolver_config() -> None:
    c = CacheConfig(min_ttl=5, max_ttl=60, negative_ttl=10, max_stale=100)
    assert Resolver(ResolverConfig(cache=c), pool=UpstreamPool([])).cache.config is c
    assert ResolverConfig(data_dir=Path("/d"), persist=False).cache_path() is None
    assert ResolverConfig(data_dir=Path("/d")).zone_path() == Path("/d/zone.json")


def test_cache_key_shape() -> None:
    assert cache_key(H, ("URL",), (1,)) == (H, ("URL",), (1,))


# -- the resolver's shortcut for plainly valid identifiers ---------------------------------------------------------
def _normalised(text: str) -> object:
    from proto import identifier

    try:
        return identifier.normalise(text)
    except identifier.IdentifierError as e:
        return e.reason


def _shortcut(text: str) -> object:
    from gateway.resolver import _normalise
    from proto import identifier

    try:
        return _normalise(text)
    except identifier.IdentifierError as e:
        return e.reason


_alphabet = st.sampled_from(list("aZ09-_./. \t\n\x7f\x80éÄ𝄞/") + ["\x00", "\x1f", "\x9f", "\ud800"])


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(_alphabet, max_size=30),
        st.text(max_size=30),
        st.builds(lambda p, s: f"{p}/{s}", st.text(_alphabet, max_size=12), st.text(_alphabet, max_size=12)),
    )
)
def test_normalise_shortcut_is_identifier_normalise(text: str) -> None:
    assert _shortcut(text) == _normalised(text)


@pytest.mark.parametrize(
    "text",
    [
        "88.123.99/PUMP-0001",
        "88.abc.Xy_-z/a/b c~",
        "a/b",
        "A.b/" + "x" * 251,
        "A.b/" + "x" * 252,
        "a..b/x",
        ".a/x",
        "a./x",
        "a/",
        "/x",
        "ab",
        "a b/x",
        "a/\x7f",
        "a/\x1f",
        "88.1/Ä",
        "",
    ],
)
def test_normalise_shortcut_edges(text: str) -> None:
    assert _shortcut(text) == _normalised(text)
