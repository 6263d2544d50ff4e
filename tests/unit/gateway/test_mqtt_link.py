"""The MQTT device link's requests (gateway/frontends/mqtt_link.py, its session and table): against a real Mosquitto with a paho device, and against
small fake brokers for what Mosquitto will not do (garbage, refusals, QoS 1 requests, silence)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.cache import Cache
from gateway.frontends.mqtt import MqttFrontEnd
from gateway.frontends.mqtt_link import DeviceLink
from gateway.frontends.mqtt_table import request_key
from gateway.frontends.mqtt_window import Qos1Window
from gateway.metrics import Metrics
from gateway.ratelimit import Limits, RateLimiter
from gateway.registry import Registry
from gateway.resolver import Resolver, ResolverConfig
from gateway.upstream.pool import UpstreamPool
from gateway.zone import Zone
from proto import devicemsg, mqtt
from proto.records import HandleValue, Record
from tests.support.brokers import Broker, Device, with_device
from tests.support.gwhelpers import (
    POSITIVE_TTL,
    PUMP,
    Clock,
    FakeResolver,
    eventually,
    report_fields,
    sample_records,
)
from tests.support.upstream_fakes import FakeUpstream


class Env:
    def __init__(self, tmp: Path, url: str, resolver: Any, clock: Clock, **kw: Any) -> None:
        self.registry = Registry(tmp / "registry.sqlite3")
        self.metrics = Metrics()
        self.resolver = resolver
        self.clock = clock
        if isinstance(resolver, Resolver):  # as gateway/service.py wires a real resolver
            kw.setdefault("answers", resolver.answer_cache())
        self.fe = MqttFrontEnd(url, resolver, self.registry, self.metrics, reconnect_max=1, clock=clock, **kw)
        self.dev = Device(url, PUMP)

    @property
    def link(self) -> DeviceLink:
        assert self.fe.fast is not None
        return self.fe.fast

    async def ask(self, token: bytes, **extra: Any) -> bytes:
        self.dev.resolve(token, PUMP, **extra)
        payload, _ = await self.dev.recv("res")
        return payload

    def calls(self) -> int:
        r = self.resolver
        return len(r.calls) if isinstance(r.calls, list) else int(r.calls)


async def _env(tmp_path: Path, url: str, resolver: Any, clock: Clock, **kw: Any) -> AsyncIterator[Env]:
    env = Env(tmp_path, url, resolver, clock, **kw)
    async with with_device(env.fe, env.dev, env.registry):
        yield env


@pytest.fixture
async def env(tmp_path: Path, mosquitto: Broker) -> AsyncIterator[Env]:
    clock = Clock()
    async for e in _env(tmp_path, mosquitto.url, FakeResolver(clock=clock), clock):
        yield e


def _as_cached(payload: bytes, token: bytes) -> bytes:
    """The slow path's answer as a table hit says it: ``source`` cache, the given token."""
    fields = devicemsg.decode("resolve_response", payload)
    return devicemsg.encode("resolve_response", {**fields, "token": token, "source": devicemsg.SOURCE_CACHE})


# -- hits ------------------------------------------------------------------------------------------------------
async def test_second_request_is_answered_from_the_table_with_the_slow_paths_bytes(env: Env) -> None:
    first = await env.ask(b"\x01")
    assert env.calls() == 1 and env.link.answered == 0
    assert devicemsg.decode("resolve_response", first)["source"] == devicemsg.SOURCE_UPSTREAM
    second = await env.ask(b"\x02\x02\x02")  # another token length: the same entry
    assert env.calls() == 1 and env.link.answered == 1
    assert second == _as_cached(first, b"\x02\x02\x02")
    third = await env.ask(b"\x03")
    assert third == _as_cached(first, b"\x03") and env.link.answered == 2


async def test_ttl_counts_down_and_expiry_asks_the_resolver_again(env: Env) -> None:
    await env.ask(b"\x01")
    env.clock.advance(10.4)
    later = devicemsg.decode("resolve_response", await env.ask(b"\x02"))
    assert later["ttl"] == POSITIVE_TTL - 11 and env.calls() == 1  # int(expires - now), as the slow path says
    env.clock.advance(POSITIVE_TTL)  # expired: the table gives it up, the resolver answers
    again = devicemsg.decode("resolve_response", await env.ask(b"\x03"))
    assert env.calls() == 2 and again["ttl"] == POSITIVE_TTL and again["token"] == b"\x03"


