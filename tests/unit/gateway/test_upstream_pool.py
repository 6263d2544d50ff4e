"""Upstream pool: URL parsing, failover, hedging, health and cooldown, timeouts, counters; and what counts
against a node's health (only node failures: a node answering "not responsible" for a foreign prefix stays
healthy, issue 19)."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.errors import (
    AllUpstreamsFailed,
    NameNotServed,
    ProtocolError,
    UpstreamBusy,
    UpstreamError,
    UpstreamReferral,
    UpstreamRefused,
    UpstreamTimeout,
)
from gateway.resolver import Resolver, ResolverConfig
from gateway.upstream.base import Outcome, outcome_of
from gateway.upstream.pool import Histogram, UpstreamPool, UpstreamSpec, make_client, parse_upstream_url
from gateway.upstream.rest import RestClient
from proto.handle import numbers as N
from proto.records import HandleValue, Record
from tests.support.upstream_fakes import PUMP, Clock, FakeUpstream, refused
from tools.harness.node import NodeServer, sample_records

H = PUMP.handle


def pool(*nodes: FakeUpstream, **kw: object) -> UpstreamPool:
    return UpstreamPool([(f"fake://{i}", n) for i, n in enumerate(nodes)], **kw)  # type: ignore[arg-type]


# -- URLs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "kind", "host", "port", "transport", "base"),
    [
        ("hdl://127.0.0.1", "native", "127.0.0.1", 2641, "udp", ""),
        ("hdl://hdl.example.org:3641", "native", "hdl.example.org", 3641, "udp", ""),
        ("hdl+udp://10.0.0.1:2641/", "native", "10.0.0.1", 2641, "udp", ""),
        ("hdl+tcp://[::1]:2641", "native", "::1", 2641, "tcp", ""),
        ("http://127.0.0.1:8000", "rest", "127.0.0.1", 8000, "", "http://127.0.0.1:8000"),
        ("https://hdl.handle.net", "rest", "hdl.handle.net", 443, "", "https://hdl.handle.net:443"),
        ("http://proxy.local/handle/", "rest", "proxy.local", 80, "", "http://proxy.local:80/handle"),
    ],
)
def test_parse_upstream_url(url: str, kind: str, host: str, port: int, transport: str, base: str) -> None:
    assert parse_upstream_url(url) == UpstreamSpec(url, kind, host, port, transport, base)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://x", "scheme"),
        ("127.0.0.1:2641", "scheme"),
        ("hdl://", "no host"),
        ("hdl://host:99999", "out of range"),
        ("hdl://host:port", "port"),
        ("hdl://host/path", "no path"),
        ("http://host/?q=1", "query"),
    ],
)
def test_bad_upstream_url_names_the_url(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as e:
        parse_upstream_url(url)
    assert repr(url) in str(e.value)


def test_from_urls_builds_one_client_per_scheme() -> None:
    p = UpstreamPool.from_urls(["http://127.0.0.1:8000", "hdl://127.0.0.1:2641", "hdl+tcp://127.0.0.1:2642"])
    assert p.nodes == ["http://127.0.0.1:8000", "hdl://127.0.0.1:2641", "hdl+tcp://127.0.0.1:2642"]
    assert isinstance(make_client(parse_upstream_url("http://h:1"), 1.0), RestClient)
    native = make_client(parse_upstream_url("hdl+tcp://h:2641"), 1.0)
    assert type(native).__name__ == "HandleClient"
    with pytest.raises(ValueError, match="given twice"):
        UpstreamPool.from_urls(["hdl://a", "hdl://a"])
    with pytest.raises(ValueError, match="'bogus://x'"):
        UpstreamPool.from_urls(["hdl://a", "bogus://x"])


# -- answers and failover ------------------------------------------------------------------------------
async def test_answer_from_first_node() -> None:
    a, b = FakeUpstream([PUMP]), FakeUpstream([PUMP])
    p = pool(a, b)
    ans = await p.resolve(H)
    assert (ans.code, ans.values, ans.node) == (1, PUMP.values, "fake://0")
    assert (a.calls, b.calls) == (1, 0)


async def test_not_found_is_an_answer_not_a_failure() -> None:
    a, b = FakeUpstream([]), FakeUpstream([PUMP])
    p = pool(a, b)
    ans = await p.resolve(H)
    assert ans.code == 100 and b.calls == 0  # no failover on "not found"
    single = pool(FakeUpstream([PUMP]))
    assert (await single.resolve(H, types=("NOPE",))).code == 200
    assert p.stats()["fake://0"].failures == 0 and single.stats()["fake://0"].failures == 0


async def test_failover_to_the_second_node() -> None:
    a = FakeUpstream([PUMP], error=UpstreamBusy("busy"))
    b = FakeUpstream([PUMP])
    p = pool(a, b)
    ans = await p.resolve(H)
    assert ans.node == "fake://1" and ans.code == 1
    st = p.stats()
    assert (st["fake://0"].requests, st["fake://0"].failures, st["fake://1"].answers) == (1, 1, 1)
    # the failed node is now tried after the healthy one
    assert p.order() == ["fake://1", "fake://0"]


async def test_failover_on_attempt_timeout() -> None:
    a = FakeUpstream([PUMP], latency=1.0)
    b = FakeUpstream([PUMP])
    p = pool(a, b, attempt_timeout=0.05, timeout=1.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ans = await p.resolve(H)
    assert ans.node == "fake://1" and loop.time() - t0 < 0.5
    assert a.cancelled == 1
    assert isinstance(p._nodes[0].last_error, UpstreamTimeout)


async def test_every_node_failing_raises_all_upstreams_failed_with_each_error() -> None:
    a = FakeUpstream(error=refused("a"))
    b = FakeUpstream(error=ProtocolError("garbage"))
    p = pool(a, b)
    with pytest.raises(AllUpstreamsFailed) as e:
        await p.resolve(H)
    assert set(e.value.errors) == {"fake://0", "fake://1"}
    assert isinstance(e.value.errors["fake://1"], ProtocolError)
    assert e.value.errors["fake://1"].node == "fake://1"


async def test_overall_timeout_raises_upstream_timeout() -> None:
    p = pool(
        FakeUpstream(latency=5), FakeUpstream(latency=5), timeout=0.1, attempt_timeout=5, hedge_delay=0.02
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(UpstreamTimeout):
        await p.resolve(H)
    assert 0.09 <= loop.time() - t0 < 0.3


async def test_client_bug_counts_as_a_failure() -> None:
    a = FakeUpstream(error=KeyError("oops"))
    b = FakeUpstream([PUMP])
    p = pool(a, b)
    assert (await p.resolve(H)).node == "fake://1"
    assert p.stats()["fake://0"].failures == 1


# -- hedging ------------------------------------------------------------------------------------------
async def test_hedge_only_after_the_delay_and_first_answer_wins() -> None:
    slow = FakeUpstream([PUMP], latency=2.0)
    fast = FakeUpstream([PUMP], latency=0.0)
    p = pool(slow, fast, hedge_delay=0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ans = await p.resolve(H)
    elapsed = loop.time() - t0
    assert ans.node == "fake://1"
    assert fast.calls == 1 and fast.requests[0][0] - t0 >= 0.049  # the hedge went out after the delay
    assert elapsed < 0.5  # not the slow node's 2 s
    await asyncio.sleep(0)
    assert slow.cancelled == 1  # the loser is cancelled
    st = p.stats()
    assert st["fake://0"].cancelled == 1 and st["fake://0"].failures == 0


async def test_no_hedge_when_the_first_node_answers_in_time() -> None:
    a = FakeUpstream([PUMP], latency=0.01)
    b = FakeUpstream([PUMP])
    p = pool(a, b, hedge_delay=0.1)
    assert (await p.resolve(H)).node == "fake://0"
    await asyncio.sleep(0.12)
    assert b.calls == 0


async def test_hedge_disabled_by_default_and_by_zero() -> None:
    assert pool(FakeUpstream()).hedge_delay is None
    assert pool(FakeUpstream(), hedge_delay=0).hedge_delay is None


async def test_hedged_loser_error_does_not_hide_the_winner() -> None:
    a = FakeUpstream([PUMP], latency=0.1)
    b = FakeUpstream(error=UpstreamBusy("busy"), latency=0.0)
    c = FakeUpstream([PUMP], latency=0.0)
    p = pool(a, b, c, hedge_delay=0.02)
    ans = await p.resolve(H)
    # a is slow, the hedge to b fails at once, so c is asked (failover keeps two in flight); c wins
    assert ans.node == "fake://2" and b.calls == 1


# -- health -------------------------------------------------------------------------------------------
async def test_latency_ewma_orders_nodes() -> None:
    a = FakeUpstream([PUMP], latency=0.03)
    b = FakeUpstream([PUMP], latency=0.0)
    p = pool(a, b)
    await p.resolve(H)  # a measured (slow); b never measured -> b goes first
    assert p.order() == ["fake://1", "fake://0"]
    await p.resolve(H)
    assert p.order() == ["fake://1", "fake://0"] and b.calls == 1
    ewma = p.stats()["fake://1"].latency_ewma
    assert ewma is not None and ewma < 0.03


async def test_sick_node_cools_down_then_is_probed_again() -> None:
    clock = Clock(1000.0)
    a = FakeUpstream([PUMP], error=refused())
    p = pool(a, failure_threshold=2, cooldown=1.0, max_cooldown=8.0, clock=clock)
    for _ in range(2):
        with pytest.raises(AllUpstreamsFailed):
            await p.resolve(H)
    assert a.calls == 2 and p.order() == [] and not p.stats()["fake://0"].healthy  # sick after 2 failures
    with pytest.raises(AllUpstreamsFailed):
        await p.resolve(H)
    assert a.calls == 2  # not asked while cooling down
    clock.advance(1.01)
    assert p.order() == ["fake://0"]
    with pytest.raises(AllUpstreamsFailed):
        await p.resolve(H)  # the probe fails: cooldown doubles
    assert a.calls == 3 and p._nodes[0].down_until == pytest.approx(clock() + 2.0)
    clock.advance(1.5)
    assert p.order() == []
    clock.advance(0.6)
    a.error = None
    assert (await p.resolve(H)).code == 1
    st = p.stats()["fake://0"]
    assert st.consecutive_failures == 0 and st.healthy and st.failures == 3


async def test_failed_node_is_tried_after_healthy_ones() -> None:
    a = FakeUpstream([PUMP], error=refused())
    b = FakeUpstream([PUMP], latency=0.02)
    p = pool(a, b, failure_threshold=5)
    assert (await p.resolve(H)).node == "fake://1"
    a.error = None
    assert p.order() == ["fake://1", "fake://0"]  # one failure outranks b's higher latency
    assert (await p.resolve(H)).node == "fake://1"


async def test_all_nodes_sick_fails_at_once_without_sending() -> None:
    a, b = FakeUpstream(error=refused()), FakeUpstream(error=refused())
    p = pool(a, b, failure_threshold=1, cooldown=10)
    with pytest.raises(AllUpstreamsFailed):
        await p.resolve(H)
    assert (a.calls, b.calls) == (1, 1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(AllUpstreamsFailed) as e:
        await p.resolve(H)
    assert loop.time() - t0 < 0.01
    assert (a.calls, b.calls) == (1, 1)
    assert set(e.value.errors) == {"fake://0", "fake://1"}


async def test_refused_rest_nodes_fail_fast() -> None:
    ports = []
    for _ in range(2):  # ports that were just free: connecting is refused
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    p = UpstreamPool.from_urls(
        [f"http://127.0.0.1:{port}" for port in ports], timeout=2.0, attempt_timeout=2.0
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        with pytest.raises(AllUpstreamsFailed) as e:
            await p.resolve(H)
    finally:
        await p.close()
    assert loop.time() - t0 < 0.5
    assert all(type(err) is UpstreamError for err in e.value.errors.values())


async def test_close_closes_every_client() -> None:
    a, b = FakeUpstream(), FakeUpstream()
    p = pool(a, b)
    await p.close()
    assert a.closed and b.closed


async def test_empty_pool_says_no_upstream() -> None:
    with pytest.raises(AllUpstreamsFailed, match="no upstream configured"):
        await UpstreamPool([]).resolve(H)


# -- counters -----------------------------------------------------------------------------------------
def test_histogram_buckets_are_prometheus_shaped() -> None:
    h = Histogram()
    for v in (0.0005, 0.004, 0.004, 0.3, 20.0):
        h.observe(v)
    cum = dict(h.cumulative())
    assert cum[0.001] == 1 and cum[0.005] == 3 and cum[0.25] == 3 and cum[0.5] == 4 and cum[10.0] == 4
    assert cum[math.inf] == 5 == h.count
    assert h.sum == pytest.approx(20.3085)
    assert list(cum) == sorted(cum)


async def test_requests_and_latency_counted_per_node() -> None:
    a = FakeUpstream([PUMP], error=refused())
    b = FakeUpstream([PUMP])
    p = pool(a, b)
    for _ in range(3):
        await p.resolve(H)
    st = p.stats()
    assert st["fake://0"].requests == 1  # failed once, then ordered after b
    assert st["fake://1"].requests == 3 and st["fake://1"].latency.count == 3
    assert st["fake://0"].latency.count == 1


# -- the attempt timer (asyncio.timeout's rules, spelt out) ------------------------------------------------------------
async def test_single_node_attempt_timeout_is_upstream_timeout_and_leaves_the_task_clean() -> None:
    p = pool(FakeUpstream([PUMP], latency=1.0), timeout=5.0, attempt_timeout=0.05)
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(AllUpstreamsFailed) as e:
        await p.resolve(H)
    assert isinstance(e.value.errors["fake://0"], UpstreamTimeout)
    assert task.cancelling() == 0  # the timer's cancellation was taken back
    s = p.stats()["fake://0"]
    assert (s.failures, s.cancelled) == (1, 0)


async def test_outside_cancellation_is_not_a_timeout() -> None:
    up = FakeUpstream([PUMP], latency=1.0)
    p = pool(up, attempt_timeout=0.5)
    t = asyncio.create_task(p.resolve(H))
    await asyncio.sleep(0.02)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    s = p.stats()["fake://0"]
    assert (s.cancelled, s.failures) == (1, 0)


async def test_cancelled_while_the_timer_is_pending_then_timer_fires_later_is_harmless() -> None:
    """A caller that itself runs under a timeout shorter than the attempt's gets its own TimeoutError."""
    p = pool(FakeUpstream([PUMP], latency=1.0), attempt_timeout=0.5)
    with pytest.raises(TimeoutError) as e:
        async with asyncio.timeout(0.05):
            await p.resolve(H)
    assert not isinstance(e.value, UpstreamTimeout)
    await asyncio.sleep(0.6)  # the attempt's timer was cancelled: nothing is cancelled later
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_client_that_swallows_the_timer_still_answers() -> None:
    class Stubborn(FakeUpstream):
        async def resolve(self, handle, types=(), indexes=()):  # type: ignore[no-untyped-def]
            try:
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                pass
            return await super().resolve(handle, types, indexes)

    p = pool(Stubborn([PUMP]), attempt_timeout=0.05)
    a = await p.resolve(H)
    assert a.code == 1
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


