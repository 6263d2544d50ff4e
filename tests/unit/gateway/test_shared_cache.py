"""The Redis shared cache tier (gateway/shared_cache.py) with a real redis-server: several resolvers (as several
gateways would) share answers with the same expiry, make one upstream request per key between them, fall back
when a lock holder dies, serve stale answers another gateway fetched, and resolve local-only while Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator

import cbor2
import pytest

from gateway.cache import Cache, CacheConfig, cache_key
from gateway.errors import AllUpstreamsFailed
from gateway.resolution import Answer
from gateway.resolver import Resolver, ResolverConfig
from gateway.shared_cache import RedisSharedCache, decode_value, encode_value, redact_url, redis_keys
from gateway.upstream.pool import UpstreamPool
from proto import devicemsg
from tests.support.faultkit import RedisServer
from tests.support.upstream_fakes import PUMP, Clock, FakeUpstream

H = PUMP.handle


def gateway(
    up: FakeUpstream, url: str, clock: Clock, *, lock_wait: float = 1.0, timeout: float = 2.0
) -> tuple[Resolver, RedisSharedCache]:
    """One gateway's resolver: its own local (memory) cache, the shared Redis tier, the common upstream."""
    cfg = ResolverConfig(prefetch=False)
    shared = RedisSharedCache(
        url, max_stale=cfg.cache.max_stale, clock=clock, lock_wait=lock_wait, timeout=timeout
    )
    pool = UpstreamPool([("fake://up", up)])  # type: ignore[list-item]
    r = Resolver(cfg, pool=pool, cache=Cache(cfg.cache, clock=clock), clock=clock, shared=shared)
    return r, shared


@contextlib.asynccontextmanager
async def gateways(
    n: int, up: FakeUpstream, url: str, clock: Clock, **kw: float
) -> AsyncIterator[list[tuple[Resolver, RedisSharedCache]]]:
    """``n`` gateways (:func:`gateway`) over one upstream and one Redis, closed when the block ends."""
    made = [gateway(up, url, clock, **kw) for _ in range(n)]
    try:
        yield made
    finally:
        for r, shared_tier in made:
            await r.close()
            await shared_tier.close()


async def shared(g: tuple[Resolver, RedisSharedCache], handle: str) -> Answer:
    """``handle`` resolved by gateway ``g``, its answer written to Redis before this returns."""
    answer = await g[0].resolve(handle)
    await g[1].flush()
    return answer


def test_keys_share_one_hash_slot_and_values_check_their_key() -> None:
    k = cache_key(H, ("URL", "EMAIL"), (1,))
    vkey, lkey = redis_keys(k)
    tag = vkey[vkey.index("{") : vkey.index("}") + 1]
    assert tag in lkey and tag in redis_keys(cache_key(H))[0]  # every variant of one handle: one slot
    assert redis_keys(cache_key(H))[0] != vkey and len(vkey) < 40
    long_handle = "88.123.99/" + "X" * 240
    assert len(redis_keys(cache_key(long_handle))[0]) == len(redis_keys(cache_key(H))[0])  # fixed size

    cache = Cache(CacheConfig(), clock=Clock())
    entry = cache.put(cache_key(H), devicemsg.OK, PUMP)
    assert entry is not None
    raw = encode_value(entry)
    got = decode_value(raw, cache_key(H))
    assert got is not None and (got.code, got.expires_at, got.stored_at) == (
        devicemsg.OK,
        entry.expires_at,
        entry.stored_at,
    )
    assert decode_value(raw, cache_key("88.123.99/OTHER")) is None  # a hash collision is a miss
    assert decode_value(raw, cache_key(H, ("URL",))) is None
    assert decode_value(b"\xff garbage", cache_key(H)) is None
    assert decode_value(cbor2.dumps([99, 0, 0, [], [], b""]), cache_key(H)) is None  # another version
    assert len(raw) < 200, len(raw)  # compact: the whole sample record
    assert redact_url("redis://u:secret@h:6379/0") == "redis://***@h:6379/0"