async def test_etag_revalidation_is_served_from_the_table(env: Env) -> None:
    first = devicemsg.decode("resolve_response", await env.ask(b"\x01"))
    etag = first["etag"]
    nm1 = devicemsg.decode("not_modified", await env.ask(b"\x02", etag=etag))
    assert nm1["code"] == devicemsg.NOT_MODIFIED and env.calls() == 2  # a request of its own (with the etag)
    nm2_raw = await env.ask(b"\x03", etag=etag)
    assert devicemsg.decode("not_modified", nm2_raw) == {**nm1, "token": b"\x03"}
    assert env.calls() == 2 and env.link.valid == 1
    other = devicemsg.decode(
        "resolve_response", await env.ask(b"\x04", etag=b"\x00" * 8)
    )  # a different etag: full
    assert other["code"] == devicemsg.OK and other["values"] == first["values"]


async def test_requests_with_other_fields_are_other_entries(env: Env) -> None:
    await env.ask(b"\x01")
    narrow = devicemsg.decode("resolve_response", await env.ask(b"\x02", types=["URL"]))
    assert [v[1] for v in narrow["values"]] == ["URL"] and env.calls() == 2
    again = devicemsg.decode("resolve_response", await env.ask(b"\x03", types=["URL"]))
    assert again["values"] == narrow["values"] and env.calls() == 2 and env.link.answered == 1


async def test_a_request_not_in_deterministic_order_always_takes_the_slow_path(env: Env) -> None:
    odd = cbor2.dumps({2: PUMP, 1: b"\x07"})  # valid, but the token is not first
    assert request_key(odd) is None
    for _ in range(3):
        env.dev.publish("req", odd)
        answer = devicemsg.decode("resolve_response", (await env.dev.recv("res"))[0])
        assert answer["token"] == b"\x07" and answer["code"] == devicemsg.OK
    assert env.calls() == 3 and env.link.answered == 0


async def test_errors_are_not_learned_and_garbage_is_answered_by_the_slow_path(env: Env) -> None:
    env.dev.resolve(b"\x01", "88.123.99/MISSING")
    for i in range(2):
        env.dev.resolve(bytes((2 + i,)), "88.123.99/MISSING")
        assert devicemsg.loads((await env.dev.recv("res"))[0])[3] == devicemsg.NOT_FOUND
    await env.dev.recv("res")
    assert env.link.answered == 0 and len(env.link.table.entries) == 0
    bad = bytes.fromhex("a20141090205")  # token first, then an id that is not a string: not a request
    env.dev.publish("req", bad)
    err = devicemsg.decode("error", (await env.dev.recv("res"))[0])
    assert err["code"] == devicemsg.BAD_REQUEST and err["token"] == b"\x09"


async def test_hits_are_counted_in_metrics_and_cache_hits(env: Env) -> None:
    for i in range(5):
        await env.ask(bytes((i + 1,)))
    text = env.metrics.render()
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("ida_requests_total{") and 'frontend="mqtt"' in x and f'code="{devicemsg.OK}"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == 5  # 1 by the slow path + 4 from the table
    assert env.link.stats()["answered"] == 4


async def test_rate_limit_applies_to_hits(tmp_path: Path, mosquitto: Broker) -> None:
    clock = Clock()
    limiter = RateLimiter(Limits(device_rate=0.001, device_burst=3))
    async for env in _env(tmp_path, mosquitto.url, FakeResolver(clock=clock), clock, limiter=limiter):
        for i in range(3):
            await env.ask(bytes((i + 1,)))  # 1 slow + 2 hits: the burst
        env.dev.resolve(b"\x09", PUMP)
        with pytest.raises(TimeoutError):
            await env.dev.recv("res", timeout=0.5)  # dropped unanswered
        assert env.fe.counters["ratelimited"] == 1 and env.link.answered == 2


# -- staying equal to the resolver ---------------------------------------------------------------------------
def _real_resolver(clock: Clock, zone: Zone) -> Resolver:
    config = ResolverConfig(upstreams=[], data_dir=None, persist=False)
    pool = UpstreamPool([("fake://0", FakeUpstream(list(sample_records().values())))])  # type: ignore[list-item]
    return Resolver(config, pool=pool, cache=Cache(config.cache, clock=clock), zone=zone, clock=clock)