# -- health counts node failures only (issue 19: a foreign prefix must not take the upstream down) ---------------
def _refused(code: int) -> UpstreamRefused:
    return UpstreamRefused(f"a/b: {N.ResponseCode.describe(code)}", code=code)


NODE_FAILURES = [
    UpstreamTimeout("silent"),
    UpstreamError("connection refused"),
    ProtocolError("garbage"),
    UpstreamBusy("busy"),
    _refused(N.RC_ERROR),
    _refused(N.RC_PROTOCOL_ERROR),
    _refused(N.ResponseCode.SERVER_BACKUP),
    _refused(N.ResponseCode.SESSION_FAILED),
    _refused(777),  # a code no version defines
    KeyError("a bug in the client"),
]
NOT_SERVED = [
    _refused(N.RC_SERVER_NOT_RESP),
    UpstreamReferral("a/b: referral", code=N.RC_SERVICE_REFERRAL, referral=b"\x00\x00\x00\x03x/y"),
    UpstreamReferral("a/b: referral", code=N.RC_PREFIX_REFERRAL),
]
REFUSALS = [
    _refused(code)
    for code in (
        N.RC_OPERATION_DENIED,
        N.RC_RECUR_LIMIT_EXCEEDED,
        N.RC_INVALID_HANDLE,
        N.RC_EXPIRED_SITE_INFO,
        N.RC_NOT_AUTHORIZED,
        N.RC_ACCESS_DENIED,
        N.RC_AUTHEN_NEEDED,
        N.RC_AUTHEN_FAILED,
    )
]
KINDS = (
    [(e, Outcome.NODE_FAILURE) for e in NODE_FAILURES]
    + [(e, Outcome.NOT_SERVED) for e in NOT_SERVED]
    + [(e, Outcome.REFUSED) for e in REFUSALS]
)


