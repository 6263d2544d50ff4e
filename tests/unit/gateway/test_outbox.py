"""gateway/outbox.py: webhook and MQTT sinks, back-off, and no report lost (or doubled, after de-duplication
by (id, boot, seq)) across restarts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker import parse_url
from gateway.outbox import Outbox, report_payload
from gateway.registry import Registry
from gateway.sinks import DEFAULT_TOPIC, MqttSink, WebhookSink, make_sink
from tests.support.brokers import Broker
from tests.support.gwhelpers import eventually

DEV = "88.123.99/PUMP-0001"


def fields(seq: int, boot: int = 1, ident: str = DEV) -> dict[str, Any]:
    return {
        "id": ident,
        "boot": boot,
        "seq": seq,
        "uptime": seq,
        "heap": 1,
        "rssi": 0,
        "queue": 0,
        "board": "unix",
        "fw": "0",
    }


def payload(seq: int, boot: int = 1, ident: str = DEV) -> dict[str, Any]:
    return report_payload(ident, fields(seq, boot, ident), 1_700_000_000.5, "mqtt")


class Consumer:
    """A northbound consumer that de-duplicates by (id, boot, seq), as the outbox's contract asks."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def take(self, p: dict[str, Any]) -> None:
        self.received.append(p)

    @property
    def unique(self) -> set[tuple[str, int, int]]:
        return {(p["id"], p["boot"], p["seq"]) for p in self.received}


