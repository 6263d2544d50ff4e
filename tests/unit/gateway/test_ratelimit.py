"""Rate limits: token buckets (fake clock), then each front end against a real peer: CoAP 4.29 + Max-Age (aiocoap
client), MQTT drop + counter (real Mosquitto, paho device), HTTP 429 + Retry-After (aiohttp client)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiocoap
import aiohttp
import pytest
from aiocoap.numbers.codes import Code

from gateway import config as gwconfig
from gateway.frontends.coap import CoapFrontEnd
from gateway.frontends.http import HttpFrontEnd
from gateway.metrics import Metrics
from gateway.ratelimit import (
    DEVICE,
    SOURCE,
    Limits,
    RateLimiter,
    TokenBuckets,
    retry_after,
    source_of_sockaddr,
)
from gateway.registry import Registry
from gateway.service import rate_limiter
from proto import devicemsg
from tests.support.brokers import Broker, Device
from tests.support.gwhelpers import PUMP, FakeResolver, report_fields

OTHER = "88.123.99/PUMP-0002"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- the buckets ---------------------------------------------------------------------------------------------
def test_bucket_burst_refill_and_wait() -> None:
    clock = Clock()
    b = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [b.take("d") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("d") == pytest.approx(0.5)  # 1 token at 2/s
    assert b.wait("d") == pytest.approx(0.5)  # refused requests take nothing
    clock.t += 0.25
    assert b.take("d") == pytest.approx(0.25)
    clock.t += 0.25
    assert b.take("d") == 0.0
    clock.t += 100
    assert [b.take("d") for _ in range(4)][-1] > 0  # refilled to the burst, not beyond
    assert b.take("other") == 0.0  # buckets are per key


def test_buckets_are_bounded_lru() -> None:
    clock = Clock()
    b = TokenBuckets(rate=1.0, burst=1, max_keys=3, clock=clock)
    for k in ("a", "b", "c"):
        assert b.take(k) == 0.0
    assert b.take("a") > 0  # touches a: b is now the least recently used
    assert b.take("d") == 0.0
    assert len(b) == 3 and b.evictions == 1
    assert b.take("a") > 0 and b.take("c") > 0  # kept
    assert b.take("b") == 0.0  # forgotten, so it starts full again
    for i in range(10_000):
        b.take(f"flood-{i}")
    assert len(b) == 3


def test_limiter_takes_from_both_or_neither() -> None:
    clock = Clock()
    lim = RateLimiter(Limits(device_rate=1, device_burst=1, source_rate=1, source_burst=2), clock=clock)
    assert lim.check(device="d1", source="10.0.0.1") == (0.0, None)
    v = lim.check(device="d1", source="10.0.0.1")
    assert v.limited and v.limit == DEVICE and v.wait == pytest.approx(1.0)
    # the refused request gave the source its token back: another device behind it still gets through
    assert not lim.check(device="d2", source="10.0.0.1").limited
    v = lim.check(device="d3", source="10.0.0.1")
    assert v.limit == SOURCE
    assert not lim.check(device=None, source="10.0.0.2").limited  # device unknown: only the source counts
    assert lim.refused == {DEVICE: 1, SOURCE: 1}
    assert (
        not RateLimiter(Limits()).enabled and not RateLimiter(Limits()).check(device="x", source="y").limited
    )


def test_retry_after_and_sources() -> None:
    assert [retry_after(w) for w in (0.01, 0.5, 1.0, 1.2, 29.9)] == [1, 1, 1, 2, 30]
    assert source_of_sockaddr("::ffff:10.0.0.7") == "10.0.0.7" and source_of_sockaddr("fe80::1") == "fe80::1"
    assert source_of_sockaddr(None) is None
    with pytest.raises(ValueError):
        Limits(device_rate=-1)


def test_config_section() -> None:
    cfg = gwconfig.from_mapping(
        {"limits": {"device_rate": 2, "device_burst": 4, "source_rate": 50.5}}, env={}
    )
    lim = rate_limiter(cfg)
    assert lim.device is not None and (lim.device.rate, lim.device.burst) == (2.0, 4.0)
    assert lim.source is not None and lim.source.rate == 50.5
    assert rate_limiter(gwconfig.from_mapping({"limits": {"device_rate": 0}}, env={})).device is None
    with pytest.raises(gwconfig.ConfigError, match=r"\[limits\] source_rate: expected a number of requests"):
        gwconfig.from_mapping({"limits": {"source_rate": "fast"}}, env={})


# -- CoAP ----------------------------------------------------------------------------------------------------
async def test_coap_answers_4_29_with_max_age(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite3")
    metrics = Metrics()
    limiter = RateLimiter(
        Limits(device_rate=0.5, device_burst=2, source_rate=1, source_burst=4), clock=Clock()
    )
    fe = CoapFrontEnd("127.0.0.1", 0, FakeResolver(), registry, metrics, limiter=limiter)
    _h, port = await fe.start()
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    base = f"coap://127.0.0.1:{port}"

    async def post(ident: str, seq: int) -> aiocoap.Message:
        msg = aiocoap.Message(
            code=Code.POST,
            uri=f"{base}/d/{ident}/rpt",
            content_format=60,
            payload=devicemsg.encode("report", report_fields(boot=1, seq=seq, id=ident)),
        )
        return await asyncio.wait_for(client.request(msg).response, 10)

    try:
        codes = [(await post(PUMP, seq)).code for seq in (1, 2)]
        assert codes == [Code.CHANGED, Code.CHANGED]
        limited = await post(PUMP, 3)  # the device's burst of 2 is spent; 0.5 tokens/s -> 2 s to wait
        assert limited.code == Code.TOO_MANY_REQUESTS
        assert limited.opt.max_age == 2
        err = devicemsg.decode("error", limited.payload)
        assert err["code"] == devicemsg.RATE_LIMITED and err["ttl"] == 2 and "device" in err["msg"]
        assert (await post(OTHER, 1)).code == Code.CHANGED  # another device is not held back ...
        # ... until the source address runs dry: 4 requests at once (the refused one gave its token back)
        codes = []
        for _ in range(2):
            msg = aiocoap.Message(code=Code.GET, uri=f"{base}/r/{PUMP}")
            resolve = await asyncio.wait_for(client.request(msg).response, 10)
            codes.append(resolve.code)
        assert codes == [Code.CONTENT, Code.TOO_MANY_REQUESTS] and resolve.opt.max_age == 1
        assert metrics.value("ida_ratelimited_total", {"frontend": "coap", "limit": "device"}) == 1
        assert metrics.value("ida_ratelimited_total", {"frontend": "coap", "limit": "source"}) == 1
        assert metrics.value("ida_requests_total", {"frontend": "coap", "code": "429"}) == 2
        assert registry.stats()["reports_total"] == 3
        assert 'ida_ratelimited_total{frontend="coap",limit="device"} 1' in metrics.render()
    finally:
        await client.shutdown()
        await fe.stop()
        registry.close()


# -- MQTT ----------------------------------------------------------------------------------------------------
async def test_mqtt_drops_and_counts(tmp_path: Path, mosquitto: Broker) -> None:
    from gateway.frontends.mqtt import MqttFrontEnd

    registry = Registry(tmp_path / "registry.sqlite3")
    metrics = Metrics()
    limiter = RateLimiter(Limits(device_rate=0.01, device_burst=2))
    fe = MqttFrontEnd(mosquitto.url, FakeResolver(), registry, metrics, limiter=limiter, reconnect_max=1)
    await fe.start()
    dev, other = Device(mosquitto.url, PUMP), Device(mosquitto.url, OTHER)
    try:
        assert fe.ready
        await dev.connect()
        await other.connect()
        for seq in range(1, 6):
            dev.report(1, seq)
        acks = [devicemsg.decode("report_ack", (await dev.recv("ack"))[0]) for _ in range(2)]
        assert [a["seq"] for a in acks] == [1, 2]
        with pytest.raises(TimeoutError):
            await dev.recv("ack", timeout=0.7)  # 3..5 dropped, unanswered
        dev.resolve(b"\x01", PUMP)
        with pytest.raises(TimeoutError):
            await dev.recv("res", timeout=0.3)
        other.resolve(b"\x02", PUMP)  # another device has its own bucket
        assert (await other.recv_message("res", "res"))["code"] == devicemsg.OK
        assert fe.counters["ratelimited"] == 4
        assert metrics.value("ida_ratelimited_total", {"frontend": "mqtt", "limit": "device"}) == 4
        assert registry.stats()["reports_total"] == 2
        dev.drop()  # the last will (status) is never rate limited
        await asyncio.sleep(0.3)
        assert registry.device(PUMP)["online"] is False  # type: ignore[index]
    finally:
        other.disconnect()
        await fe.stop()
        registry.close()


# -- HTTP ----------------------------------------------------------------------------------------------------
async def test_http_429_with_retry_after(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite3")
    metrics = Metrics()
    limiter = RateLimiter(Limits(source_rate=0.2, source_burst=2))
    fe = HttpFrontEnd("127.0.0.1", 0, FakeResolver(), registry, metrics, limiter=limiter)
    _h, port = await fe.start()
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(3):
                async with s.get(f"http://127.0.0.1:{port}/api/handles/{PUMP}") as r:
                    statuses.append(r.status)
                    retry = r.headers.get("Retry-After")
            assert statuses == [200, 200, 429] and retry == "5"
            for path in ("/healthz", "/metrics"):  # never limited: monitoring must see a flood
                async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                    assert r.status == 200
                    text = await r.text()
            assert 'ida_ratelimited_total{frontend="http",limit="source"} 1' in text
    finally:
        await fe.stop()
        registry.close()
