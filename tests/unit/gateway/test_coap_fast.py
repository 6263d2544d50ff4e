"""The CoAP fast path (gateway/frontends/coap_fast.py): RFC 7252 behaviour with a raw UDP client, aiocoap and
coap-client-notls; agreement with the slow path; the resolver's cache, prefetch and zone; malformed datagrams."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cache import Cache
from gateway.errors import AllUpstreamsFailed, UpstreamError
from gateway.frontends import coap_socket, coap_table
from gateway.frontends.coap import CoapFrontEnd
from gateway.frontends.coap_fast import FastPath
from gateway.frontends.coap_table import classify
from gateway.frontends.common import json_etag
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.resolution import etag_of
from gateway.resolver import Resolver, ResolverConfig
from gateway.upstream.pool import UpstreamPool
from gateway.zone import Zone
from proto import devicemsg
from proto.coap.message import Message, parse_header, uint_value
from proto.records import HandleValue, Record
from tests.support.coapraw import (
    ACK,
    CON,
    GET,
    NON,
    OPT_ACCEPT,
    OPT_BLOCK2,
    OPT_CF,
    OPT_ETAG,
    OPT_MAX_AGE,
    OPT_OBSERVE,
    OPT_URI_HOST,
    OPT_URI_PATH,
    OPT_URI_QUERY,
    POST,
    RST,
    RawClient,
    Reply,
    path_opts,
    request,
)
from tests.support.gwhelpers import (
    BIG,
    COAP_CLIENT,
    POSITIVE_TTL,
    PUMP,
    Clock,
    FakeResolver,
    coap_client,
    sample_records,
)
from tests.support.upstream_fakes import FakeUpstream


@dataclass
class Env:
    fe: CoapFrontEnd
    fast: FastPath
    port: int
    resolver: Any
    metrics: Metrics
    clock: Clock
    raw: RawClient

    def counts(self) -> tuple[int, int, int, int]:
        f = self.fast
        return f.answered, f.valid, f.replayed, f.slow + f.misses  # the last: not answered from the table


async def _env(tmp_path: Any, resolver: Any, clock: Clock, **kw: Any) -> AsyncIterator[Env]:
    registry = Registry(tmp_path / "registry.sqlite3")
    metrics = Metrics()
    if isinstance(resolver, Resolver):  # as gateway/service.py wires a real resolver
        kw.setdefault("answers", resolver.answer_cache())
    fe = CoapFrontEnd(kw.pop("host", "127.0.0.1"), 0, resolver, registry, metrics, clock=clock, **kw)
    _host, port = await fe.start()
    assert fe.fast is not None
    raw = RawClient(port)
    try:
        yield Env(fe, fe.fast, port, resolver, metrics, clock, raw)
    finally:
        raw.close()
        await fe.stop()
        registry.close()


@pytest.fixture
async def env(tmp_path: Any) -> AsyncIterator[Env]:
    clock = Clock()
    async for e in _env(tmp_path, FakeResolver(clock=clock), clock):
        yield e


def _real_resolver(clock: Clock, up: FakeUpstream, zone: Zone | None = None) -> Resolver:
    config = ResolverConfig(upstreams=[], data_dir=None, persist=False)
    pool = UpstreamPool([("fake://0", up)])  # type: ignore[list-item]
    return Resolver(
        config,
        pool=pool,
        cache=Cache(config.cache, clock=clock),
        zone=Zone() if zone is None else zone,
        clock=clock,
    )


@pytest.fixture
async def renv(tmp_path: Any) -> AsyncIterator[Env]:
    """The front end over a real Resolver (cache, prefetch, zone), upstream a fake node serving PUMP."""
    clock = Clock()
    up = FakeUpstream(list(sample_records().values()))
    resolver = _real_resolver(clock, up)
    try:
        async for e in _env(tmp_path, resolver, clock):
            yield e
    finally:
        await resolver.close()


# -- RFC 7252 on the fast path ---------------------------------------------------------------------------
async def test_con_gets_piggybacked_ack_with_token_and_mid(env: Env) -> None:
    slow = await env.raw.ask(request(0x1001, b"\x01\x02"))
    assert env.counts() == (0, 0, 0, 1) and env.fast.learned == 1
    fast = await env.raw.ask(request(0x1002, b"tok-tok!"))
    assert env.counts() == (1, 0, 0, 1)
    assert (fast.mtype, fast.code, fast.mid, fast.token) == (ACK, 0x45, 0x1002, b"tok-tok!")
    assert (slow.mtype, slow.code, slow.mid, slow.token) == (ACK, 0x45, 0x1001, b"\x01\x02")
    # same options as aiocoap's answer, same payload but for where it came from (the fast path is a cache)
    assert fast.options == slow.options
    assert (
        fast.opt(OPT_ETAG) == etag_of(sample_records()[PUMP], devicemsg.OK) and fast.max_age == POSITIVE_TTL
    )
    s, f = (
        devicemsg.decode("resolve_response", slow.payload),
        devicemsg.decode("resolve_response", fast.payload),
    )
    assert (
        s.pop("source") == devicemsg.SOURCE_UPSTREAM and f.pop("source") == devicemsg.SOURCE_CACHE and s == f
    )
    # every token length, including none
    for tkl in range(9):
        token = bytes(range(1, tkl + 1))
        r = await env.raw.ask(request(0x2000 + tkl, token))
        assert (r.mtype, r.code, r.mid, r.token) == (ACK, 0x45, 0x2000 + tkl, token)
    assert env.fast.answered == 10 and len(env.resolver.calls) == 1


async def test_non_is_answered_with_non(env: Env) -> None:
    await env.raw.ask(request(1, b"a", mtype=NON))  # slow path learns it
    mids = set()
    for i in range(3):
        r = await env.raw.ask(request(0x3000 + i, b"n" + bytes([i]), mtype=NON))
        assert (r.mtype, r.code, r.token) == (NON, 0x45, b"n" + bytes([i]))
        mids.add(r.mid)
    assert len(mids) == 3 and env.fast.answered == 3  # a Message ID of our own each time
    # a CON for the same resource shares the entry (the key is the options, not the type)
    r = await env.raw.ask(request(0x3100, b"c"))
    assert (r.mtype, r.mid) == (ACK, 0x3100) and env.fast.answered == 4


async def test_con_duplicate_gets_identical_bytes(env: Env) -> None:
    await env.raw.ask(request(1, b"w"))
    first = await env.raw.ask(request(0x4000, b"dup"))
    env.clock.advance(5.5)  # Max-Age would be different for a new request now
    again = await env.raw.ask(request(0x4000, b"dup"))
    assert again.raw == first.raw and env.fast.replayed == 1 and env.fast.answered == 1
    new = await env.raw.ask(request(0x4001, b"dup"))
    assert new.max_age == first.max_age - 6  # type: ignore[operator]
    # a duplicate of a CON the slow path took goes to aiocoap again, which de-duplicates it (same answer)
    s1 = await env.raw.ask(request(0x4100, b"s", ident="88.123.99/NOPE"))
    s2 = await env.raw.ask(request(0x4100, b"s", ident="88.123.99/NOPE"))
    assert s1.raw == s2.raw and s1.code == 0x84
    assert [c[0] for c in env.resolver.calls].count("88.123.99/NOPE") == 1
    # the same Message ID from another endpoint is not a duplicate
    other = RawClient(env.port)
    try:
        o = await other.ask(request(0x4000, b"other"))
        assert o.token == b"other" and o.raw != first.raw
    finally:
        other.close()


async def test_max_age_counts_down_on_whole_seconds(env: Env) -> None:
    await env.raw.ask(request(1, b"w"))
    expires = env.clock() + POSITIVE_TTL
    ages = []
    for step in (0.3, 0.6, 0.2, 45.7, 0.01, 200.0):
        env.clock.advance(step)
        r = await env.raw.ask(request(random.randrange(0x10000), b"ma"))
        ages.append(r.max_age)
        assert r.max_age == int(expires - env.clock())
    assert ages[0] == POSITIVE_TTL - 1 and ages == sorted(ages, reverse=True)
    assert env.fast.answered == 6 and len(env.resolver.calls) == 1
    # encoded once per whole second, not per request
    (entry,) = env.fast.table.values()
    tail = entry.tail
    await env.raw.ask(request(1, b"s1"))
    env.clock.advance(0.001)
    await env.raw.ask(request(2, b"s2"))
    assert entry.tail is tail


async def test_etag_revalidation(env: Env) -> None:
    first = await env.raw.ask(request(1, b"e"))
    etag = first.opt(OPT_ETAG)
    assert etag is not None
    env.clock.advance(10.2)
    valid = await env.raw.ask(request(2, b"v1", extra=[(OPT_ETAG, b"\x00" * 8), (OPT_ETAG, etag)]))
    assert (valid.mtype, valid.code, valid.mid, valid.token, valid.payload) == (ACK, 0x43, 2, b"v1", b"")
    assert valid.options == {OPT_ETAG: [etag], OPT_MAX_AGE: [uint_value(POSITIVE_TTL - 11)]}
    assert env.fast.valid == 1
    other = await env.raw.ask(request(3, b"v2", extra=[(OPT_ETAG, b"\x01" * 8)]))
    assert other.code == 0x45 and other.payload and env.fast.answered == 1
    non = await env.raw.ask(request(4, b"v3", mtype=NON, extra=[(OPT_ETAG, etag)]))
    assert (non.mtype, non.code, non.token) == (NON, 0x43, b"v3") and env.fast.valid == 2
    # the CBOR tag does not validate the JSON representation (its own entry, its own tag)
    accept = [(OPT_ACCEPT, uint_value(50))]
    js = await env.raw.ask(request(5, b"j", extra=accept))
    assert js.code == 0x45 and js.opt(OPT_CF) == uint_value(50) and js.opt(OPT_ETAG) == json_etag(etag)
    assert json.loads(js.payload) == sample_records()[PUMP].to_rest()
    js2 = await env.raw.ask(request(6, b"j2", extra=accept + [(OPT_ETAG, etag)]))
    assert js2.code == 0x45 and env.fast.answered == 2  # fast, full answer
    js3 = await env.raw.ask(request(7, b"j3", extra=accept + [(OPT_ETAG, json_etag(etag))]))
    assert js3.code == 0x43 and env.fast.valid == 3
    assert len(env.resolver.calls) == 2  # the CBOR and the JSON representation, once each


async def test_revalidation_learns_too(env: Env) -> None:
    """A device that always revalidates gets its 2.03 from the fast path after the first one."""
    etag = etag_of(sample_records()[PUMP], devicemsg.OK)
    slow = await env.raw.ask(request(1, b"a", extra=[(OPT_ETAG, etag)]))
    assert slow.code == 0x43 and env.fast.learned == 1
    fast = await env.raw.ask(request(2, b"b", extra=[(OPT_ETAG, etag)]))
    assert fast.raw[4:] == b"b" + slow.raw[5:] and env.fast.valid == 1


async def test_expired_entry_goes_to_the_slow_path(env: Env) -> None:
    env.fast.guard.prefetch_fraction = (
        0.0  # no prefetch hand-over in the last 10 % (tested with the real resolver)
    )
    await env.raw.ask(request(1, b"w"))
    env.clock.advance(POSITIVE_TTL - 0.5)
    r = await env.raw.ask(request(2, b"x"))
    assert r.max_age == 0 and env.fast.answered == 1  # the last second: Max-Age 0, as the slow path says
    env.clock.advance(0.5)
    r = await env.raw.ask(request(3, b"y"))
    assert r.code == 0x45 and r.max_age == POSITIVE_TTL  # the fake resolver answers anew
    assert env.fast.answered == 1 and len(env.resolver.calls) == 2 and env.fast.learned == 2
    assert (await env.raw.ask(request(4, b"z"))).max_age == POSITIVE_TTL and env.fast.answered == 2


@pytest.mark.parametrize(
    "extra, code",
    [
        ([(OPT_URI_HOST, b"example.com")], 0x45),  # an option the fast path does not take: aiocoap answers
        ([(OPT_OBSERVE, b"")], 0x45),
        ([(OPT_BLOCK2, b"\x06")], 0x45),
        ([(2049, b"x")], None),  # unknown critical option: whatever aiocoap answers (0.4.17: ignores it)
        ([(2050, b"x")], 0x45),  # unknown elective option: ignored by aiocoap, still not the fast path's
        ([(OPT_ACCEPT, uint_value(40))], 0x86),  # 4.06 from the front end
    ],
)
async def test_other_options_go_to_the_slow_path(
    env: Env, extra: list[tuple[int, bytes]], code: int | None
) -> None:
    await env.raw.ask(request(1, b"w"))
    r = await env.raw.ask(request(2, b"o", extra=extra))
    assert (code is None or r.code == code) and r.token == b"o"
    assert env.fast.answered == 0 and env.fast.misses + env.fast.slow == 2


async def test_requests_that_are_not_cached_resolutions(env: Env) -> None:
    await env.raw.ask(request(1, b"w"))
    assert (await env.raw.ask(request(2, b"p", code=POST))).code == 0x85  # 4.05: POST on /r
    assert (await env.raw.ask(request(3, b"y", payload=b"\x01"))).code == 0x45  # a GET with a payload
    # the /r segment is part of the key: /d/... and unknown paths never hit
    d = Message(CON, GET, 4, b"d", tuple(path_opts(prefix="d"))).encode()
    assert (await env.raw.ask(d)).code == 0x84
    wkc = Message(CON, GET, 5, b"k", ((OPT_URI_PATH, b".well-known"), (OPT_URI_PATH, b"core"))).encode()
    assert (await env.raw.ask(wkc)).code == 0x45
    assert env.fast.answered == 0
    # an empty CON (ping) gets aiocoap's RST
    ping = await env.raw.ask(bytes((0x40, 0, 0, 9)))
    assert (ping.mtype, ping.code, ping.mid) == (RST, 0, 9)


async def test_errors_and_big_answers_are_not_learned(env: Env) -> None:
    for i in range(2):
        r = await env.raw.ask(request(10 + i, b"n", ident="88.123.99/NOPE"))
        assert r.code == 0x84
        big = await env.raw.ask(request(20 + i, b"b", ident=BIG))
        assert big.code == 0x45 and big.opt(OPT_BLOCK2) is not None  # block-wise: aiocoap's
    assert env.fast.learned == 0 and env.fast.answered == 0 and len(env.resolver.calls) == 4


async def test_metrics_count_fast_answers(env: Env) -> None:
    etag = (await env.raw.ask(request(1, b"w"))).opt(OPT_ETAG)
    for i in range(5):
        await env.raw.ask(request(10 + i, b"f"))
    await env.raw.ask(request(20, b"v", extra=[(OPT_ETAG, etag or b"")]))
    await env.raw.ask(request(21, b"n", ident="88.123.99/NOPE"))
    assert env.metrics.value("ida_requests_total", {"frontend": "coap", "code": "1"}) == 6
    assert env.metrics.value("ida_requests_total", {"frontend": "coap", "code": "203"}) == 1
    assert env.metrics.value("ida_requests_total", {"frontend": "coap", "code": "100"}) == 1
    text = env.metrics.render()
    assert 'ida_requests_total{code="1",frontend="coap"} 6' in text


async def test_stopping_answers_5_03_even_for_cached(env: Env) -> None:
    await env.raw.ask(request(1, b"w"))
    env.fe._closing = True  # what stop() sets first
    env.fast.serving = False
    r = await env.raw.ask(request(2, b"s"))
    assert r.code == 0xA3 and env.fast.answered == 0


async def test_source_rate_limit_applies_to_fast_answers(env: Env) -> None:
    ratelimit = pytest.importorskip("gateway.ratelimit")
    if not hasattr(env.fe, "limiter"):
        pytest.skip("this CoapFrontEnd has no rate limiter")
    Limits, RateLimiter = ratelimit.Limits, ratelimit.RateLimiter
    await env.raw.ask(request(1, b"w"))
    env.fe.limiter = RateLimiter(Limits(source_rate=0.001, source_burst=3))
    codes = [(await env.raw.ask(request(10 + i, b"l"))).code for i in range(5)]
    assert codes == [0x45, 0x45, 0x45, 0x9D, 0x9D]  # 4.29 once the burst is used
    assert env.fast.answered == 3


# -- the miss path ----------------------------------------------------------------------------------------
async def test_miss_path_answers_as_aiocoap_does(tmp_path: Any) -> None:
    """A miss skips aiocoap's routing: byte for byte the answer aiocoap's own path gives (same MID, token)."""
    clock = Clock()
    cases = [
        request(0x6001, b"a1"),
        request(0x6002, b"a2", extra=[(OPT_URI_QUERY, b"type=EMAIL"), (OPT_URI_QUERY, b"index=3")]),
        request(0x6003, b"a3", extra=[(OPT_ACCEPT, uint_value(50))]),
        request(0x6004, b"a4", extra=[(OPT_ACCEPT, uint_value(40))]),
        request(0x6005, b"a5", extra=[(OPT_ETAG, etag_of(sample_records()[PUMP], devicemsg.OK))]),
        request(0x6006, b"a6", ident="88.123.99/NOPE"),
        request(0x6007, b"a7", ident="88.1/DOWN"),
        request(0x6008, b"a8", extra=[(OPT_URI_QUERY, b"index=x")]),
        request(0x6009, b"a9", ident=BIG),  # block 0 of a block-wise answer
        request(0x600A, b"aa", mtype=NON),
        Message(CON, GET, 0x600B, b"ab", ((OPT_URI_PATH, b"r"), (OPT_URI_PATH, b"88.123.99"))).encode(),
    ]
    answers: dict[bool, list[bytes]] = {}
    for fast_path in (True, False):
        registry = Registry(tmp_path / f"registry-{fast_path}.sqlite3")
        resolver = FakeResolver(clock=clock)
        resolver.errors["88.1/DOWN"] = AllUpstreamsFailed({"hdl://10.0.0.1:2641": UpstreamError("refused")})
        fe = CoapFrontEnd("127.0.0.1", 0, resolver, registry, Metrics(), clock=clock, fast_path=fast_path)
        _h, port = await fe.start()
        raw = RawClient(port)
        try:
            got = []
            for data in cases:
                if fe.fast is not None:
                    fe.fast.table.clear()  # every one a miss
                r = await raw.ask(data)
                got.append(r.raw if r.mtype != NON else r.raw[:2] + r.raw[4:])  # a NON's Message ID is ours
            answers[fast_path] = got
            if fe.fast is not None:
                assert fe.fast.misses == len(cases) and fe.fast.slow == 0
        finally:
            raw.close()
            await fe.stop()
            registry.close()
    for data, fast, slow in zip(cases, answers[True], answers[False], strict=True):
        assert fast == slow, data


async def test_slow_miss_gets_an_empty_ack_then_a_separate_response(env: Env) -> None:
    gate = env.resolver.gates.setdefault(PUMP, asyncio.Event())
    await env.raw.send(request(0x7001, b"slow"))
    ack = await env.raw.recv()
    assert (ack.mtype, ack.code, ack.mid, ack.token) == (ACK, 0, 0x7001, b"")  # after EMPTY_ACK_DELAY
    again = await env.raw.ask(request(0x7001, b"slow"))  # a duplicate gets the same empty ACK
    assert again.raw == ack.raw
    gate.set()
    sep = await env.raw.recv()
    assert (sep.mtype, sep.code, sep.token) == (CON, 0x45, b"slow")
    await env.raw.send(Message(ACK, 0, sep.mid).encode())  # acknowledged: no retransmission
    assert await env.raw.nothing(0.5)
    assert env.fast.misses == 1 and len(env.resolver.calls) == 1
    assert env.metrics.value("ida_requests_total", {"frontend": "coap", "code": "1"}) == 1


async def test_duplicate_of_a_miss_in_flight_is_not_resolved_twice(env: Env) -> None:
    gate = env.resolver.gates.setdefault(PUMP, asyncio.Event())
    await env.raw.send(request(0x7101, b"d", mtype=NON))
    await env.raw.send(request(0x7101, b"d", mtype=NON))
    await asyncio.sleep(0.05)
    gate.set()
    first = await env.raw.recv()
    assert first.code == 0x45 and await env.raw.nothing(0.3)
    assert len(env.resolver.calls) == 1


async def test_duplicate_con_of_a_miss_is_ignored_then_answered_with_the_same_ack(env: Env) -> None:
    gate = env.resolver.gates.setdefault(PUMP, asyncio.Event())
    await env.raw.send(request(0x7201, b"p"))
    await asyncio.sleep(0.02)
    await env.raw.send(request(0x7201, b"p"))  # a retransmission while the resolver works: ignored
    assert await env.raw.nothing(0.05)
    gate.set()
    first = await env.raw.recv()
    assert (first.mtype, first.code, first.mid, first.token) == (ACK, 0x45, 0x7201, b"p")
    assert await env.raw.nothing(0.2)  # one answer, not two
    again = await env.raw.ask(request(0x7201, b"p"))  # a late retransmission: the very same ACK
    assert again.raw == first.raw and len(env.resolver.calls) == 1
    non = await env.raw.ask(request(0x7202, b"q", ident="88.123.99/NOPE", mtype=NON))  # a NON miss: a NON
    assert (non.mtype, non.code, non.token) == (NON, 0x84, b"q")


async def test_duplicate_after_the_empty_ack_gets_the_empty_ack_again(env: Env) -> None:
    gate = env.resolver.gates.setdefault(PUMP, asyncio.Event())
    empty = await env.raw.ask(request(0x7301, b"e"), timeout=3.0)  # EMPTY_ACK_DELAY passes: an empty ACK
    assert (empty.mtype, empty.code, empty.mid, empty.token) == (ACK, 0, 0x7301, b"")
    again = await env.raw.ask(request(0x7301, b"e"))
    assert again.raw == empty.raw
    gate.set()
    sep = await env.raw.recv()
    assert (sep.mtype, sep.code, sep.token) == (CON, 0x45, b"e") and len(env.resolver.calls) == 1
    await env.raw.send(Message(ACK, 0, sep.mid).encode())


async def test_status_page_sees_fast_hits_once_a_second(tmp_path: Any) -> None:
    from gateway.status import StatusBoard

    clock = Clock()
    resolver = FakeResolver(clock=clock)
    board = StatusBoard()
    async for e in _env(tmp_path, resolver, clock, note=board.recent.add):
        await e.raw.ask(request(1, b"w"))  # the miss: noted by the front end
        for i in range(5):
            await e.raw.ask(request(10 + i, b"f"))
        assert e.fast.answered == 5
        assert [(r.source, r.frontend) for r in board.recent.items()] == [
            ("cache", "coap"),
            ("upstream", "coap"),
        ]
        clock.advance(1.0)
        await e.raw.ask(request(20, b"g"))
        assert len(board.recent) == 3 and board.recent.items()[0].id == PUMP


# -- the real resolver: cache hits, prefetch, refresh, zone ------------------------------------------------
async def test_with_the_resolver_cache(renv: Env) -> None:
    resolver: Resolver = renv.resolver
    first = await renv.raw.ask(request(1, b"a"))
    assert devicemsg.decode("resolve_response", first.payload)["source"] == devicemsg.SOURCE_UPSTREAM
    second = await renv.raw.ask(request(2, b"b"))
    assert devicemsg.decode("resolve_response", second.payload)["source"] == devicemsg.SOURCE_CACHE
    assert renv.fast.answered == 1
    hits = resolver.cache.stats.hits
    for i in range(4):
        await renv.raw.ask(request(10 + i, b"c"))
    assert resolver.cache.stats.hits == hits + 4  # fast hits are cache hits
    # compare with what the slow path answers now for the same request: same bytes but MID and token
    renv.fast.table.clear()
    slow = await renv.raw.ask(request(30, b"s"))
    fast = await renv.raw.ask(request(31, b"s"))
    assert fast.raw[4:] == slow.raw[4:] and renv.fast.answered == 6


async def test_prefetch_window_hands_one_request_to_the_resolver(renv: Env) -> None:
    resolver: Resolver = renv.resolver
    await renv.raw.ask(request(1, b"a"))
    entry = resolver.cache.peek(resolver.cache.keys()[0])
    assert entry is not None
    life = entry.expires_at - entry.stored_at
    renv.clock.advance(life * 0.95)  # in the last 10 %
    slow_before = renv.fast.misses
    r1 = await renv.raw.ask(request(2, b"b"))
    assert r1.code == 0x45 and renv.fast.misses == slow_before + 1  # handed to the resolver once
    assert resolver.cache.stats.prefetches == 1
    for _ in range(50):  # the background refresh replaces the cache entry
        if resolver.cache.peek(entry.key) is not entry:
            break
        await asyncio.sleep(0.01)
    assert resolver.cache.peek(entry.key) is not entry
    fresh = resolver.cache.peek(entry.key)
    assert fresh is not None
    renv.clock.advance(1.0)  # the next Max-Age tick notices the cache holds a newer answer
    answered = renv.fast.answered
    r2 = await renv.raw.ask(request(3, b"c"))
    assert (
        r2.max_age == int(fresh.expires_at - renv.clock()) and renv.fast.answered == answered
    )  # slow, learns
    r3 = await renv.raw.ask(request(4, b"d"))
    assert r3.max_age == r2.max_age and renv.fast.answered == answered + 1
    assert resolver.stats().upstream_fetches == 2 and resolver.cache.stats.prefetches == 1


async def test_zone_answers_are_not_learned_and_override(tmp_path: Any) -> None:
    clock = Clock()
    zone = Zone()
    resolver = _real_resolver(clock, FakeUpstream(list(sample_records().values())), zone)
    try:
        async for e in _env(tmp_path, resolver, clock):
            await e.raw.ask(request(1, b"a"))
            await e.raw.ask(request(2, b"b"))
            assert e.fast.answered == 1
            zone.add(Record(PUMP, (HandleValue(1, "URL", b"https://zone.example/", ttl=60),)), persist=False)
            clock.advance(1.0)  # the next tick sees the zone has the handle
            r = await e.raw.ask(request(3, b"c"))
            assert devicemsg.decode("resolve_response", r.payload)["source"] == devicemsg.SOURCE_ZONE
            await e.raw.ask(request(4, b"d"))
            assert e.fast.answered == 1  # zone answers stay with the slow path
    finally:
        await resolver.close()


# -- sockets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["::", "0.0.0.0"])
async def test_wildcard_bind_answers_from_the_requested_address(tmp_path: Any, host: str) -> None:
    clock = Clock()
    async for e in _env(tmp_path, FakeResolver(clock=clock), clock, host=host):
        assert e.fast.sock.pktinfo
        await e.raw.ask(request(1, b"a"))
        data, addr = await asyncio.wait_for(_recvfrom_after(e.raw, request(2, b"b")), 3)
        assert addr == ("127.0.0.1", e.port) and Reply.parse(data).code == 0x45
        assert e.fast.answered == 1
        if host == "::":
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                s6.settimeout(3)
                s6.sendto(request(3, b"c"), ("::1", e.port))
                data, addr = await asyncio.to_thread(s6.recvfrom, 65535)
                assert addr[:2] == ("::1", e.port) and Reply.parse(data).code == 0x45
            finally:
                s6.close()


async def _recvfrom_after(raw: RawClient, data: bytes) -> tuple[bytes, Any]:
    loop = asyncio.get_running_loop()
    await raw.send(data)
    return await loop.sock_recvfrom(raw.sock, 65535)


async def test_fast_path_off_hands_every_datagram_to_aiocoap(tmp_path: Any) -> None:
    registry = Registry(tmp_path / "registry.sqlite3")
    fe = CoapFrontEnd("127.0.0.1", 0, FakeResolver(), registry, Metrics(), fast_path=False)
    _h, port = await fe.start()
    raw = RawClient(port)
    try:
        for i in range(2):
            assert (await raw.ask(request(i, b"x"))).code == 0x45
        assert fe.fast is None and fe.bridge is not None and fe.bridge.fed == 2
    finally:
        raw.close()
        await fe.stop()
        registry.close()


# -- real clients --------------------------------------------------------------------------------------------
async def test_aiocoap_client(env: Env) -> None:
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        uri = f"coap://127.0.0.1:{env.port}/r/{PUMP}"
        first = await asyncio.wait_for(client.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 10)
        second = await asyncio.wait_for(client.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 10)
        assert env.fast.answered == 1
        assert second.code == Code.CONTENT and second.opt.etag == first.opt.etag
        assert second.opt.max_age == POSITIVE_TTL and second.opt.content_format == 60
        assert (
            devicemsg.decode("resolve_response", second.payload)["values"]
            == devicemsg.decode("resolve_response", first.payload)["values"]
        )
        msg = aiocoap.Message(code=Code.GET, uri=uri, transport_tuning=aiocoap.Unreliable)
        non = await asyncio.wait_for(client.request(msg).response, 10)
        assert non.code == Code.CONTENT and non.mtype == aiocoap.NON and env.fast.answered == 2
        msg = aiocoap.Message(code=Code.GET, uri=uri)
        msg.opt.etags = (first.opt.etag,)
        valid = await asyncio.wait_for(client.request(msg).response, 10)
        assert valid.code == Code.VALID and env.fast.valid == 1
    finally:
        await client.shutdown()


@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls (libcoap3-bin) not installed")
async def test_libcoap_client(env: Env) -> None:
    uri = f"coap://127.0.0.1:{env.port}/r/{PUMP}"
    outs = []
    for args in (("-A", "50"), ("-A", "50"), ("-A", "50", "-N"), ("-A", "50", "-T", "cafe")):
        rc, out, err = await coap_client("-m", "get", "-B", "5", *args, uri)
        assert rc == 0, err
        outs.append(out)
    assert all(json.loads(o) == sample_records()[PUMP].to_rest() for o in outs)
    assert env.fast.answered == 3 and len(env.resolver.calls) == 1


# -- malformed datagrams -----------------------------------------------------------------------------------
def _aiocoap_view(data: bytes) -> tuple[Any, ...]:
    m = aiocoap.Message.decode(data)
    return m.opt.uri_path, m.opt.uri_query, m.opt.accept, m.opt.uri_port


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_classify_never_raises_on_junk(data: bytes) -> None:
    res = classify(data)
    if res is not None:  # whatever it takes, aiocoap reads as a GET /r/... with only the allowed options
        m = aiocoap.Message.decode(data)
        assert m.code == Code.GET and m.opt.uri_path[:1] == ("r",) and not m.payload
        assert {o.number for o in m.opt.option_list()} <= {
            OPT_ETAG,
            7,
            OPT_URI_PATH,
            OPT_URI_QUERY,
            OPT_ACCEPT,
        }


segment = st.text(alphabet="abcAB.-/019é", min_size=0, max_size=14)
requests = st.builds(
    lambda path, query, accept, etags, token, mid, mtype, port: (
        path,
        query,
        accept,
        etags,
        token,
        mid,
        mtype,
        port,
    ),
    st.lists(segment, min_size=0, max_size=4),
    st.lists(segment, max_size=2),
    st.sampled_from([None, 50, 60, 0, 300]),
    st.lists(st.binary(min_size=1, max_size=8), max_size=3),
    st.binary(max_size=8),
    st.integers(0, 0xFFFF),
    st.sampled_from([aiocoap.CON, aiocoap.NON]),
    st.sampled_from([None, 0, 5683, 61616]),
)


def _encode(req: tuple[Any, ...]) -> bytes:
    path, query, accept, etags, token, mid, mtype, port = req
    m = aiocoap.Message(code=Code.GET)
    m.mtype, m.mid, m.token = mtype, mid, token
    if port is not None:
        m.opt.uri_port = port
    m.opt.uri_path = ("r", *path)
    m.opt.uri_query = tuple(query)
    if accept is not None:
        m.opt.accept = accept
    m.opt.etags = tuple(etags)
    return bytes(m.encode())


@settings(max_examples=300, deadline=None)
@given(requests, requests)
def test_equal_keys_mean_equal_requests(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    """The key drops the ETags and nothing else: equal keys <=> equal path, query, Accept and Uri-Port."""
    ka, kb = classify(_encode(a)), classify(_encode(b))
    assert ka is not None and kb is not None
    assert ka[1] == tuple(a[3]) and kb[1] == tuple(b[3])
    assert (ka[0] == kb[0]) == (_aiocoap_view(_encode(a)) == _aiocoap_view(_encode(b)))
    # the key of a request with ETags is the key of the same request without them
    assert ka[0] == classify(_encode((*a[:3], [], *a[4:])))[0]  # type: ignore[index]


class ThreadedGateway:
    """The front end on its own event loop in a thread, for synchronous (hypothesis) tests."""

    def __init__(self, tmp: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.resolver = FakeResolver(clock=self.clock)
        self.registry: Registry | None = None  # made and closed on the loop's thread (SQLite)
        self.used_ports: set[int] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fe: CoapFrontEnd = self.call(self._start(tmp))

    async def _start(self, tmp: Any) -> CoapFrontEnd:
        self.registry = Registry(tmp / "registry.sqlite3")
        fe = CoapFrontEnd("127.0.0.1", 0, self.resolver, self.registry, Metrics(), clock=self.clock)
        await fe.start()
        return fe

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _stop(self) -> None:
        await self.fe.stop()
        if self.registry is not None:
            self.registry.close()

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: Any) -> Iterator[ThreadedGateway]:
    gw = ThreadedGateway(tmp_path_factory.mktemp("fastjunk"))
    yield gw
    gw.close()


def _mutations() -> st.SearchStrategy[bytes]:
    base = request(0x5555, b"jk")
    etag = etag_of(sample_records()[PUMP], devicemsg.OK)
    with_etag = request(0x5556, b"je", extra=[(OPT_ETAG, etag)])

    def mutate(seed: bytes, ops: list[tuple[int, int, int]]) -> bytes:
        b = bytearray(seed)
        for kind, pos, val in ops:
            if not b:
                b.append(val)
                continue
            p = pos % (len(b) + 1)
            if kind == 0:
                b[min(p, len(b) - 1)] = val
            elif kind == 1:
                b.insert(p, val)
            elif kind == 2:
                del b[min(p, len(b) - 1)]
            else:
                del b[p:]
        return bytes(b)

    ops = st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 64), st.integers(0, 255)), min_size=1, max_size=4
    )
    return st.one_of(st.binary(max_size=64), st.builds(mutate, st.sampled_from([base, with_etag]), ops))


def _fresh_socket(used: set[int]) -> socket.socket:
    held = []
    try:
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in used:
                used.add(port)
                return s
            held.append(s)
    finally:
        for h in held:
            h.close()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=_mutations())
def test_junk_never_crashes_nor_gets_a_wrong_answer(threaded: ThreadedGateway, junk: bytes) -> None:
    fe = threaded.fe
    fast = fe.fast
    assert fast is not None and fe.address is not None
    s = _fresh_socket(threaded.used_ports)  # a port never used before: no (source, MID) seen already
    with s:
        s.settimeout(3)
        s.connect(("127.0.0.1", fe.address[1]))
        if not fast.table:  # learn the resolution first
            s.send(request(1, b"w"))
            assert Reply.parse(s.recv(65535)).code == 0x45
        table_keys = set(fast.table)
        before = fast.answered + fast.valid + fast.replayed
        s.send(junk)
        probe_token = random.randbytes(8)
        s.send(request(random.randrange(0x10000), probe_token, mtype=NON))  # answered after the junk
        got: list[bytes] = []
        while True:
            data = s.recv(65535)
            if parse_header(data) is not None and parse_header(data)[3] == probe_token:  # type: ignore[index]
                break
            got.append(data)
    threaded.call(asyncio.sleep(0))  # the counters are added up after the wake-up's last answer went out
    by_fast = fast.answered + fast.valid + fast.replayed - before - 1  # the probe was one
    c = classify(junk)
    if by_fast:  # answered from the table: only a well-formed GET naming a learned resolution may be
        assert by_fast == 1 and c is not None and c[0] in table_keys, junk
        assert len(got) == 1
        r = Reply.parse(got[0])
        assert r.code in (0x45, 0x43) and r.token == junk[4 : 4 + (junk[0] & 15)]
        assert (r.mtype, r.mid) == (ACK, junk[2] << 8 | junk[3]) if junk[0] >> 4 == 4 else r.mtype == NON
    else:  # then the fast path had nothing it could have answered it with
        assert c is None or c[0] not in table_keys, junk
    assert threaded.thread.is_alive()


def test_drain_limit_is_sane() -> None:
    assert coap_socket.DRAIN_MAX >= 16 and coap_table.MAX_PAYLOAD <= 1024