async def test_gateways_share_answers_with_the_same_expiry(redis_server: RedisServer) -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    async with gateways(2, up, redis_server.url, clock) as (g1, g2):
        a1 = await shared(g1, H)
        clock.advance(7)  # the second gateway asks 7 s later: the answer must count down, not restart
        a2 = await g2[0].resolve(H)
        assert up.calls == 1
        assert (a1.source, a2.source) == (devicemsg.SOURCE_UPSTREAM, devicemsg.SOURCE_CACHE)
        assert a2.expires_at == a1.expires_at and a2.etag == a1.etag and a2.record == a1.record
        assert a2.max_age(clock()) == a1.max_age(clock() - 7) - 7
        # negative answers are shared too, with their own (short) lifetime
        n1 = await shared(g1, "88.123.99/NOPE")
        n2 = await g2[0].resolve("88.123.99/NOPE")
        assert (n1.code, n2.code, n2.source, up.calls) == (
            devicemsg.NOT_FOUND,
            devicemsg.NOT_FOUND,
            devicemsg.SOURCE_CACHE,
            2,
        )
        assert n2.expires_at == n1.expires_at
        # Redis keeps an answer for its remaining lifetime plus the stale window
        pttl = int(redis_server.cli("PTTL", redis_keys(cache_key(H))[0]))
        expected_ms = (a1.expires_at - clock() + g1[0].config.cache.max_stale) * 1000
        assert abs(pttl - expected_ms) < 60_000, (pttl, expected_ms)
        assert g2[1].stats.hits == 2 and g1[1].stats.writes == 2 and g1[1].stats.locks == 2


async def test_many_gateways_missing_one_key_make_one_upstream_request(redis_server: RedisServer) -> None:
    up = FakeUpstream([PUMP], latency=0.15)
    clock = Clock()
    async with gateways(5, up, redis_server.url, clock, lock_wait=3.0) as gws:
        t0 = time.monotonic()
        answers = await asyncio.gather(*(r.resolve(H) for r, _ in gws for _ in range(3)))
        took = time.monotonic() - t0
        assert up.calls == 1, up.calls
        assert {a.expires_at for a in answers} == {answers[0].expires_at}
        stats = [s.stats for _, s in gws]
        assert sum(s.locks for s in stats) == 1 and sum(s.wait_hits for s in stats) == 4
        assert took < 2.0, took  # the waiters poll; nobody waits for lock_wait


async def test_a_lock_left_by_a_killed_gateway_delays_by_lock_wait_only(redis_server: RedisServer) -> None:
    up = FakeUpstream([PUMP])
    async with gateways(1, up, redis_server.url, Clock(), lock_wait=0.3) as (g,):
        _, lkey = redis_keys(cache_key(H))
        redis_server.cli("SET", lkey, "dead-gateway", "PX", "60000")
        t0 = time.monotonic()
        a = await g[0].resolve(H)
        took = time.monotonic() - t0
        assert a.code == devicemsg.OK and up.calls == 1
        assert 0.25 < took < 1.5, took
        assert g[1].stats.wait_fallbacks == 1


async def test_a_waiter_stops_waiting_when_the_holder_gives_up(redis_server: RedisServer) -> None:
    up = FakeUpstream([PUMP])
    async with gateways(1, up, redis_server.url, Clock(), lock_wait=5.0) as (g,):
        _, lkey = redis_keys(cache_key(H))
        redis_server.cli("SET", lkey, "other", "PX", "60000")

        async def holder_fails() -> None:  # the other gateway's upstream failed: it releases without a value
            await asyncio.sleep(0.2)
            await asyncio.to_thread(redis_server.cli, "DEL", lkey)

        t0 = time.monotonic()
        a, _ = await asyncio.gather(g[0].resolve(H), holder_fails())
        assert a.code == devicemsg.OK and time.monotonic() - t0 < 1.5
        assert g[1].stats.wait_fallbacks == 1


async def test_stale_answer_fetched_by_another_gateway(redis_server: RedisServer) -> None:
    up = FakeUpstream([PUMP])
    clock = Clock()
    async with gateways(2, up, redis_server.url, clock) as (g1, g2):
        a1 = await shared(g1, H)
        clock.advance(a1.expires_at - clock() + 60)  # expired a minute ago, well inside max_stale
        up.error = AllUpstreamsFailed({})
        a2 = await g2[0].resolve(H)  # g2 never resolved it: its stale answer comes from Redis
        assert (a2.code, a2.source, a2.record) == (devicemsg.OK, devicemsg.SOURCE_STALE, PUMP)
        assert g2[1].stats.stale == 1
        with pytest.raises(AllUpstreamsFailed):
            await g2[0].resolve("88.123.99/NEVER-SEEN")


