"""The MQTT front end against a real Mosquitto, with a paho client playing the device (MQTT 3.1.1)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import AllUpstreamsFailed, UpstreamTimeout
from gateway.frontends.mqtt import MqttFrontEnd, subscriptions
from gateway.registry import Registry
from gateway.resolution import Answer, etag_of
from proto import devicemsg
from proto.records import HandleValue, Record
from tests.support.brokers import Broker, Device
from tests.support.gwhelpers import eventually, report_fields

DEV = "88.123.99/PUMP-0001"
PUMP = Record(
    DEV,
    (
        HandleValue(1, "URL", b"https://example.com/pump", ttl=86400),
        HandleValue(2, "EMAIL", b"ops@example.com", ttl=3600),
    ),
)


class FakeResolver:
    """Answers from a fixed table; counts calls; ``delay`` makes every answer slow."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self.started = asyncio.Event()

    async def resolve(
        self, handle: str, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()
    ) -> Answer:
        self.calls += 1
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        now = time.time()
        if handle == DEV:
            rec = PUMP.select(types, indexes)
            return Answer(
                devicemsg.OK, handle, rec, devicemsg.SOURCE_CACHE, now + 300, etag_of(rec, devicemsg.OK)
            )
        if handle == "88.123.99/MISSING":
            return Answer(devicemsg.NOT_FOUND, handle, None, devicemsg.SOURCE_UPSTREAM, now + 60)
        if handle == "88.123.99/DOWN":
            raise AllUpstreamsFailed({})
        if handle == "88.123.99/SLOW":
            raise UpstreamTimeout("no answer in 1.8 s", node="n1")
        raise RuntimeError("resolver bug")


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()

    def count_request(self, frontend: str, code: int) -> None:
        self.counts[(frontend, code)] += 1


class Gateway:
    def __init__(
        self, tmp: Path, url: str, name: str = "gw", group: str | None = "ida-gw", delay: float = 0.0
    ) -> None:
        self.registry = Registry(tmp / f"{name}.db")
        self.resolver = FakeResolver(delay)
        self.metrics = Metrics()
        self.fe = MqttFrontEnd(url, self.resolver, self.registry, self.metrics, group=group, reconnect_max=1)

    async def start(self) -> Gateway:
        await self.fe.start()
        assert self.fe.ready
        return self

    async def stop(self) -> None:
        await self.fe.stop()
        self.registry.close()


@pytest.fixture
async def gw(tmp_path: Path, mosquitto: Broker) -> AsyncIterator[Gateway]:
    g = await Gateway(tmp_path, mosquitto.url).start()
    yield g
    await g.stop()


@pytest.fixture
async def device(mosquitto: Broker) -> AsyncIterator[Device]:
    d = Device(mosquitto.url, DEV)
    await d.connect()
    yield d
    d.disconnect()


def test_subscriptions() -> None:
    assert subscriptions("g") == [
        "$share/g/ida/v1/d/+/req",
        "$share/g/ida/v1/d/+/rpt",
        "$share/g/ida/v1/d/+/cfgack",
        "ida/v1/d/+/status",
    ]
    assert subscriptions(None)[0] == "ida/v1/d/+/req"


async def test_resolve_echoes_token(gw: Gateway, device: Device) -> None:
    device.resolve(b"\x01\x02", DEV)
    res = await device.recv_message("res", "res")
    assert res["token"] == b"\x01\x02" and res["code"] == devicemsg.OK and res["id"] == DEV
    assert res["values"] == [
        [1, "URL", "https://example.com/pump", 86400],
        [2, "EMAIL", "ops@example.com", 3600],
    ]
    assert 298 <= res["ttl"] <= 300 and res["source"] == devicemsg.SOURCE_CACHE and len(res["etag"]) == 8
    devicemsg.decode("resolve_response", devicemsg.encode("resolve_response", res))  # a well-formed message
    # revalidation with the etag: 203, no values
    device.resolve(b"\x03", DEV, etag=res["etag"])
    nm = await device.recv_message("res", "res")
    assert nm["token"] == b"\x03" and nm["code"] == devicemsg.NOT_MODIFIED and nm["etag"] == res["etag"]
    assert "values" not in nm
    # filters reach the resolver; the prefix is normalised before resolving
    device.resolve(b"\x04", "88.123.99/PUMP-0001", types=["EMAIL"])
    f = await device.recv_message("res", "res")
    assert [v[1] for v in f["values"]] == ["EMAIL"]
    assert (
        gw.metrics.counts[("mqtt", devicemsg.OK)] == 2
        and gw.metrics.counts[("mqtt", devicemsg.NOT_MODIFIED)] == 1
    )