async def test_with_the_resolver_cache_and_zone(tmp_path: Path, mosquitto: Broker) -> None:
    clock = Clock()
    zone = Zone()
    resolver = _real_resolver(clock, zone)
    try:
        async for env in _env(tmp_path, mosquitto.url, resolver, clock):
            first = await env.ask(b"\x01")
            assert devicemsg.decode("resolve_response", first)["source"] == devicemsg.SOURCE_UPSTREAM
            hits = resolver.cache.stats.hits
            for i in range(3):
                assert await env.ask(bytes((2 + i,))) == _as_cached(first, bytes((2 + i,)))
            assert (
                env.link.answered == 3 and resolver.cache.stats.hits == hits + 3
            )  # table hits are cache hits
            # the zone takes the handle over: the next check (the ttl ticks each second) drops the entry
            zone.add(Record(PUMP, (HandleValue(1, "URL", b"https://zone.example/", ttl=60),)), persist=False)
            clock.advance(1.0)
            r = devicemsg.decode("resolve_response", await env.ask(b"\x10"))
            assert r["source"] == devicemsg.SOURCE_ZONE and env.link.answered == 3
            await env.ask(b"\x11")
            assert env.link.answered == 3  # zone answers are never learned
            assert resolver.stats().upstream_fetches == 1
    finally:
        await resolver.close()


# -- the link itself ---------------------------------------------------------------------------------------------
async def test_broker_restart_reconnects_and_resubscribes(tmp_path: Path, mosquitto: Broker) -> None:
    clock = Clock()
    async for env in _env(tmp_path, mosquitto.url, FakeResolver(clock=clock), clock):
        await env.ask(b"\x01")
        mosquitto.restart()
        await env.dev.wait_connected()
        deadline = time.monotonic() + 20
        while not (env.link.ready and env.link.connects >= 2):
            assert time.monotonic() < deadline, "the device link did not come back"
            await asyncio.sleep(0.05)
        assert (
            devicemsg.decode(
                "resolve_response",
                await env.ask(
                    b"\x02",
                ),
            )["token"]
            == b"\x02"
        )


async def test_without_the_fast_path_requests_use_the_paho_link(tmp_path: Path, mosquitto: Broker) -> None:
    clock = Clock()
    async for env in _env(tmp_path, mosquitto.url, FakeResolver(clock=clock), clock, fast_path=False):
        assert env.fe.fast is None and any(t.endswith("/req") for t in env.fe.topics)
        for i in range(2):
            assert devicemsg.decode("resolve_response", await env.ask(bytes((i + 1,))))["token"] == bytes(
                (i + 1,)
            )
        assert env.calls() == 2


class FakeBroker:
    """An MQTT v5 broker that does just enough: CONNACK (``refuse`` = its reason code; ``receive_max``: its Receive
    Maximum property), SUBACK, PINGRESP when ``pong``; ``script(conn)`` runs after the SUBACK. Records the packets
    each connection sent."""

    def __init__(
        self,
        *,
        refuse: int = 0,
        pong: bool = True,
        script: Callable[[asyncio.StreamWriter], Any] | None = None,
        receive_max: int = 0,
    ) -> None:
        self.refuse = refuse
        self.receive_max = receive_max
        self.pong = pong
        self.script = script
        self.connections = 0
        self.received: list[tuple[int, bytes]] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> FakeBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        r = mqtt.Reader(1 << 16)
        try:
            while data := await reader.read(4096):
                for first, body in r.feed(data):
                    self.received.append((first, body))
                    kind = first >> 4
                    if kind == 1:
                        props = b"\x21" + self.receive_max.to_bytes(2, "big") if self.receive_max else b""
                        writer.write(bytes((0x20, 3 + len(props), 0, self.refuse, len(props))) + props)
                        if self.refuse:
                            await writer.drain()
                            writer.close()
                            return
                    elif kind == 8:
                        writer.write(_suback(body))
                        if self.script is not None:
                            await self.script(writer)
                    elif kind == 12 and self.pong:
                        writer.write(mqtt.PINGRESP_BYTES)
        except (ConnectionError, mqtt.MqttProtocolError):
            pass
        finally:
            writer.close()


def _suback(subscribe: bytes) -> bytes:
    """The SUBACK to a v5 SUBSCRIBE without properties: each filter granted the QoS it asked for."""
    pos, codes = 3, b""
    while pos < len(subscribe):
        n = int.from_bytes(subscribe[pos : pos + 2], "big")
        codes += bytes((subscribe[pos + 2 + n] & 3,))
        pos += 3 + n
    return bytes((0x90, 3 + len(codes))) + subscribe[:2] + b"\x00" + codes


