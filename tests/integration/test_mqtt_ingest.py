"""MQTT report ingest with real processes (docs/reliability.md): ``ida gateway`` SIGKILLed while a saturating fleet
reports through a real Mosquitto; after the restart every report it acknowledged is in its registry, once.

The fleet is the benchmark's (tools/harness/bench/mqttreports.py): devices with one report in flight each, sending
a report again when its ack does not come, as the firmware does. The gateway is tests/support/faultkit.py's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.integration.test_faults import figures, gw_config
from tests.support.brokers import Broker
from tests.support.faultkit import GatewayProc, integrity, until
from tools.harness.bench.ingest_mqtt import stored_keys
from tools.harness.bench.mqttreports import ReportLoad, ReportLoadSpec

pytestmark = pytest.mark.slow

NO_UPSTREAM = "hdl://127.0.0.1:9"  # nothing is resolved here


async def test_kill9_under_saturation_keeps_every_acknowledged_report(
    tmp_path: Path, mosquitto: Broker
) -> None:
    gw = GatewayProc(tmp_path / "gw", gw_config([NO_UPSTREAM], mqtt=mosquitto.url))
    spec = ReportLoadSpec(
        mosquitto.host, mosquitto.port, devices=300, connections=30, duration=9.0, timeout=1.0
    )
    load = ReportLoad(spec)
    try:
        await asyncio.to_thread(gw.start)
        run = asyncio.create_task(load.run())
        await until(lambda: len(load.acked) >= 4000, 30, "reports acknowledged before the kill")
        gw.kill9()
        t_kill = time.monotonic()
        at_kill = len(load.acked)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(gw.start)
        restart = time.monotonic() - t_kill
        await until(lambda: len(load.acked) >= at_kill + 4000, 30, "reports acknowledged after the restart")
        result = await asyncio.wait_for(run, 60)
        assert gw.terminate() == 0
        held = stored_keys(gw.registry)
        lost = [key for key in load.acked if key not in held]
        assert not lost, f"{len(lost)} acknowledged reports not in the registry, e.g. {lost[:3]}"
        assert all(n == 1 for n in held.values()), "a report stored twice"
        assert integrity(gw.registry) == "ok"
        figures(
            "kill9_mqtt_ingest",
            devices=spec.devices,
            acked=len(load.acked),
            acked_before_kill=at_kill,
            stored=len(held),
            resent=result.retransmits,
            restart_s=round(restart, 2),
        )
    finally:
        gw.kill9()