@pytest.mark.parametrize(
    ("handle", "code"),
    [
        ("88.123.99/MISSING", devicemsg.NOT_FOUND),
        ("88.123.99/DOWN", devicemsg.UPSTREAM_UNAVAILABLE),
        ("88.123.99/SLOW", devicemsg.UPSTREAM_TIMEOUT),
        ("no-slash", devicemsg.BAD_REQUEST),
        ("88.123.99/BUG", devicemsg.INTERNAL),
    ],
)
async def test_resolve_errors(gw: Gateway, device: Device, handle: str, code: int) -> None:
    device.resolve(b"\xaa\xbb", handle)
    err = devicemsg.decode("error", (await device.recv("res"))[0])
    assert err["token"] == b"\xaa\xbb" and err["code"] == code
    if code == devicemsg.NOT_FOUND:
        assert err["id"] == handle and 58 <= err["ttl"] <= 60
    assert gw.metrics.counts[("mqtt", code)] == 1


async def test_bad_payloads_never_crash(gw: Gateway, device: Device) -> None:
    device.publish("req", b"\xff\x00garbage")  # no token to answer to: dropped, counted
    device.publish("req", devicemsg.dumps({1: b"\x07", 2: 5}))  # id has the wrong type, token known: 400
    device.publish("req", devicemsg.dumps([1, 2, 3]))
    device.publish("rpt", b"", qos=1)
    device.publish("cfgack", b"\xa1", qos=1)
    device.publish("status", b"\x00")
    device.client.publish("ida/v1/d/bad%ZZkey/rpt", b"\x01", qos=1)
    device.client.publish(
        "ida/v1/d/bad%ZZkey/req", devicemsg.encode("resolve_request", {"token": b"\x09", "id": DEV})
    )
    err = devicemsg.decode("error", (await device.recv("res"))[0])
    assert err["token"] == b"\x07" and err["code"] == devicemsg.BAD_REQUEST
    device.resolve(b"\x08", DEV)  # still answering
    ok = await device.recv_message("res", "res")
    assert ok["token"] == b"\x08" and ok["code"] == devicemsg.OK
    # the requests' and reports' answers are not ordered with each other: the bad report may come in later
    await eventually(lambda: gw.metrics.counts[("mqtt", devicemsg.BAD_REQUEST)] >= 4)


async def test_report_acked_and_stored_once(gw: Gateway, device: Device) -> None:
    for _ in range(2):  # the device did not hear the first ack and sends the same report again
        device.report(boot=2, seq=5, sensors={"temp": 21.5})
        ack = devicemsg.decode("report_ack", (await device.recv("ack"))[0])
        assert ack == {"boot": 2, "seq": 5, "code": devicemsg.OK}
    d = gw.registry.device(DEV)
    assert d is not None and d["reports_total"] == 1 and d["duplicates_total"] == 1
    assert d["transport"] == "mqtt" and d["last_report"]["sensors"] == {"temp": 21.5}
    assert gw.metrics.counts[("mqtt", devicemsg.OK)] == 2


async def test_report_ack_names_the_desired_config_version(gw: Gateway, device: Device) -> None:
    gw.registry.set_desired_config(DEV, interval=90)
    device.report(boot=2, seq=6)
    assert devicemsg.decode("report_ack", (await device.recv("ack"))[0]) == {
        "boot": 2,
        "seq": 6,
        "code": devicemsg.OK,
        "cfgver": 1,
    }