def _link(url: str, handled: list[tuple[str, bytes]], **kw: Any) -> DeviceLink:
    return DeviceLink(url, on_message=lambda t, p: handled.append((t, p)), reconnect_max=1, **kw)


async def test_garbage_from_the_broker_closes_and_reopens_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def garbage(w: asyncio.StreamWriter) -> None:
        w.write(b"\xff\xff\xff\xff\xff\x01")  # a remaining length longer than 4 bytes

    handled: list[tuple[str, bytes]] = []
    async with FakeBroker(script=garbage) as broker:
        link = _link(broker.url, handled)
        caplog.set_level(logging.WARNING, "gateway.frontends.mqtt_session")
        await link.start()
        try:
            await eventually(lambda: broker.connections >= 2)
        finally:
            await link.stop()
    assert "bad data from the broker" in caplog.text
    assert handled == []


async def test_a_refused_connect_is_retried_and_never_ready(caplog: pytest.LogCaptureFixture) -> None:
    handled: list[tuple[str, bytes]] = []
    async with FakeBroker(refuse=0x86) as broker:
        link = _link(broker.url, handled)
        caplog.set_level(logging.WARNING, "gateway.frontends.mqtt_session")
        await link.start()
        try:
            await eventually(lambda: broker.connections >= 2)
            assert not link.ready
        finally:
            await link.stop()
    assert "bad user name or password" in caplog.text


async def test_credentials_and_maximum_packet_size_are_sent() -> None:
    from gateway.broker import MqttAuth

    async with FakeBroker() as broker:
        link = _link(broker.url, [], auth=MqttAuth("gw-1", "s3cret"), group="g9", client_id="gw-1-r")
        await link.start()
        try:
            assert await link.wait_ready(5)
        finally:
            await link.stop()
        await eventually(lambda: any(first == 0xE0 for first, _ in broker.received))  # DISCONNECT on stop
    connect = next(body for first, body in broker.received if first >> 4 == 1)
    assert connect[:7] == b"\x00\x04MQTT\x05" and connect[7] & 0xC2 == 0xC2  # v5, user, password, clean start
    assert b"\x27\x00\x01\x00\x00" in connect and connect.endswith(b"\x00\x04gw-1\x00\x06s3cret")
    sub = next(body for first, body in broker.received if first >> 4 == 8)
    assert b"$share/g9/ida/v1/d/+/req\x00" in sub  # QoS 0


async def test_qos1_requests_are_acknowledged_and_handed_on() -> None:
    req = devicemsg.encode("resolve_request", {"token": b"\x01", "id": PUMP})
    topic = f"ida/v1/d/{devicemsg.topic_key(PUMP)}/req".encode()

    async def qos1(w: asyncio.StreamWriter) -> None:
        body = len(topic).to_bytes(2, "big") + topic + b"\x12\x34" + b"\x00" + req
        w.write(bytes((0x32,)) + mqtt.varlen(len(body)) + body)

    handled: list[tuple[str, bytes]] = []
    async with FakeBroker(script=qos1) as broker:
        link = _link(broker.url, handled)
        await link.start()
        try:
            await eventually(lambda: bool(handled) and any(f == 0x40 for f, _ in broker.received))
        finally:
            await link.stop()
    assert handled == [(topic.decode(), req)]
    assert (0x40, b"\x12\x34") in broker.received


async def test_a_silent_broker_is_dropped_after_the_keepalive() -> None:
    async with FakeBroker(pong=False) as broker:
        link = _link(broker.url, [], keepalive=1)
        await link.start()
        try:
            await eventually(lambda: broker.connections >= 2, timeout=15)
        finally:
            await link.stop()


async def test_answers_while_disconnected_are_counted_as_dropped() -> None:
    link = _link("mqtt://127.0.0.1:9", [])
    assert link.publish_res("k", b"x") is False and link.dropped == 1


async def test_back_pressure_stops_reading_until_the_socket_drains(tmp_path: Path, mosquitto: Broker) -> None:
    clock = Clock()
    async for env in _env(tmp_path, mosquitto.url, FakeResolver(clock=clock), clock):
        conn = env.link.session._conn
        assert conn is not None and conn.transport is not None
        conn.pause_writing()
        assert not conn.transport.is_reading()
        conn.resume_writing()
        assert conn.transport.is_reading()
        assert devicemsg.decode("resolve_response", await env.ask(b"\x01"))["code"] == devicemsg.OK