@pytest.mark.parametrize(
    ("error", "kind"), KINDS, ids=lambda v: type(v).__name__ + str(getattr(v, "code", ""))
)
def test_outcome_of_each_error(error: BaseException, kind: Outcome) -> None:
    assert outcome_of(error) is kind


@pytest.mark.parametrize(
    ("error", "kind"), KINDS, ids=lambda v: type(v).__name__ + str(getattr(v, "code", ""))
)
async def test_health_accounting_per_outcome_kind(error: BaseException, kind: Outcome) -> None:
    """Five outcomes of one kind in a row at threshold 3: only node failures count and put the node in
    cooldown; an answer about the name or the request counts as an answer and keeps it healthy."""
    clock = Clock(1000.0)
    up = FakeUpstream([PUMP], error=error)
    p = pool(up, failure_threshold=3, cooldown=10.0, clock=clock)
    for _ in range(5):
        with pytest.raises(AllUpstreamsFailed) as e:
            await p.resolve(H)
        assert isinstance(e.value, NameNotServed) == (kind is Outcome.NOT_SERVED)
    st = p.stats()["fake://0"]
    if kind is Outcome.NODE_FAILURE:
        assert up.calls == 3  # sick after the third: the fourth and fifth are not sent
        assert (st.failures, st.answers, st.consecutive_failures, st.healthy) == (3, 0, 3, False)
    else:
        assert up.calls == 5
        assert (st.failures, st.answers, st.consecutive_failures, st.healthy) == (0, 5, 0, True)
        assert st.latency.count == 5
    up.error = None  # a valid name right after: answered unless the node is cooling down
    if kind is Outcome.NODE_FAILURE:
        with pytest.raises(AllUpstreamsFailed):
            await p.resolve(H)
    else:
        assert (await p.resolve(H)).code == N.RC_SUCCESS