class Webhook:
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls = 0
        self.consumer = Consumer()
        self.keys: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.calls <= self.fail_first:
            return web.Response(status=503, text="try later")
        self.consumer.take(await request.json())
        self.keys.append(request.headers.get("Idempotency-Key", ""))
        return web.Response(status=204)


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook(fail_first=2)
    app = web.Application()
    app.router.add_post("/reports", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook.url = f"http://127.0.0.1:{port}/reports"
    yield hook
    await runner.cleanup()


async def test_webhook_retries_with_backoff(tmp_path: Path, webhook: Webhook) -> None:
    ob = Outbox(tmp_path / "gw.db", [WebhookSink(webhook.url)], base_delay=0.01, max_delay=0.05)
    await ob.start()
    ob.enqueue(payload(1))
    await eventually(lambda: ob.depth() == 0)
    assert webhook.calls == 3  # two 503s, then delivered
    assert webhook.consumer.received == [payload(1)]
    assert webhook.keys == [f"{DEV}|1|1"]
    assert ob.stats()["delivered_total"] == 1 and ob.stats()["failed_total"] == 2
    await ob.stop()
    ob.close()


async def test_backoff_grows_and_is_capped(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "gw.db", [], base_delay=1.0, max_delay=8.0)
    delays = [ob.backoff(n) for n in range(1, 7)]
    for n, d in zip(range(1, 7), delays, strict=True):
        base = min(8.0, 2 ** (n - 1))
        assert base <= d <= base * 1.25
    ob.close()


async def test_failed_row_keeps_its_place_and_error(tmp_path: Path) -> None:
    sink = WebhookSink("http://127.0.0.1:9/nothing-listens", timeout=1.0)
    ob = Outbox(tmp_path / "gw.db", [sink], base_delay=60.0)
    ob.enqueue(payload(1))
    assert await ob.drain_once() == 1
    (row,) = ob.rows()
    assert (
        row["attempts"] == 1
        and row["next_attempt"] > row["created"] + 59
        and "nothing-listens" in row["last_error"]
    )
    assert await ob.drain_once() == 0  # not due yet
    await sink.close()
    ob.close()


async def test_mqtt_sink_waits_for_puback(tmp_path: Path, mosquitto: Broker) -> None:
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    consumer = paho.Client(CallbackAPIVersion.VERSION2, client_id="north-consumer", protocol=paho.MQTTv5)
    subscribed = asyncio.Event()

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        loop.call_soon_threadsafe(got.put_nowait, json.loads(m.payload))

    def on_subscribe(c: paho.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        loop.call_soon_threadsafe(subscribed.set)

    consumer.on_message = on_message
    consumer.on_subscribe = on_subscribe
    consumer.on_connect = lambda c, u, f, rc, p: c.subscribe(DEFAULT_TOPIC, qos=1)
    addr = parse_url(mosquitto.url)
    consumer.connect_async(addr.host, addr.port)
    consumer.loop_start()
    await asyncio.wait_for(subscribed.wait(), 5)

    sink = make_sink(mosquitto.url)
    assert isinstance(sink, MqttSink)
    ob = Outbox(tmp_path / "gw.db", [sink], base_delay=0.01)
    await ob.start()
    for seq in range(1, 21):
        ob.enqueue(payload(seq))
    received = [await asyncio.wait_for(got.get(), 5) for _ in range(20)]
    assert sorted(p["seq"] for p in received) == list(range(1, 21))
    await eventually(lambda: ob.depth() == 0)
    await ob.stop()
    ob.close()
    consumer.disconnect()
    consumer.loop_stop()


async def test_mqtt_sink_keeps_rows_without_subscriber(tmp_path: Path, mosquitto: Broker) -> None:
    sink = MqttSink(mosquitto.url, "ida/v1/north/{key}/report", timeout=5.0)
    ob = Outbox(tmp_path / "gw.db", [sink], base_delay=60.0)
    await sink.start()
    ob.enqueue(payload(1))
    assert await ob.drain_once() == 1
    (row,) = ob.rows()
    assert row["attempts"] == 1 and "no subscriber" in row["last_error"]
    await sink.close()
    ob.close()


class FlakySink:
    """Delivers to a consumer; from the ``hang_at``-th call on it hangs (the process is about to be killed)."""

    name = "flaky"

    def __init__(self, consumer: Consumer, hang_at: int | None = None) -> None:
        self.consumer = consumer
        self.hang_at = hang_at
        self.calls = 0
        self.hanging = asyncio.Event()

    async def start(self) -> None: ...

    async def deliver(self, p: dict[str, Any]) -> None:
        self.calls += 1
        if self.hang_at is not None and self.calls >= self.hang_at:
            self.hanging.set()
            await asyncio.Event().wait()
        self.consumer.take(p)

    async def close(self) -> None: ...


async def test_restart_delivers_every_row_once_after_dedupe(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    consumer = Consumer()
    # First life: reports accepted through the registry; the sink takes 10 of 40, then the process "dies"
    # in the middle of a batch (after the sink acknowledged some rows, before they were deleted).
    sink1 = FlakySink(consumer, hang_at=11)
    ob1 = Outbox(db, [sink1], batch=64)
    reg1 = Registry(db, ob1)
    for seq in range(1, 41):
        assert reg1.record_report(DEV, fields(seq), "mqtt")
    await ob1.start()
    await asyncio.wait_for(sink1.hanging.wait(), 5)
    await ob1.stop(timeout=0.05)  # cancels the hung batch: nothing of it was deleted
    reg1.close()
    ob1.close()
    assert len(consumer.received) == 10
    # Second life: the same rows are still there and all of them go out.
    sink2 = FlakySink(consumer)
    ob2 = Outbox(db, [sink2])
    assert ob2.depth() == 40
    reg2 = Registry(db, ob2)
    assert reg2.record_report(DEV, fields(5), "mqtt") is False  # still de-duplicated
    await ob2.start()
    await eventually(lambda: ob2.depth() == 0)
    await ob2.stop()
    assert len(consumer.received) == 50  # 10 delivered twice (at least once) ...
    assert consumer.unique == {(DEV, 1, s) for s in range(1, 41)}  # ... and after de-duplication each once
    reg2.close()
    ob2.close()


async def test_a_failing_sink_does_not_redeliver_to_the_other(tmp_path: Path, webhook: Webhook) -> None:
    good = Consumer()
    ob = Outbox(
        tmp_path / "gw.db", [FlakySink(good), WebhookSink(webhook.url)], base_delay=0.01, max_delay=0.02
    )
    await ob.start()
    ob.enqueue(payload(1))
    await eventually(lambda: ob.depth() == 0)
    await ob.stop()
    assert len(good.received) == 1  # the flaky-free sink got it once although the webhook needed 3 tries
    assert webhook.consumer.unique == {(DEV, 1, 1)}
    ob.close()


async def test_broker_down_then_up(tmp_path: Path, mosquitto: Broker) -> None:
    """The northbound broker restarts: rows wait and are delivered afterwards, none lost."""
    seen: set[int] = set()
    loop = asyncio.get_running_loop()
    consumer = paho.Client(CallbackAPIVersion.VERSION2, client_id="north-consumer", protocol=paho.MQTTv5)
    consumer.reconnect_delay_set(1, 1)

    def on_message(c: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        loop.call_soon_threadsafe(seen.add, json.loads(m.payload)["seq"])

    consumer.on_message = on_message
    consumer.on_connect = lambda c, u, f, rc, p: c.subscribe(DEFAULT_TOPIC, qos=1)
    addr = parse_url(mosquitto.url)
    consumer.connect_async(addr.host, addr.port)
    consumer.loop_start()
    sink = MqttSink(mosquitto.url, timeout=1.0, reconnect_max=1)
    ob = Outbox(tmp_path / "gw.db", [sink], base_delay=0.1, max_delay=0.5)
    await ob.start()
    ob.enqueue(payload(1))
    await eventually(lambda: seen == {1})
    mosquitto.stop()
    for seq in range(2, 6):
        ob.enqueue(payload(seq))
    await asyncio.sleep(0.3)
    assert ob.depth() == 4
    mosquitto.start()
    await eventually(lambda: seen == {1, 2, 3, 4, 5}, timeout=15)
    await eventually(lambda: ob.depth() == 0)
    await ob.stop()
    ob.close()
    consumer.disconnect()
    consumer.loop_stop()


def test_make_sink_rejects_unknown_schemes() -> None:
    with pytest.raises(ValueError):
        make_sink("ftp://example.com/x")
    assert isinstance(make_sink("https://example.com/hook"), WebhookSink)