async def test_report_for_another_device_is_refused(gw: Gateway, device: Device) -> None:
    fields = report_fields("88.123.99/PUMP-0002", boot=1, seq=1)
    device.publish("rpt", devicemsg.encode("report", fields), qos=1)
    ack = devicemsg.decode("report_ack", (await device.recv("ack"))[0])
    assert ack == {"boot": 1, "seq": 1, "code": devicemsg.FORBIDDEN}
    # a report whose fields are wrong but whose boot/seq are readable: 400, so the device can drop it
    device.publish("rpt", devicemsg.dumps({2: DEV, 10: 1, 11: 2, 14: "weak"}), qos=1)
    ack = devicemsg.decode("report_ack", (await device.recv("ack"))[0])
    assert ack == {"boot": 1, "seq": 2, "code": devicemsg.BAD_REQUEST}
    assert gw.registry.stats()["reports_total"] == 0
    assert gw.registry.device("88.123.99/PUMP-0002") is None


async def test_status_retained_and_last_will(tmp_path: Path, mosquitto: Broker) -> None:
    dev = Device(mosquitto.url, DEV)
    await dev.connect()  # publishes online (retained) before any gateway runs
    g = await Gateway(tmp_path, mosquitto.url).start()
    try:
        await eventually(
            lambda: (g.registry.device(DEV) or {}).get("online") is True
        )  # from the retained status
        dev.drop()  # power loss: the broker publishes the last will
        await eventually(lambda: g.registry.device(DEV)["online"] is False)  # type: ignore[index]
        assert g.registry.stats()["devices_online"] == 0
    finally:
        await g.stop()


async def test_desired_config_delivered_and_acked(tmp_path: Path, mosquitto: Broker) -> None:
    reg0 = Registry(tmp_path / "gw.db")
    reg0.set_desired_config(
        DEV, interval=120, meta={"URL": "https://example.com/pump"}
    )  # while the gateway is down
    reg0.close()
    g = await Gateway(tmp_path, mosquitto.url).start()  # publishes it retained at connect
    dev = Device(mosquitto.url, DEV)
    try:
        await dev.connect()  # subscribes to cfg later: gets the retained message
        payload, retained = await dev.recv("cfg")
        assert retained and devicemsg.decode("config", payload) == {
            "cfgver": 1,
            "interval": 120,
            "meta": {"URL": "https://example.com/pump"},
        }
        dev.publish(
            "cfgack", devicemsg.encode("config_ack", {"id": DEV, "cfgver": 1, "code": devicemsg.OK}), qos=1
        )
        await eventually(lambda: g.registry.device(DEV)["config"]["state"] == "applied")  # type: ignore[index]
        # a change while everyone is connected
        g.registry.set_desired_config(DEV, interval=30)
        payload, _ = await dev.recv("cfg")
        assert devicemsg.decode("config", payload)["cfgver"] == 2
        dev.publish(
            "cfgack",
            devicemsg.encode("config_ack", {"id": DEV, "cfgver": 2, "code": 400, "msg": "no"}),
            qos=1,
        )
        await eventually(lambda: g.registry.device(DEV)["config"]["ack_code"] == 400)  # type: ignore[index]
        assert g.registry.device(DEV)["config"]["state"] == "rejected"  # type: ignore[index]
        # clearing publishes an empty retained message
        g.registry.clear_desired_config(DEV)
        payload, _ = await dev.recv("cfg")
        assert payload == b""
    finally:
        dev.disconnect()
        await g.stop()


async def test_broker_restart(tmp_path: Path, mosquitto: Broker) -> None:
    g = await Gateway(tmp_path, mosquitto.url).start()
    g.registry.set_desired_config(DEV, interval=60)
    dev = Device(mosquitto.url, DEV)
    try:
        await dev.connect()
        assert devicemsg.decode("config", (await dev.recv("cfg"))[0])["cfgver"] == 1
        dev.resolve(b"\x01", DEV)
        assert (await dev.recv_message("res", "res"))["token"] == b"\x01"
        mosquitto.restart()  # no persistence: subscriptions and retained messages are gone
        await eventually(lambda: g.fe._link.connects >= 2 and g.fe.ready and dev.connects >= 2, timeout=15)
        # the front end subscribed again and re-published the retained config
        payload, retained = await dev.recv("cfg")
        assert devicemsg.decode("config", payload)["cfgver"] == 1
        dev.resolve(b"\x02", DEV)
        assert (await dev.recv_message("res", "res"))["token"] == b"\x02"
        dev.report(boot=1, seq=1)
        assert devicemsg.decode("report_ack", (await dev.recv("ack"))[0])["code"] == devicemsg.OK
    finally:
        dev.disconnect()
        await g.stop()