async def test_an_answer_about_the_name_resets_the_failure_count() -> None:
    up = FakeUpstream([PUMP], error=UpstreamTimeout("silent"))
    p = pool(up, failure_threshold=3)
    for _ in range(2):
        with pytest.raises(AllUpstreamsFailed):
            await p.resolve(H)
    up.error = _refused(N.RC_SERVER_NOT_RESP)
    with pytest.raises(NameNotServed):
        await p.resolve("99.1/X")
    assert p.stats()["fake://0"].consecutive_failures == 0  # the node answered: it is reachable


async def test_name_not_served_by_every_node() -> None:
    body = b"\x00\x00\x00\x0b0.NA/10.999"
    a = FakeUpstream(error=_refused(N.RC_SERVER_NOT_RESP))
    b = FakeUpstream(error=UpstreamReferral("referral", code=N.RC_PREFIX_REFERRAL, referral=body))
    p = pool(a, b)
    with pytest.raises(NameNotServed) as e:
        await p.resolve("99.999/FOREIGN-1")
    assert (a.calls, b.calls) == (1, 1)  # the second node was asked: another node may serve the prefix
    err = e.value
    assert isinstance(err, AllUpstreamsFailed) and set(err.errors) == {"fake://0", "fake://1"}
    assert (err.handle, err.prefix, err.code, err.referral) == ("99.999/FOREIGN-1", "99.999", 303, body)
    only_301 = pool(FakeUpstream(error=_refused(N.RC_SERVER_NOT_RESP)))
    with pytest.raises(NameNotServed) as e:
        await only_301.resolve("99.999/FOREIGN-2")
    assert (e.value.code, e.value.referral, e.value.prefix) == (301, b"", "99.999")


