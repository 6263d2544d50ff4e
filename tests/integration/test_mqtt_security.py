"""MQTT security against a real Mosquitto configured by ``ida broker config`` and the real micropython device client:
TLS with CA verification, per-device credentials derived from the keystore, the generated ACL confining each device
to its own subtree, the gateway's own TLS credentials, the plain bench listener flagged INSECURE, the TLS cost."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import config as gwconfig
from gateway.service import Gateway
from proto import devicemsg
from tests.support.brokers import mosquitto_binary
from tests.support.gwhelpers import PUMP, FakeResolver
from tests.support.mp import mp_env, run_mp
from tests.support.mpcollect import ROOT
from tests.support.secure_broker import GATEWAY, Client, SecureBroker
from tools.commands import broker as bc
from tools.commands.flash.keystore import Keystore
from tools.support.procs import micropython_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

A = PUMP  # "88.123.99/PUMP-0001", known to the FakeResolver
B = "88.123.99/PUMP-0002"
KEY_A = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY_B = bytes.fromhex("ffeeddccbbaa99887766554433221100")
DRIVER = ROOT / "tests" / "device" / "mqtt_tls_device.py"


def keystore(data: Path, keys: dict[str, bytes]) -> Keystore:
    ks = Keystore.in_dir(data)
    for ident, key in keys.items():
        ks.put(ident, key)
    return ks


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    keystore(tmp_path / "data", {A: KEY_A, B: KEY_B})
    b = SecureBroker(tmp_path / "broker", tmp_path / "data", plain=True)
    b.start()
    yield b
    b.stop()


def device(
    broker: SecureBroker,
    ident: str,
    key: bytes,
    *actions: str,
    url: str | None = None,
    ca: Path | None = None,
    timeout: float = 60,
) -> list[dict[str, Any]]:
    """Run the micropython device driver; its JSON lines."""
    doc = {"id": ident, "key": key.hex(), "transport": "mqtt", "mqtt": url or broker.url}
    proc = subprocess.run(
        [
            micropython_binary(),
            "-X",
            "heapsize=1M",
            str(DRIVER),
            json.dumps(doc),
            str(ca or broker.ca),
            *actions,
        ],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=mp_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    results = [json.loads(line) for line in lines if line.startswith("{")]
    for r in results:
        r["_log"] = [line for line in lines if not line.startswith("{")]
    return results


def gateway_config(tmp_path: Path, broker: SecureBroker, *, plain: bool = False, **limits: Any) -> Any:
    secret = bc.gateway_secret(broker.out, GATEWAY)
    mqtt = {"username": GATEWAY, "password_file": str(secret), "group": "ida-gw"}
    if plain:
        mqtt["url"] = f"mqtt://127.0.0.1:{broker.plain_port}"
    else:
        mqtt.update(url=broker.gateway_url, ca_file=str(broker.ca))
    doc = {
        "coap": {"port": 0},
        "http": {"port": 0},
        "mqtt": mqtt,
        "data": {"dir": str(tmp_path / "gw")},
        "cache": {"persist": False},
        "limits": limits,
    }
    return gwconfig.from_mapping(doc, env={})


# -- the generator ----------------------------------------------------------------------------------------
def test_generated_files(tmp_path: Path) -> None:
    colon = "88.123.99/URN:X"
    keystore(tmp_path / "data", {A: KEY_A, B: KEY_B, colon: bytes(16)})
    tls = bc.make_certs(tmp_path / "tls", ["broker.example", "127.0.0.1"])
    out = tmp_path / "out"
    res = bc.generate(
        tmp_path / "data",
        out,
        tls=tls,
        plain_port=1883,
        gateways=("gw-1", "gw-2"),
        outbox_topics=("ida/v1/north/{key}/report",),
    )
    assert res.devices == 2 and res.skipped == [(colon, "contains ':' (the password file's separator)")]
    for name in (bc.PASSWD_DEVICES, bc.PASSWD_GATEWAYS, bc.PASSWD_ALL, "gateway-gw-1.secret", "ca.key"):
        path = out / name if name != "ca.key" else tmp_path / "tls" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    users = dict(line.split(":", 1) for line in (out / bc.PASSWD_DEVICES).read_text().splitlines())
    assert set(users) == {devicemsg.topic_key(A), devicemsg.topic_key(B)}
    assert bc.check_hash(bc.mqtt_password(KEY_A), users[devicemsg.topic_key(A)])
    assert not bc.check_hash(KEY_A.hex(), users[devicemsg.topic_key(A)])  # the raw key is not the password
    acl = (out / bc.ACL_FILE).read_text()
    ka = devicemsg.topic_key(A)
    for leaf in ("status", "req", "rpt", "cfgack"):
        assert f"topic write ida/v1/d/{ka}/{leaf}\n" in acl
    for leaf in ("res", "ack", "cfg"):
        assert f"topic read ida/v1/d/{ka}/{leaf}\n" in acl
    assert "user gw-2\n" in acl and "topic write ida/v1/north/+/report\n" in acl
    assert "topic read ida/v1/d/+/rpt\n" in acl and "topic write ida/v1/d/+/cfg\n" in acl
    conf = (out / bc.CONF_FILE).read_text()
    assert "per_listener_settings true" in conf and "use_username_as_clientid true" in conf
    assert "INSECURE plain mode" in conf and "listener 1883 127.0.0.1" in conf
    toml = (out / "gateway-gw-1.toml").read_text()
    assert 'url = "mqtts://localhost:8884"' in toml and "password_file" in toml
    # nothing generated holds a key or a device password in clear
    secrets = [KEY_A.hex(), KEY_B.hex(), bc.mqtt_password(KEY_A), bc.mqtt_password(KEY_B)]
    for path in out.iterdir():
        text = path.read_text()
        assert not [s for s in secrets if s in text.lower()], path
    # a second run keeps the gateway passwords (gateways keep working) and re-hashes with new salts
    pw = bc.gateway_secret(out, "gw-1").read_text()
    bc.generate(tmp_path / "data", out, tls=tls, gateways=("gw-1",))
    assert bc.gateway_secret(out, "gw-1").read_text() == pw
    # a certificate from another CA is refused before any broker sees it
    other = bc.make_certs(tmp_path / "other", ["x"])
    with pytest.raises(bc.BrokerConfigError, match="not issued by"):
        bc.generate(tmp_path / "data", out, tls=bc.TlsFiles(other.cert, other.key, tls.ca))
    with pytest.raises(bc.BrokerConfigError, match="--plain-port"):
        bc.generate(tmp_path / "data", out, tls=None)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools import cli

    keystore(tmp_path / "data", {A: KEY_A})
    assert cli.main(["broker", "certs", "--out", str(tmp_path / "tls"), "--host", "localhost"]) == 0
    t = tmp_path / "tls"
    assert (
        cli.main(
            [
                "broker",
                "config",
                "--data-dir",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "o"),
                "--tls-cert",
                str(t / "server.crt"),
                "--tls-key",
                str(t / "server.key"),
                "--ca",
                str(t / "ca.crt"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "1 devices" in printed and KEY_A.hex() not in printed and bc.mqtt_password(KEY_A) not in printed
    assert cli.main(["broker", "config", "--out", str(tmp_path / "o"), "--ca", "x"]) == 2


def test_firmware_derives_the_same_password() -> None:
    code = f"from carrier import mqtt\nprint(mqtt.password(bytes.fromhex('{KEY_B.hex()}')).decode())"
    assert run_mp(code).strip() == bc.mqtt_password(KEY_B)


# -- device and gateway over TLS ---------------------------------------------------------------------------
async def test_device_over_tls_resolves_and_reports(tmp_path: Path, broker: SecureBroker) -> None:
    gw = Gateway(gateway_config(tmp_path, broker), resolver=FakeResolver())
    await gw.start()
    try:
        assert gw.mqtt is not None and gw.mqtt.ready, broker.log_tail()
        got = await asyncio.to_thread(device, broker, A, KEY_A, "up", "resolve", "report", f"report={B}")
        up, resolved, report, forged = got
        assert up["ok"], up
        assert (
            resolved["code"] == devicemsg.OK and resolved["values"][0][2] == "https://example.com/pumps/0001"
        )
        assert report["code"] == devicemsg.OK
        assert forged["code"] == devicemsg.FORBIDDEN  # its own topic, but a payload naming another device
        assert gw.registry is not None
        assert gw.registry.device(A)["transport"] == "mqtt"  # type: ignore[index]
        assert gw.registry.device(B) is None
        assert not any("INSECURE" in line for line in up["_log"])
    finally:
        await gw.stop()


def test_wrong_credentials_and_wrong_ca_are_refused(tmp_path: Path, broker: SecureBroker) -> None:
    (wrong_key,) = device(broker, A, KEY_B, "up")
    assert not wrong_key["ok"] and wrong_key["refused"] == 5, wrong_key  # CONNACK 5: not authorized
    other = bc.make_certs(tmp_path / "other-ca", ["127.0.0.1"])
    (wrong_ca,) = device(broker, A, KEY_A, "up", ca=other.ca)
    assert not wrong_ca["ok"] and wrong_ca["reason"].startswith("tls"), wrong_ca
    (no_ca,) = device(broker, A, KEY_A, "up", ca=tmp_path / "missing.crt")
    assert not no_ca["ok"] and "no CA file" in no_ca["reason"], no_ca
    paho = Client(broker.port, devicemsg.topic_key(A), "0" * 32, ca=broker.ca)
    assert str(paho.wait()) == "Not authorized"
    paho.close()
    anonymous = Client(broker.port, None, None, ca=broker.ca)
    assert anonymous.wait().is_failure
    anonymous.close()
    gateway_as_device = Client(broker.port, GATEWAY, broker.gateway_password(), ca=broker.ca)
    assert str(gateway_as_device.wait()) == "Not authorized"  # gateway users only on the gateway listener
    gateway_as_device.close()


def test_micropython_device_cannot_reach_another_devices_topics(broker: SecureBroker) -> None:
    ka, kb = devicemsg.topic_key(A), devicemsg.topic_key(B)
    observer = Client(
        broker.service_port,
        GATEWAY,
        broker.gateway_password(),
        ca=broker.ca,
        v5=True,
        topics=tuple(f"ida/v1/d/+/{leaf}" for leaf in ("req", "rpt", "cfgack", "status")),
    )
    assert not observer.wait().is_failure
    b = Client(broker.port, kb, bc.mqtt_password(KEY_B), ca=broker.ca, topics=(f"ida/v1/d/{kb}/res",))
    assert not b.wait().is_failure and b.connected.wait(5)
    observer.drain(0.3)
    actions = [f"pub=ida/v1/d/{kb}/{leaf}" for leaf in ("rpt", "req", "status")]
    actions += [f"sub=ida/v1/d/{kb}/res", f"sub=ida/v1/d/{kb}/ack", "sub=ida/v1/d/+/res", "wait=200"]
    threading.Timer(1.5, lambda: observer.publish(f"ida/v1/d/{kb}/res", b"for B only")).start()
    results = device(broker, A, KEY_A, "up", *actions, "wait=2500", f"pub=ida/v1/d/{ka}/rpt")
    assert results[0]["ok"]
    assert all(r["acked"] for r in results if r["a"] == "pub")  # MQTT 3.1.1: PUBACKed, then dropped
    assert results[-2]["got"] == [], results[-2]  # nothing of B's reached A
    assert b.get()[1] == b"for B only"
    seen = observer.drain(1.0)
    assert [t for t, _ in seen if t.startswith(f"ida/v1/d/{kb}/")] == []  # no spoof arrived anywhere
    assert (f"ida/v1/d/{ka}/rpt", b"spoof") in seen  # its own subtree works
    observer.close()
    b.close()


@pytest.mark.parametrize("acl_mode", ["explicit", "pattern"])
def test_acl_confines_devices_and_client_ids(tmp_path: Path, acl_mode: str) -> None:
    keystore(tmp_path / "data", {A: KEY_A, B: KEY_B})
    ka, kb = devicemsg.topic_key(A), devicemsg.topic_key(B)
    with SecureBroker(tmp_path / "broker", tmp_path / "data", acl_mode=acl_mode) as broker:
        observer = Client(
            broker.service_port,
            GATEWAY,
            broker.gateway_password(),
            ca=broker.ca,
            v5=True,
            topics=("ida/v1/d/+/rpt", "$share/g/ida/v1/d/+/req"),
        )
        b = Client(
            broker.port,
            kb,
            bc.mqtt_password(KEY_B),
            ca=broker.ca,
            client_id="b",
            topics=(f"ida/v1/d/{kb}/ack",),
        )
        # A claims B's topic key as client id: the broker uses A's username instead, B stays connected
        a = Client(
            broker.port,
            ka,
            bc.mqtt_password(KEY_A),
            ca=broker.ca,
            client_id=kb,
            topics=(f"ida/v1/d/{kb}/ack", "ida/v1/d/#"),
        )
        for c in (observer, b, a):
            assert not c.wait().is_failure and c.connected.wait(5)
        time.sleep(0.3)
        a.publish(f"ida/v1/d/{kb}/rpt", b"spoofed report")
        a.publish(f"ida/v1/d/{kb}/req", b"spoofed request")
        a.publish(f"ida/v1/d/{ka}/ack", b"own ack")  # devices do not write their res/ack/cfg either
        a.publish(f"ida/v1/d/{ka}/rpt", b"own report")
        a.publish(f"ida/v1/d/{ka}/req", b"own request")
        observer.publish(f"ida/v1/d/{kb}/ack", b"ack for B")
        assert b.get()[1] == b"ack for B"
        assert a.drain(0.5) == []
        seen = observer.drain(0.5)
        assert sorted(seen) == [(f"ida/v1/d/{ka}/req", b"own request"), (f"ida/v1/d/{ka}/rpt", b"own report")]
        assert b.connected.is_set() and b.drain(0.1) == []
        for c in (observer, b, a):
            c.close()


async def test_plain_bench_listener_is_flagged(
    tmp_path: Path, broker: SecureBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gw = Gateway(gateway_config(tmp_path, broker, plain=True), resolver=FakeResolver())
    await gw.start()
    try:
        assert gw.mqtt is not None and gw.mqtt.ready
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("INSECURE plain mode" in m and "password" in m for m in warnings), warnings
        url = f"mqtt://127.0.0.1:{broker.plain_port}"
        up, report = await asyncio.to_thread(device, broker, A, KEY_A, "up", "report", url=url)
        assert up["ok"] and report["code"] == devicemsg.OK
        assert any("INSECURE plain mode" in line for line in up["_log"]), up["_log"]
    finally:
        await gw.stop()


async def test_gateway_with_a_wrong_password_is_not_ready(
    tmp_path: Path, broker: SecureBroker, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.broker import MqttAuth
    from gateway.frontends.mqtt import MqttFrontEnd
    from gateway.registry import Registry

    reg = Registry(tmp_path / "gw.db")
    fe = MqttFrontEnd(
        broker.gateway_url,
        FakeResolver(),
        reg,
        ready_timeout=1.0,
        reconnect_max=1,
        auth=MqttAuth(GATEWAY, "wrong-password", str(broker.ca)),
    )
    try:
        await fe.start()
        assert not fe.ready
        assert any("connect refused" in r.getMessage() for r in caplog.records)
        assert "wrong-password" not in caplog.text
    finally:
        await fe.stop()
        reg.close()


# -- what TLS costs ----------------------------------------------------------------------------------------
class Relay:
    """A TCP relay that counts the bytes each way (device -> broker, broker -> device)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.up = self.down = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            far = socket.create_connection(("127.0.0.1", self.target))
            far.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(conn, far, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(far, conn, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if up:
                self.up += len(data)
            else:
                self.down += len(data)
            dst.sendall(data)

    def close(self) -> None:
        self.srv.close()


def test_tls_cost(broker: SecureBroker) -> None:
    """Connect time, bytes on the wire and device heap, plain vs TLS, same broker, same device (best of 2)."""
    figures: dict[str, dict[str, int]] = {}
    rpt = f"pub=ida/v1/d/{devicemsg.topic_key(A)}/rpt"
    for mode, port in (("plain", broker.plain_port), ("tls", broker.port)):
        assert port is not None
        relay = Relay(port)
        url = f"{'mqtts' if mode == 'tls' else 'mqtt'}://127.0.0.1:{relay.port}"
        sessions: dict[int, list[int]] = {1: [], 2: []}
        ups = []
        for _ in range(2):
            for n in (1, 2):
                relay.up = relay.down = 0
                got = device(broker, A, KEY_A, "up", *([rpt] if n == 2 else []), url=url)
                assert got[0]["ok"] and (n == 1 or got[1]["acked"]), (mode, got)
                time.sleep(0.05)  # the relay counts the last bytes
                sessions[n].append(relay.up + relay.down)
                ups.append(got[0])
        relay.close()
        figures[mode] = {
            "connect_ms": min(u["ms"] for u in ups),
            "heap": min(u["heap"] for u in ups),
            "peak": max(u["peak"] for u in ups),
            "session": min(sessions[1]),
            "report": min(sessions[2]) - min(sessions[1]),
        }
    t, p = figures["tls"], figures["plain"]
    print(
        f"\nMQTT TLS cost (unix port, loopback): connect to CONNACK {p['connect_ms']} -> {t['connect_ms']} ms; "
        f"bytes of a session (connect, online status, subscribe, offline status, disconnect) {p['session']} -> "
        f"{t['session']}; one QoS 1 report of 5 B + PUBACK {p['report']} -> {t['report']} B; device heap after "
        f"connect {p['heap']} -> {t['heap']} B, sampled peak while connecting {p['peak']} -> {t['peak']} B"
    )
    assert t["session"] > p["session"] and t["report"] > p["report"] and t["heap"] > p["heap"]