async def test_shared_subscription_splits_requests(tmp_path: Path, mosquitto: Broker) -> None:
    a = await Gateway(tmp_path, mosquitto.url, "a", group="g1").start()
    b = await Gateway(tmp_path, mosquitto.url, "b", group="g1").start()
    dev = Device(mosquitto.url, DEV)
    try:
        await dev.connect()
        n = 40
        for i in range(n):
            dev.resolve(i.to_bytes(2, "big"), DEV)
        tokens = [(await dev.recv_message("res", "res", timeout=10))["token"] for _ in range(n)]
        assert sorted(tokens) == [i.to_bytes(2, "big") for i in range(n)]  # every request answered once
        # each request was answered by one gateway: by its resolver, or by its device link's table of answers
        taken = [g.resolver.calls + (g.fe.fast.answered if g.fe.fast else 0) for g in (a, b)]
        assert sum(taken) == n
        assert taken[0] > 0 and taken[1] > 0  # both members of the group took some
        for seq in range(1, 11):  # reports are split too, and each is stored by exactly one gateway
            dev.report(boot=1, seq=seq)
        acks = [devicemsg.decode("report_ack", (await dev.recv("ack"))[0])["seq"] for _ in range(10)]
        assert sorted(acks) == list(range(1, 11))
        assert a.registry.stats()["reports_total"] + b.registry.stats()["reports_total"] == 10
        await asyncio.sleep(0.2)
        assert dev.queue("res").empty() and dev.queue("ack").empty()  # no second answer arrived
    finally:
        dev.disconnect()
        await a.stop()
        await b.stop()


async def test_stop_answers_requests_in_flight(tmp_path: Path, mosquitto: Broker) -> None:
    g = await Gateway(tmp_path, mosquitto.url, delay=0.3).start()
    dev = Device(mosquitto.url, DEV)
    await dev.connect()
    try:
        dev.resolve(b"\x05", DEV)
        await asyncio.wait_for(g.resolver.started.wait(), 5)
        await g.stop()
        res = await dev.recv_message("res", "res")
        assert res["token"] == b"\x05" and res["code"] == devicemsg.OK
    finally:
        dev.disconnect()


async def test_too_many_in_flight_is_rate_limited(tmp_path: Path, mosquitto: Broker) -> None:
    g = Gateway(tmp_path, mosquitto.url, delay=0.5)
    g.fe.requests.max_inflight = 2
    await g.start()
    dev = Device(mosquitto.url, DEV)
    await dev.connect()
    try:
        for i in range(4):
            dev.resolve(bytes([i + 1]), DEV)
        codes = {}
        for _ in range(4):
            r = await dev.recv_message("res", "res")
            codes[r["token"]] = r["code"]
        assert sorted(codes.values()) == [
            devicemsg.OK,
            devicemsg.OK,
            devicemsg.RATE_LIMITED,
            devicemsg.RATE_LIMITED,
        ]
    finally:
        dev.disconnect()
        await g.stop()


async def test_starts_while_the_broker_is_down(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "late-broker")
    reg = Registry(tmp_path / "gw.db")
    fe = MqttFrontEnd(broker.url, FakeResolver(), reg, ready_timeout=0.1, reconnect_max=1)
    await fe.start()  # returns although nothing listens yet; paho keeps trying
    assert not fe.ready
    broker.start()
    dev = Device(broker.url, DEV)
    try:
        assert await fe.wait_ready(10)
        await dev.connect()
        dev.resolve(b"\x01", DEV)
        assert (await dev.recv_message("res", "res"))["code"] == devicemsg.OK
    finally:
        dev.disconnect()
        await fe.stop()
        reg.close()
        broker.stop()