async def test_a_node_that_serves_the_name_answers_after_one_that_does_not() -> None:
    a = FakeUpstream(error=_refused(N.RC_SERVER_NOT_RESP))
    b = FakeUpstream([PUMP], latency=0.01)
    p = pool(a, b)
    assert (await p.resolve(H)).node == "fake://1"
    assert p.stats()["fake://0"].failures == 0


async def test_not_served_and_failure_together_are_not_name_not_served() -> None:
    p = pool(FakeUpstream(error=_refused(N.RC_SERVER_NOT_RESP)), FakeUpstream(error=UpstreamBusy("busy")))
    with pytest.raises(AllUpstreamsFailed) as e:
        await p.resolve("99.999/X")
    assert not isinstance(e.value, NameNotServed)  # the busy node may serve it: nothing to say about the name


UNITS = [f"88.123.99/UNIT-{i:04d}" for i in range(20)]


def _unit_records() -> list[Record]:
    return [
        *sample_records(),
        *(Record(h, (HandleValue(1, "URL", b"https://example.org/unit"),)) for h in UNITS),
    ]


async def _foreign_flood(resolve: Callable[[str], Awaitable[Any]], valid: list[str]) -> int:
    """Issue 19's pattern: three resolves of a prefix the node does not host, then one valid never-seen
    identifier, over and over. Returns how many valid ones resolved."""
    ok = 0
    for i, name in enumerate(valid):
        for j in range(3):
            with pytest.raises(AllUpstreamsFailed):
                await resolve(f"99.999/FOREIGN-{i}-{j}")
        try:
            answer = await resolve(name)
        except UpstreamError:
            continue
        ok += answer.code == N.RC_SUCCESS
    return ok


