"""The gateway service in `[coap] security = "oscore"` mode with devices running the real firmware: a device
holding its provisioned key resolves and reports; a device with the wrong key, or sending plain CoAP, gets
nothing and stores nothing (issue 8's "a device without the right key cannot resolve, report")."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.zone import Zone
from proto import devicemsg
from tests.support.fwdevice import DeviceProc
from tools.commands.flash.keystore import Keystore
from tools.support.procs import ida_command

PUMP = "88.123.99/PUMP-0001"
GOOD = "88.123.99/OSC-GOOD-01"
BAD = "88.123.99/OSC-BAD-01"
PLAIN = "88.123.99/OSC-PLAIN-1"
KEY = bytes(range(16))


def _wait_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if pattern in line:
            return line
    raise AssertionError(f"gateway never logged {pattern!r}:\n{''.join(seen[-30:])}")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[dict[str, Any]]:
    data = tmp_path / "gw"
    data.mkdir()
    Keystore.in_dir(data).put(GOOD, KEY)
    Keystore.in_dir(data).put(BAD, KEY)
    Keystore.in_dir(data).put(PLAIN, KEY)
    Zone(path=data / "zone.json").add(
        {
            "handle": PUMP,
            "values": [
                {
                    "index": 1,
                    "type": "URL",
                    "data": {"format": "string", "value": "https://example.com/pump/0001"},
                    "ttl": 600,
                }
            ],
        }
    )
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f'[coap]\nhost = "127.0.0.1"\nport = 0\nsecurity = "oscore"\n'
        f'[http]\nhost = "127.0.0.1"\nport = 0\n[data]\ndir = "{data}"\n'
        f'[upstream]\nurls = ["hdl://127.0.0.1:9"]\n'
    )
    proc = subprocess.Popen(
        ida_command("gateway", "--config", str(conf)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        coap = _wait_line(proc, "coap listening on").rsplit(" ", 1)[1].strip()
        http = _wait_line(proc, "http listening on").rsplit(" ", 1)[1].strip()
        yield {"coap": coap, "http": http, "data": data}
    finally:
        proc.terminate()
        proc.wait(10)


def _device(tmp_path: Path, name: str, ident: str, coap: str, key: bytes, secure: bool) -> DeviceProc:
    d = tmp_path / name
    d.mkdir()
    doc: dict[str, Any] = {"id": ident, "key": key.hex(), "transport": "coap", "coap": f"coap://{coap}"}
    if secure:
        doc["secure"] = True
    (d / "identity.json").write_text(json.dumps(doc))
    dev = DeviceProc(d, env={"IDA_INTERVAL": "3600"}).start()
    dev.json_on()
    return dev


def _device_record(http: str, ident: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{http}/api/devices/{ident}", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        assert e.code == 404
        return None


def _resolve(dev: DeviceProc, ident: str) -> dict[str, Any]:
    dev.send(f"resolve {ident}")
    while True:
        m = dev.expect(r'^\{.*"cmd": "resolve"', 60)
        obj: dict[str, Any] = json.loads(m.string)
        if obj.get("id", ident) == ident and ("values" in obj or not obj.get("ok", True) or "code" in obj):
            return obj


def test_only_a_device_with_its_key_resolves_and_reports(gateway: dict[str, Any], tmp_path: Path) -> None:
    with urllib.request.urlopen(f"http://{gateway['http']}/healthz", timeout=5) as r:
        assert json.loads(r.read())["components"]["coap_security"] == "oscore"

    good = _device(tmp_path, "good", GOOD, gateway["coap"], KEY, secure=True)
    bad = _device(tmp_path, "bad", BAD, gateway["coap"], bytes(16), secure=True)
    plain = _device(tmp_path, "plain", PLAIN, gateway["coap"], KEY, secure=False)
    try:
        ok = _resolve(good, PUMP)
        assert ok.get("ok") and ok.get("code", devicemsg.OK) == devicemsg.OK, ok
        assert "https://example.com/pump/0001" in json.dumps(ok)
        for dev in (bad, plain):
            refused = _resolve(dev, PUMP)
            assert "example.com" not in json.dumps(refused), refused

        for dev in (good, bad, plain):
            dev.json("report")
        deadline = time.monotonic() + 30
        while _device_record(gateway["http"], GOOD) is None:
            assert time.monotonic() < deadline, "the authenticated device's report never arrived"
            time.sleep(0.3)
        time.sleep(2.0)  # the others had the same time to get through
        assert _device_record(gateway["http"], BAD) is None
        assert _device_record(gateway["http"], PLAIN) is None
        for dev in (bad, plain):  # refused, not lost: the report stays in the device's queue for a retry
            st = dev.json("status")
            assert st["last_ack"] == 401 and st["queue"] >= 1 and st["acked"] == 0, st
    finally:
        for dev in (good, bad, plain):
            dev.stop()
