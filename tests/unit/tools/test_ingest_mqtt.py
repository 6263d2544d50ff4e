"""P6's MQTT pieces: the report fleet (tools/harness/bench/mqttreports.py) against the bare ``mqtt-ack`` anchor
(tools/harness/bench/servers.py) through a real Mosquitto, and ``measure_mqtt_ingest`` briefly against a real
``ida gateway``; numbers are never asserted, only that every acknowledged report is matched, stored and stored
once."""

from __future__ import annotations

import asyncio

import cbor2

from proto import devicemsg, mqtt
from tests.support.brokers import Broker
from tools.harness.bench.ingest_mqtt import measure_mqtt_ingest
from tools.harness.bench.mqttreports import ReportLoad, ReportLoadSpec, device_ident, report_template
from tools.harness.bench.scenario import BenchOptions
from tools.harness.bench.servers import MqttAckResponder

ROOT = "bench/v1/d"


def test_report_template_is_a_report_with_the_seq_put_in() -> None:
    ident = device_ident("ab12", 7)
    pre, post = report_template(ident, boot=3)
    report = devicemsg.decode_report(pre + cbor2.dumps(1234) + post)
    assert (report.id, report.boot, report.seq) == (ident, 3, 1234)
    assert report.fields["sensors"] == {"temp": 21.5, "rpm": 1480, "ok": True}


async def test_the_fleet_against_the_bare_acker(mosquitto: Broker) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    transport, acker = await loop.create_connection(
        lambda: MqttAckResponder(ROOT, ready), mosquitto.host, mosquitto.port
    )
    try:
        await asyncio.wait_for(ready, 10)
        spec = ReportLoadSpec(mosquitto.host, mosquitto.port, ROOT, devices=12, connections=3, duration=0.5)
        load = ReportLoad(spec)
        result = await load.run()
    finally:
        transport.write(mqtt.DISCONNECT_BYTES)
        transport.close()
    assert result.ok > 0 and result.errors == 0 and result.timeouts == 0 and result.unmatched == 0
    assert result.endpoints == 3 and len(result.latencies_ns) == result.ok
    assert (
        len(load.acked) == sum(d.seq for d in load.devices) <= acker.answered
    )  # every report acked, in order
    assert {ident for ident, _, _ in load.acked} == {d.ident for d in load.devices}


def test_measure_mqtt_ingest_briefly() -> None:
    opts = BenchOptions(quick=True, duration=0.5, warmup=0.2, rounds=1)
    fig = measure_mqtt_ingest(opts, devices=60, connections=6).as_dict()
    assert fig["lost"] == 0 and fig["duplicates"] == 0
    assert isinstance(fig["acked"], int) and fig["acked"] > 0
    assert isinstance(fig["mqtt_reports_per_s"], int) and fig["mqtt_reports_per_s"] > 0
    assert isinstance(fig["mqtt_raw_reports_per_s"], int) and fig["mqtt_raw_reports_per_s"] > 0
    assert fig["errors"] == 0 and fig["devices"] == 60 and fig["connections"] == 6
    assert {"p99_ms", "cpu_us_per_report", "broker_cpu", "ratio_mqtt_raw"} <= fig.keys()