async def test_redis_down_resolves_local_only_then_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.shared_cache")
    up = FakeUpstream([PUMP])
    clock = Clock()
    async with gateways(1, up, redis_server.url, clock, timeout=0.2) as (g,):
        assert (await shared(g, H)).code == devicemsg.OK
        redis_server.kill()
        t0 = time.monotonic()
        handles = [f"88.123.99/DOWN-{i}" for i in range(20)]
        answers = [await g[0].resolve(h) for h in handles]
        took = time.monotonic() - t0
        assert all(a.code == devicemsg.NOT_FOUND for a in answers)  # every resolution answered
        assert took < 1.5, took  # one failed call, then the circuit skips Redis
        s = g[1].stats
        assert s.up == 0 and s.errors >= 1 and s.skipped >= 15
        assert any("shared cache down" in r.getMessage() for r in caplog.records)
        redis_server.start()  # same port, empty
        await asyncio.sleep(0.6)  # the first circuit window (0.5 s)
        assert (await shared(g, "88.123.99/BACK-1")).code == devicemsg.NOT_FOUND
        assert s.up == 1 and any("shared cache back" in r.getMessage() for r in caplog.records)
        assert redis_server.cli("EXISTS", redis_keys(cache_key("88.123.99/BACK-1"))[0]) == "1"
        # a hung Redis (SIGSTOP: connections stay open, nothing answers) costs one timeout, then the circuit
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            answers = [await g[0].resolve(f"88.123.99/HUNG-{i}") for i in range(20)]
            hung = time.monotonic() - t0
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert all(a.code == devicemsg.NOT_FOUND for a in answers) and hung < 1.0, hung
        assert s.up == 0


async def test_gateway_service_exposes_the_shared_tier(redis_server: RedisServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import aiohttp

    from gateway.service import Gateway
    from tests.support.gwhelpers import http_base, loopback_config

    cfg = loopback_config(tmp_path / "data", upstream=["hdl://127.0.0.1:9"])
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, redis_url=redis_server.url))
    gw = Gateway(cfg)
    await gw.start()
    try:
        base = http_base(gw)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/healthz") as r:
                assert (await r.json())["components"]["shared_cache"] == "up"
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
        assert 'ida_shared_cache_lookups_total{result="miss"}' in text and "ida_shared_cache_up 1" in text
    finally:
        await gw.stop()


async def test_redis_cluster_hash_slots_and_a_failed_node(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """redis+cluster://: keys spread over the slots of three masters; the value, its lock and the pipelined
    GET+EXISTS / SET+unlock stay in one slot (hash tag). A master dying leaves its slots unserved: those
    lookups fail over to local-only, and every resolution is still answered."""
    from tests.support.faultkit import RedisClusterServers, redis_binary
    from tests.support.upstream_fakes import record, value

    if redis_binary() is None:
        pytest.skip("redis-server is not installed (make setup installs it)")
    cluster = RedisClusterServers(tmp_path / "cluster")
    cluster.start()
    recs = [record(f"88.123.99/CL-{i:03d}", value(1, "URL", f"https://example.com/{i}")) for i in range(60)]
    up = FakeUpstream(recs, latency=0.05)
    clock = Clock()
    try:
        # timeout 1 s, not 0.25: the first burst opens connections to three nodes on a loaded 2-core test machine
        async with gateways(3, up, cluster.url, clock, lock_wait=3.0, timeout=1.0) as gws:
            assert all([await s.ping() for _, s in gws])  # as the gateway does at start: learns the slot map
            answers = await asyncio.gather(*(r.resolve(rec.handle) for r, _ in gws for rec in recs))
            assert {a.code for a in answers} == {devicemsg.OK} and up.calls == len(
                recs
            )  # one request per key, 3 gateways
            counts = [int(n.cli("DBSIZE")) for n in cluster.nodes]
            assert all(c > 0 for c in counts) and sum(counts) == len(recs), counts  # spread, locks released
            cluster.nodes[1].kill()
            more = [record(f"88.123.99/CL2-{i:03d}", value(1, "URL", "u")) for i in range(20)]
            for rec in more:
                up.records[rec.handle] = rec
            t0 = time.monotonic()
            answers = [await gws[0][0].resolve(rec.handle) for rec in more]
            assert {a.code for a in answers} == {devicemsg.OK} and time.monotonic() - t0 < 5.0
            assert gws[0][1].stats.errors >= 1
    finally:
        cluster.stop()
