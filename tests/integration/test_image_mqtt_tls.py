"""The image `ida flash build` makes for a stock runtime (main.py and the .mpy files on the filesystem, the broker's
CA as /ca.crt), booted by `ida device run --image` on the 32-bit MicroPython with -X heapsize=112000 (an ESP32's
heap after it grew once): the device connects to a real Mosquitto over TLS with its derived credentials, resolves
and reports through the gateway, as a chip flashed with that image and a stock runtime would."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.service import Gateway
from proto import devicemsg
from tests.integration.test_mqtt_security import KEY_A, A, gateway_config, keystore
from tests.support.brokers import mosquitto_binary
from tests.support.devicerun import IdaDevice
from tests.support.gwhelpers import FakeResolver
from tests.support.mp import mp32
from tests.support.secure_broker import SecureBroker
from tools.commands.flash import builder as fb

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
HEAP = 112000


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    keystore(tmp_path / "data", {A: KEY_A})
    b = SecureBroker(tmp_path / "broker", tmp_path / "data")
    b.start()
    yield b
    b.stop()


def _device_session(data: Path, build: Path, broker: SecureBroker) -> dict[str, Any]:
    args = ("--image", str(build), "--micropython", mp32(frozen=False), "--heap", str(HEAP))
    with IdaDevice(data, A, *args) as dev:
        dev.expect(r"^I net mqtt started", 60)
        dev.json_on()
        deadline = time.monotonic() + 60
        while True:  # "busy" while the boot-time resolve of its own identifier is in flight
            dev.send(f"resolve {A}")
            resolved = json.loads(dev.expect(r'^\{.*"cmd": "resolve"', 60).string)
            if "busy" not in str(resolved.get("error")) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if resolved.get("ok") and "values" not in resolved and "code" not in resolved:
            resolved = json.loads(dev.expect(r'^\{.*"cmd": "resolve".*"(values|code)"', 60).string)
        st = dev.wait_status(lambda s: s["acked"] >= 1, 60)
        return {"resolved": resolved, "status": st, "log": dev.lines + dev.err}


async def test_stock_image_on_the_32bit_interpreter_resolves_and_reports_over_tls(
    tmp_path: Path, broker: SecureBroker
) -> None:
    build = tmp_path / "build"
    m = fb.build("unix", build, runtime=mp32(frozen=False), ca=broker.ca)
    assert (
        m.frozen == () and "/main.py" in {f.path for f in m.files} and "/ca.crt" in {f.path for f in m.files}
    )
    data = tmp_path / "dev"
    data.mkdir()
    ident = {"id": A, "key": KEY_A.hex(), "transport": "mqtt", "mqtt": broker.url}
    (data / "identity.json").write_text(json.dumps(ident))  # as flashed: the key the broker knows

    gw = Gateway(gateway_config(tmp_path, broker), resolver=FakeResolver())
    await gw.start()
    try:
        assert gw.mqtt is not None and gw.mqtt.ready, broker.log_tail()
        got = await asyncio.to_thread(_device_session, data, build, broker)
        assert gw.registry is not None
        record = gw.registry.device(A)
    finally:
        await gw.stop()
    log = "\n".join(got["log"])
    assert got["resolved"].get("code", devicemsg.OK) == devicemsg.OK, got["resolved"]
    assert "https://example.com/pumps/0001" in json.dumps(got["resolved"]), got["resolved"]
    st = got["status"]
    assert st["transport"] == "mqtt" and st["acked"] >= 1 and st["boot"] == 1, st
    assert 0 < st["heap_used"] < HEAP
    assert record is not None and record["transport"] == "mqtt"
    assert "INSECURE" not in log and "main.py and .mpy on the filesystem" in log
    assert (data / "carrier").is_dir() and (data / "ca.crt").exists(), "the image's files, as on the chip"
    print(f"stock image, 32-bit, {HEAP} B heap, MQTT over TLS: heap_used {st['heap_used']} B after a report")