async def test_reports_are_acknowledged_and_acks_stay_within_the_receive_maximum() -> None:
    """The broker's QoS 1 report gets its PUBACK and reaches ``on_report``; of five acks published at once the
    broker (Receive Maximum 2) gets two, and one more for each PUBACK it sends."""
    report = devicemsg.encode("report", report_fields(PUMP))
    key = devicemsg.topic_key(PUMP)
    writers: list[asyncio.StreamWriter] = []

    async def deliver(w: asyncio.StreamWriter) -> None:
        writers.append(w)
        topic = f"ida/v1/d/{key}/rpt".encode()
        body = len(topic).to_bytes(2, "big") + topic + b"\x00\x09" + b"\x00" + report
        w.write(bytes((0x32,)) + mqtt.varlen(len(body)) + body)

    def acks() -> list[tuple[bytes, bytes, int]]:
        return [mqtt.parse_publish(f, b, version=mqtt.MQTT5) for f, b in broker.received if f == 0x32]

    reports: list[tuple[str, bytes]] = []
    async with FakeBroker(script=deliver, receive_max=2) as broker:
        link = _link(broker.url, [], on_report=lambda k, p: reports.append((k, p)))
        await link.start()
        try:
            await eventually(lambda: bool(reports) and (0x40, b"\x00\x09") in broker.received)
            assert reports == [(key, report)]
            for i in range(5):
                assert link.publish_ack(key, bytes((i,)))
            await eventually(lambda: len(acks()) == 2)
            await asyncio.sleep(0.2)
            assert [p for _, p, _ in acks()] == [b"\x00", b"\x01"]  # the others wait for room
            writers[0].write(mqtt.puback(acks()[0][2]))
            await eventually(lambda: len(acks()) == 3)
            writers[0].write(mqtt.puback(acks()[1][2]) + mqtt.puback(acks()[2][2]))
            await eventually(lambda: len(acks()) == 5)
            assert [p for _, p, _ in acks()] == [bytes((i,)) for i in range(5)]
            assert {t for t, _, _ in acks()} == {f"ida/v1/d/{key}/ack".encode()}
            assert len({pid for _, _, pid in acks()}) == 5
        finally:
            await link.stop()
    sub = next(body for first, body in broker.received if first >> 4 == 8)
    assert b"/+/req\x00" in sub and b"/+/rpt\x01" in sub  # requests at QoS 0, reports at QoS 1


def _window_packet(packet: bytes) -> tuple[bytes, bytes, int]:
    ((first, body),) = mqtt.Reader().feed(packet)
    assert first == 0x32
    return mqtt.parse_publish(first, body, version=mqtt.MQTT5)


def test_qos1_window_ids_order_room_and_reset() -> None:
    w = Qos1Window(limit=2, waiting_max=2)
    a, b = w.publish(b"t/a", b"1"), w.publish(b"t/b", b"2")
    assert a is not None and b is not None
    assert _window_packet(a) == (b"t/a", b"1", 1) and _window_packet(b) == (b"t/b", b"2", 2)
    assert w.publish(b"t/c", b"3") is None and w.publish(b"t/d", b"4") is None  # waiting, in order
    assert w.publish(b"t/e", b"5") is None and w.dropped == 1  # the queue is full
    assert w.acked(b"\x00\x07") == []  # not in flight: nothing to release
    (c,) = w.acked(b"\x00\x01")
    assert _window_packet(c) == (b"t/c", b"3", 3)
    (d,) = w.acked(b"\x00\x02\x87")  # refused (not authorized): counted, the window moves on
    assert _window_packet(d) == (b"t/d", b"4", 4) and w.refused == 1
    pid = w.take_id()  # a SUBSCRIBE's id is never one in flight
    assert pid not in w.inflight and pid == 5
    assert w.acked(b"\x00\x03") == []  # room, and nothing waits for it
    f = w.publish(b"t/f", b"6")
    assert f is not None and _window_packet(f)[2] == 6  # 5 is taken by the SUBSCRIBE
    w.release_id(pid)
    w.publish(b"t/g", b"7")
    assert len(w.waiting) == 1
    w.reset(10)
    assert w.dropped == 2 and not w.inflight and not w.waiting and w.limit == 10
    assert w.sent == 5
