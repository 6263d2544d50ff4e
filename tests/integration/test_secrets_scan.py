"""No secret leaves its place: after a whole session -- provisioning a chip (``flash_device`` on a simulated chip),
``ida broker config``, a real Mosquitto with TLS, the gateway with its own broker credentials, the real firmware on
the unix port talking MQTT over TLS and driven through its console -- the device key (hex, either case), the MQTT
password derived from it, the gateway's broker password and the Wi-Fi passphrase appear in none of: the gateway's
log (DEBUG), the broker's log, /metrics and the devices API, the device's console transcript (its stdout, log ring
included), ``ida flash ledger export`` (with history), ``ida broker config`` output, ``ida gateway --print-config``."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

import aiohttp
import pytest

from gateway import config as gwconfig
from gateway.service import Gateway
from tests.support.brokers import mosquitto_binary
from tests.support.flashutil import firmware_tree, standin_runtime
from tests.support.fwdevice import DeviceProc
from tests.support.secure_broker import GATEWAY, SecureBroker
from tools import cli
from tools.commands import broker as bc
from tools.commands.flash import builder as fb
from tools.commands.flash import image as im
from tools.commands.flash.identity import IDENTITY_PATH
from tools.commands.flash.keystore import Keystore
from tools.commands.flash.ledger import Ledger, pattern_identifiers
from tools.commands.flash.programmer import SimulatedChip
from tools.commands.flash.provision import IdentityTemplate, Station, flash_device

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

BOARD = "esp32-devkitc"
WIFI_PSK = "plant-wifi-passphrase-7781"


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    low = text.lower()
    return [name for name, value in secrets.items() if value.lower() in low]


async def test_no_secret_in_logs_metrics_transcript_or_exports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "station"
    with Ledger.in_dir(data) as led:
        led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, 5), "pumps")
    broker = SecureBroker(tmp_path / "broker", data)  # ports fixed now, started after provisioning

    # 1. provisioning: build once, flash a blank simulated chip, register it in the zone
    fw, _ = firmware_tree(tmp_path)
    runtime, _ = standin_runtime(BOARD, tmp_path)
    fb.build(BOARD, tmp_path / "build", runtime=runtime, firmware_dir=fw)
    built = fb.load_build(tmp_path / "build", BOARD)
    chip = SimulatedChip()
    template = IdentityTemplate((f"mqtt://127.0.0.1:{broker.port}",), "mqtt", wifi=("plant", WIFI_PSK))
    result = flash_device(chip, built, Station(data, operator="alice", station="line-1"), template)
    ident = result.identifier
    key = Keystore.in_dir(data).get(ident)
    assert key is not None
    outputs: dict[str, str] = {}

    # 2. the broker's files, then the broker
    assert (
        cli.main(
            [
                "broker",
                "config",
                "--data-dir",
                str(data),
                "--out",
                str(tmp_path / "gen"),
                "--tls-cert",
                str(broker.tls.cert),
                "--tls-key",
                str(broker.tls.key),
                "--ca",
                str(broker.ca),
            ]
        )
        == 0
    )
    broker.start()
    secrets = {
        "key": key.hex(),
        "mqtt password": bc.mqtt_password(key),
        "wifi psk": WIFI_PSK,
        "gateway password": broker.gateway_password(),
    }

    # 3. the gateway, from a TOML file like an operator's
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        f'[coap]\nport = 0\n[http]\nport = 0\n[mqtt]\nurl = "{broker.gateway_url}"\nusername = "{GATEWAY}"\n'
        f'password_file = "{bc.gateway_secret(broker.out, GATEWAY)}"\nca_file = "{broker.ca}"\n'
        f'[data]\ndir = "{tmp_path / "gw"}"\n[zone]\nfile = "{data / "zone.json"}"\n[log]\nlevel = "debug"\n'
    )
    assert cli.main(["gateway", "--config", str(toml), "--print-config"]) == 0
    gw = Gateway(gwconfig.load(toml, env={}))
    await gw.start()
    dev = None
    try:
        assert gw.mqtt is not None and gw.mqtt.ready, broker.log_tail()
        # 4. the device: the chip's filesystem, pointed at the TLS listener with the site CA
        fs = im.read_files(built.params, _vfs(chip, built))
        doc = json.loads(fs[IDENTITY_PATH])
        doc["mqtt"] = broker.url
        devdir = tmp_path / "device"
        devdir.mkdir()
        (devdir / "identity.json").write_text(json.dumps(doc))
        shutil.copy(broker.ca, devdir / "ca.crt")
        dev = DeviceProc(devdir).start()
        dev.expect(r"mqtt started", 20)
        for command in ("help", "id", "status", "net", "config get", "report", "resolve " + ident, "log 40"):
            dev.send(command)
        assert gw.registry is not None
        registry = gw.registry
        await _until(lambda: bool(registry.recent_reports(ident)), 20, dev)
        dev.send("status")
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as s:
            assert gw.addresses.http is not None
            base = f"http://127.0.0.1:{gw.addresses.http[1]}"
            for path in ("/metrics", "/api/devices", f"/api/devices/{ident}", "/healthz"):
                async with s.get(base + path) as r:
                    outputs[f"http {path}"] = await r.text()
    finally:
        if dev is not None:
            dev.stop()
        await gw.stop()
        broker.stop()
    assert dev is not None
    outputs["device console transcript"] = "\n".join(dev.lines + dev.err)
    assert (
        ident in outputs["device console transcript"]
        and result.key_fingerprint in outputs["device console transcript"]
    )

    # 5. the exports
    csv = tmp_path / "ledger.csv"
    assert (
        cli.main(["flash", "--data-dir", str(data), "ledger", "export", "--out", str(csv), "--history"]) == 0
    )
    outputs["ledger export"] = csv.read_text()
    assert result.key_fingerprint in outputs["ledger export"]  # the fingerprint is there, the key is not
    outputs["process log (flashing, gateway), DEBUG"] = caplog.text
    outputs["broker log"] = broker.log_tail(10**7)
    outputs["cli output"] = "\n".join(capsys.readouterr())
    assert ident in caplog.text and "ida_ratelimited_total" in outputs["http /metrics"]
    found = {where: leaks(text, secrets) for where, text in outputs.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    # ... while the places where secrets belong do hold them (so the scan looked for the right strings)
    assert key.hex() in (data / "keystore.json").read_text()
    assert secrets["gateway password"] in bc.gateway_secret(broker.out, GATEWAY).read_text()


def _vfs(chip: SimulatedChip, built: fb.Build) -> bytes:
    off = built.manifest.fs_image["offset"]
    size = len((built.directory / built.manifest.fs_image["file"]).read_bytes())
    return bytes(chip.flash[off : off + size])


async def _until(cond, timeout: float, dev: DeviceProc) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("no report reached the gateway; device said:\n" + "\n".join(dev.lines[-40:]))
        await asyncio.sleep(0.1)
