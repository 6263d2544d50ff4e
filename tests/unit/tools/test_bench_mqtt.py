"""P2's MQTT pieces against a real Mosquitto: the load generator (tools/harness/bench/mqttload.py) and the bare
responder (tools/harness/bench/servers.py), both on proto/mqtt; numbers are never asserted, only that every request
is answered and matched by its token."""

from __future__ import annotations

import asyncio

import cbor2

from proto import mqtt
from tests.support.brokers import Broker
from tools.harness.bench.mqttload import MqttLoadGenerator, MqttLoadSpec, mqtt_request, request_template
from tools.harness.bench.servers import MqttResponder

ROOT = "bench/v1/d"
IDENT = "88.123.99/PUMP-0001"
ANSWER = {1: b"\xfe\xed\xfa\xce", 2: IDENT, 3: 1, 4: [[1, "URL", "https://example.org/"]], 5: 60}


async def _responder(broker: Broker) -> tuple[asyncio.Transport, MqttResponder]:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    pre, post = cbor2.dumps(ANSWER).split(b"\xfe\xed\xfa\xce")
    transport, responder = await loop.create_connection(
        lambda: MqttResponder(ROOT, pre, post, ready), broker.host, broker.port
    )
    await asyncio.wait_for(ready, 10)
    return transport, responder


def test_request_template_puts_the_token_first() -> None:
    pre, post = request_template(IDENT)
    token = b"\x01\x02\x03\x04"
    assert cbor2.loads(pre + token + post) == {1: token, 2: IDENT}
    assert pre == b"\xa2\x01\x44"  # what the gateway's table and the responder look for


async def test_one_request_through_the_broker(mosquitto: Broker) -> None:
    transport, responder = await _responder(mosquitto)
    try:
        answer = cbor2.loads(await mqtt_request(mosquitto.host, mosquitto.port, IDENT, ROOT, timeout=5))
        assert {k: v for k, v in answer.items() if k != 1} == {k: v for k, v in ANSWER.items() if k != 1}
        assert len(answer[1]) == 4 and responder.answered == 1
    finally:
        transport.write(mqtt.DISCONNECT_BYTES)
        transport.close()


async def test_load_generator_against_the_bare_responder(mosquitto: Broker) -> None:
    transport, responder = await _responder(mosquitto)
    try:
        spec = MqttLoadSpec(
            mosquitto.host, mosquitto.port, ROOT, ident=IDENT, connections=2, concurrency=6, duration=0.5
        )
        result = await MqttLoadGenerator(spec).run()
    finally:
        transport.write(mqtt.DISCONNECT_BYTES)
        transport.close()
    assert result.ok > 0 and result.errors == 0 and result.timeouts == 0 and result.unmatched == 0
    assert result.endpoints == 2 and result.sent >= result.ok and responder.answered >= result.ok
    assert len(result.latencies_ns) == result.ok