@pytest.mark.parametrize("side", ["native", "rest"])
async def test_foreign_prefix_flood_leaves_valid_resolves_at_100_percent(side: str) -> None:
    """A real node answering 301 for a prefix it does not host: the pool's defaults (threshold 3, cooldown
    1 s) used to put it in cooldown after three of them, and every valid resolve got 5.03."""
    async with NodeServer(_unit_records()) as node:
        p = UpstreamPool.from_urls([node.handle_url if side == "native" else node.http_url])
        try:
            assert await _foreign_flood(p.resolve, UNITS) == len(UNITS)
            st = p.stats()[p.nodes[0]]
            assert (st.failures, st.healthy, st.answers) == (0, True, 4 * len(UNITS))
        finally:
            await p.close()


async def test_foreign_prefix_flood_through_the_resolver() -> None:
    async with NodeServer(_unit_records(), http=None) as node:
        resolver = Resolver(ResolverConfig(upstreams=[node.handle_url]))
        try:
            assert await _foreign_flood(resolver.resolve, UNITS) == len(UNITS)
            not_served = resolver.stats().not_served_answers
        finally:
            await resolver.close()
        # the first 301 is remembered for the prefix (negative TTL): the others never reach the node
        assert node.stats.answers[N.RC_SERVER_NOT_RESP] == 1
        assert not_served == 3 * len(UNITS) - 1
