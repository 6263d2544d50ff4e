"""`ida sim` (tools/harness/sim): the light simulator's CoAP client against a scripted UDP peer, its reporter logic against
a fake gateway (retries, rejections), then whole fleets against a real `ida gateway` process -- light mode with
200 devices over CoAP and over MQTT (real Mosquitto), firmware mode with 2 real micropython devices -- and the
command line stopping on Ctrl-C and at --duration without leaving a process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proto import devicemsg
from tests.support.brokers import Broker, mosquitto_binary
from tools.harness.bench.coapmsg import ACK, CON, RST, encode_message, parse_header, parse_options
from tools.harness.bench.project import GatewayProcess, NodeProcess
from tools.harness.sim import SimConfig, SimError, run_fleet, run_sim
from tools.harness.sim import coap as simcoap
from tools.harness.sim.mqtt import MqttConn
from tools.harness.sim.provision import provision
from tools.harness.sim.stats import Counters, Histogram
from tools.support.procs import free_port, ida_command

ROOT = Path(__file__).resolve().parents[3]


# -- units ---------------------------------------------------------------------------------------------------
def test_histogram_percentiles_within_bucket_width() -> None:
    h = Histogram()
    for i in range(1, 1001):
        h.add(i / 10)  # 0.1 .. 100 ms
    assert h.n == 1000 and h.max_ms == 100.0
    p50, p99 = h.percentile(50), h.percentile(99)
    assert p50 is not None and p99 is not None
    assert abs(p50 - 50.0) / 50.0 < 0.03 and abs(p99 - 99.0) / 99.0 < 0.03
    assert Histogram().percentile(50) is None


def test_config_identifiers_transports_and_checks(tmp_path: Path) -> None:
    cfg = SimConfig(devices=3, transport="mix", prefix="88.123.99", data_dir=tmp_path)
    assert [cfg.identifier(n) for n in range(3)] == [
        "88.123.99/SIM-00001",
        "88.123.99/SIM-00002",
        "88.123.99/SIM-00003",
    ]
    assert [cfg.transport_of(n) for n in range(3)] == ["coap", "mqtt", "coap"]
    assert (
        cfg.effective_mode == "firmware"
        and SimConfig(devices=11, data_dir=tmp_path).effective_mode == "light"
    )
    assert SimConfig(devices=100_000, first=5, data_dir=tmp_path).identifier(0) == "88.123.99/SIM-000005"
    for bad in (
        {"devices": 0},
        {"devices": 1, "transport": "x"},
        {"devices": 1, "gateway": "http://h"},
        {"devices": 1, "prefix": "a..b"},
        {"devices": 2, "mode": "firmware", "interval": 2.5},
        {"devices": 1, "transport": "mqtt", "broker": "mqtt://"},
    ):
        with pytest.raises(SimError):
            SimConfig(data_dir=tmp_path, **bad)  # type: ignore[arg-type]


def test_provision_keeps_the_key_and_rewrites_only_on_change(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    a = provision(d, "88.123.99/pump-0001", coap="coap://127.0.0.1:5683")
    doc = json.loads((d / "identity.json").read_text())
    assert doc == {
        "id": "88.123.99/pump-0001",
        "key": a.key.hex(),
        "transport": "coap",
        "coap": "coap://127.0.0.1:5683",
    }
    mtime = (d / "identity.json").stat().st_mtime_ns
    assert provision(d, "88.123.99/pump-0001", coap="coap://127.0.0.1:5683").key == a.key
    assert (d / "identity.json").stat().st_mtime_ns == mtime
    b = provision(d, "88.123.99/pump-0001", mqtt="mqtt://127.0.0.1:1884", transport="mqtt")
    assert b.key == a.key and json.loads((d / "identity.json").read_text())["mqtt"] == "mqtt://127.0.0.1:1884"
    with pytest.raises(SimError):
        provision(d, "no-separator", coap="coap://127.0.0.1:5683")


async def test_mqtt_client_against_mosquitto(mosquitto: Broker) -> None:
    """The simulator's client (packets from proto/mqtt): connect with a last will, subscribe in batches, publish
    QoS 0/1 and retained, take an incoming QoS 1 message, and a lost connection publishes the will."""
    loop = asyncio.get_running_loop()
    events: list[tuple[str, object]] = []
    got: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()

    def conn(name: str, subs: list[tuple[str, int]], **kw: Any) -> MqttConn:
        return MqttConn(
            name,
            subs,
            on_connack=lambda c: events.append(("connack", c.client_id)),
            on_ready=lambda c: events.append(("ready", c.client_id)),
            on_message=lambda c, t, p: got.put_nowait((c.client_id, t, p)),
            on_lost=lambda c, why: events.append(("lost", why)),
            **kw,
        )

    many = [(f"sim/t/{i}", i % 2) for i in range(70)]  # two SUBSCRIBE packets (SUBSCRIBE_BATCH 64)
    a = conn("sim-a", [*many, ("sim/will", 1)])
    b = conn("sim-b", [], will=("sim/will", b"gone", 1, False))
    await loop.create_connection(lambda: a, mosquitto.host, mosquitto.port)
    await loop.create_connection(lambda: b, mosquitto.host, mosquitto.port)
    assert await asyncio.wait_for(a.connack, 5) == 0 and await asyncio.wait_for(b.connack, 5) == 0
    for _ in range(50):
        if a.ready and b.ready:
            break
        await asyncio.sleep(0.05)
    assert a.ready and b.ready and ("ready", "sim-a") in events
    assert b.publish("sim/t/69", b"\xa1\x01\x02", qos=1)
    assert b.publish("sim/t/0", b"zero")
    assert b.publish("sim/t/5", b"kept", qos=1, retain=True)
    assert {await asyncio.wait_for(got.get(), 5) for _ in range(3)} == {
        ("sim-a", "sim/t/69", b"\xa1\x01\x02"),
        ("sim-a", "sim/t/0", b"zero"),
        ("sim-a", "sim/t/5", b"kept"),
    }
    c = conn("sim-c", [("sim/t/5", 0)])  # a later subscriber gets the retained message
    await loop.create_connection(lambda: c, mosquitto.host, mosquitto.port)
    assert await asyncio.wait_for(got.get(), 5) == ("sim-c", "sim/t/5", b"kept")
    c.disconnect()
    b.abort("test drops it")  # no DISCONNECT: the broker publishes the will
    assert await asyncio.wait_for(got.get(), 5) == ("sim-a", "sim/will", b"gone")
    assert ("lost", "test drops it") in events
    a.disconnect()
    await asyncio.sleep(0.1)
    assert ("lost", None) in events  # a close the owner asked for


# -- the CoAP client against a scripted peer ------------------------------------------------------------------
def _hdr(d: bytes) -> tuple[int, int, int, bytes]:
    h = parse_header(d)
    assert h is not None
    return h


class Peer(asyncio.DatagramProtocol):
    """A UDP peer; ``script(peer, datagram)`` decides what to send back (``send``)."""

    def __init__(self, script: Callable[[Peer, bytes], None]) -> None:
        self.script = script
        self.got: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.addr: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)
        self.addr = addr
        self.script(self, data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.addr)


async def _exchange(
    script: Callable[[Peer, bytes], None], timeout: float = 5.0
) -> tuple[tuple[int, bytes, float], Peer, Counters]:
    loop = asyncio.get_running_loop()
    peer = Peer(script)
    transport, _ = await loop.create_datagram_endpoint(lambda: peer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    counters = Counters()
    client = simcoap.CoapClient("127.0.0.1", port, 1, counters)
    await client.open()
    done: asyncio.Future[tuple[int, bytes, float]] = loop.create_future()
    client.request(0, simcoap.POST, b"\xb1d", b"\x01", lambda c, d, ms: done.set_result((c, d, ms)))
    try:
        return await asyncio.wait_for(done, timeout), peer, counters
    finally:
        await asyncio.sleep(0.05)
        client.close()
        transport.close()


async def test_coap_piggybacked_answer_matches_token_and_mid() -> None:
    def script(p: Peer, d: bytes) -> None:
        _t, _c, mid, tok = _hdr(d)
        p.send(encode_message(ACK, 0x44, mid, tok, payload=b"ok"))

    (code, data, ms), peer, c = await _exchange(script)
    assert code == 0x44 and parse_options(data)[1] == b"ok" and ms >= 0
    t, _code, _mid, tok = _hdr(peer.got[0])
    assert t == CON and len(tok) == 4 and c.retransmits == 0


async def test_coap_empty_ack_then_separate_response_is_acknowledged() -> None:
    def script(p: Peer, d: bytes) -> None:
        t, code, mid, tok = _hdr(d)
        if t == CON and code:
            p.send(encode_message(ACK, 0, mid, b""))
            asyncio.get_running_loop().call_later(
                0.05, p.send, encode_message(CON, 0x44, 0x7777, tok, payload=b"late")
            )

    (code, data, _ms), peer, _c = await _exchange(script)
    assert code == 0x44 and parse_options(data)[1] == b"late"
    await asyncio.sleep(0.1)
    assert any(_hdr(g)[:3] == (ACK, 0, 0x7777) for g in peer.got), "the separate CON response was ACKed"


async def test_coap_retransmits_same_message_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simcoap, "ACK_TIMEOUT", 0.005)
    (code, data, _ms), peer, c = await _exchange(lambda p, d: None)
    assert code == simcoap.NO_RESPONSE and data == b""
    assert len(peer.got) == 1 + simcoap.MAX_RETRANSMIT and len(set(peer.got)) == 1, "same datagram, same MID"
    assert c.retransmits == simcoap.MAX_RETRANSMIT


async def test_coap_reset_fails_the_exchange() -> None:
    def script(p: Peer, d: bytes) -> None:
        p.send(encode_message(RST, 0, _hdr(d)[2], b""))  # type: ignore[index]

    (code, _data, _ms), _peer, _c = await _exchange(script)
    assert code == simcoap.RESET


# -- reporter logic against a fake CoAP gateway -----------------------------------------------------------------
class FakeGateway(asyncio.DatagramProtocol):
    """Answers POST .../rpt with a report_ack; ``first`` = CoAP code for the first try of each report."""

    def __init__(self, first: int | None = None) -> None:
        self.first = first
        self.seen: dict[tuple[str, int, int], int] = {}
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        _t, _code, mid, tok = _hdr(data)
        _opts, payload = parse_options(data)
        rep = devicemsg.decode("report", payload)
        k = (rep["id"], rep["boot"], rep["seq"])
        self.seen[k] = self.seen.get(k, 0) + 1
        if self.first is not None and self.seen[k] == 1:
            self.transport.sendto(encode_message(ACK, self.first, mid, tok), addr)
            return
        ack = devicemsg.encode("report_ack", {"boot": rep["boot"], "seq": rep["seq"], "code": devicemsg.OK})
        self.transport.sendto(encode_message(ACK, 0x44, mid, tok, payload=ack), addr)


async def _fake_fleet(
    tmp_path: Path, first: int | None, seconds: float, **kw: Any
) -> tuple[Any, FakeGateway]:
    loop = asyncio.get_running_loop()
    gw = FakeGateway(first)
    transport, _ = await loop.create_datagram_endpoint(lambda: gw, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    cfg = SimConfig(
        devices=20,
        gateway=f"coap://127.0.0.1:{port}",
        interval=0.5,
        duration=seconds,
        mode="light",
        data_dir=tmp_path,
        summary_every=0,
        drain=5,
        seed=1,
        **kw,
    )
    try:
        return await run_fleet(cfg), gw
    finally:
        transport.close()


async def test_light_fleet_retries_5xx_then_acks_each_report_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tools.harness.sim.light as light

    monkeypatch.setattr(light, "RETRY_MIN", 0.05)
    r, gw = await _fake_fleet(tmp_path, 0xA3, 1.0)  # 5.03 first
    c = r.counters
    assert c.made >= 40 and c.acked == c.made and r.pending == 0
    assert c.retried == c.made and c.errors == c.made and c.rejected == 0
    assert all(n == 2 for n in gw.seen.values()) and len(gw.seen) == c.made
    assert {k[1] for k in gw.seen} == {1}
    r2, gw2 = await _fake_fleet(tmp_path, None, 0.3)  # a second run is the next boot
    assert {k[1] for k in gw2.seen} == {2} and r2.counters.retried == 0


async def test_light_fleet_drops_reports_the_gateway_rejects(tmp_path: Path) -> None:
    r, gw = await _fake_fleet(tmp_path, 0x80, 0.6)  # 4.00 first: dropped, never sent again
    c = r.counters
    assert c.made >= 20 and c.rejected == c.made and c.acked == 0 and c.retried == 0 and r.pending == 0
    assert all(n == 1 for n in gw.seen.values())


# -- against a real gateway ----------------------------------------------------------------------------------
@dataclass
class RealGateway:
    coap: str
    mqtt: str
    http: int
    pid: int

    def devices(self, prefix: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/api/devices", timeout=10) as r:
            return [d for d in json.load(r)["devices"] if d["id"].startswith(prefix + "/")]

    def wait_mqtt(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz", timeout=10) as r:
                if json.load(r)["components"].get("mqtt") == "ready":
                    return
            assert time.monotonic() < deadline, "the gateway's MQTT front end never subscribed"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealGateway]:
    """One `ida node` + Mosquitto + `ida gateway` (CoAP, HTTP, MQTT) for the module; tests use their own prefix."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    logs = tmp_path_factory.mktemp("simgw")
    http = free_port(socket.SOCK_STREAM)
    with Broker(logs / "mosquitto") as broker, NodeProcess(logs) as node:
        with GatewayProcess(logs, node.url, mqtt=broker.url, extra=("--http", f"127.0.0.1:{http}")) as gw:
            assert gw.child is not None
            g = RealGateway(f"coap://127.0.0.1:{gw.port}", broker.url, http, gw.child.pid)
            g.wait_mqtt()
            yield g


def _check_every_report_once(gw: RealGateway, prefix: str, devices: int, r: Any) -> None:
    c = r.counters
    assert c.made >= devices and c.acked == c.made and r.pending == 0, r.to_dict()
    assert c.rejected == 0 and c.dropped == 0 and c.late == 0, r.to_dict()
    seen = gw.devices(prefix)
    assert len(seen) == devices
    assert sum(d["reports_total"] for d in seen) == c.acked, (
        "the gateway stored each acknowledged report once"
    )


def _light_200(
    gw: RealGateway,
    transport: str,
    prefix: str,
    data_dir: Path,
    resolves: tuple[float, tuple[str, ...]],
    **kw: Any,
) -> SimConfig:
    """200 light devices of ``gw`` reporting every 1.5 s for 3 s under ``prefix``; ``resolves``: (every, ids)."""
    to = {"gateway": gw.coap} if transport == "coap" else {"broker": gw.mqtt}
    every, ids = resolves
    return SimConfig(
        devices=200,
        interval=1.5,
        duration=3.0,
        mode="light",
        transport=transport,
        prefix=prefix,
        data_dir=data_dir,
        resolve_every=every,
        resolve_ids=ids,
        **to,
        **kw,
    )


@pytest.mark.slow
def test_light_200_devices_over_coap_against_the_gateway(gateway: RealGateway, tmp_path: Path) -> None:
    prefix = "88.123.201"
    cfg = _light_200(gateway, "coap", prefix, tmp_path, (1.5, ("88.123.99/PUMP-0001",)), summary_every=1.0)
    lines: list[str] = []
    r = run_sim(cfg, out=lines.append)
    _check_every_report_once(gateway, prefix, 200, r)
    assert r.counters.made >= 380 and r.ack_ms.n == r.counters.acked
    assert (
        r.counters.resolves >= 380
        and r.counters.resolves_ok + r.counters.resolves_not_modified == r.counters.resolves
    )
    assert r.counters.resolves_not_modified > 0, "the ETag of the first answer revalidates later ones"
    assert lines and "reports sent" in lines[0] and "ack p50" in lines[0]
    assert all(d["transport"] == "coap" and d["board"] == "sim" for d in gateway.devices(prefix))


@pytest.mark.slow
def test_light_200_devices_over_mqtt_against_the_gateway(gateway: RealGateway, tmp_path: Path) -> None:
    prefix = "88.123.202"
    ids = ("88.123.99/PUMP-0001", "88.123.99/PUMP-0001", "88.123.99/NOPE-0001")
    cfg = _light_200(gateway, "mqtt", prefix, tmp_path, (1.0, ids), summary_every=0)
    r = run_sim(cfg)
    _check_every_report_once(gateway, prefix, 200, r)
    c = r.counters
    assert c.connects == 200 and c.disconnects == 0 and r.online == 0, "one connection per device, all closed"
    assert c.resolves >= 500 and c.resolve_errors == 0 and c.resolves_not_found > 0 and c.resolves_ok > 0
    assert c.resolves_not_modified > 0, "the etag of the first answer revalidates later ones"
    seen = gateway.devices(prefix)
    assert all(d["transport"] == "mqtt" for d in seen)
    deadline = time.monotonic() + 15  # the offline statuses travel through the broker after the fleet stopped
    while any(d["online"] for d in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = gateway.devices(prefix)
    assert not any(d["online"] for d in seen), "a clean stop publishes every device's offline status"


def _processes_under(path: Path) -> list[int]:
    """Live processes whose working directory is inside ``path`` (the firmware devices run in their data dir)."""
    out = []
    root = str(path.resolve())
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cwd = os.readlink(p / "cwd")
        except OSError:
            continue
        if cwd.startswith(root):
            out.append(int(p.name))
    return out


@pytest.mark.slow
def test_firmware_mode_two_real_devices_coap_and_mqtt(gateway: RealGateway, tmp_path: Path) -> None:
    prefix = "88.123.203"
    data = tmp_path / "fleet"
    proc = subprocess.run(
        ida_command(
            "sim",
            "--devices",
            "2",
            "--mode",
            "firmware",
            "--transport",
            "mix",
            "--gateway",
            gateway.coap,
            "--broker",
            gateway.mqtt,
            "--interval",
            "10",
            "--duration",
            "3",
            "--prefix",
            prefix,
            "--data-dir",
            str(data),
            "--summary-every",
            "1",
            "--json",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["mode"] == "firmware" and r["devices"] == 2
    assert r["reports"]["made"] >= 2 and r["reports"]["acked"] == r["reports"]["made"], r
    assert r["resolves"]["total"] >= 2, "each device resolved its own identifier at boot"
    assert "reports sent" in proc.stderr  # periodic lines go to stderr with --json
    seen = {d["id"]: d for d in gateway.devices(prefix)}
    assert set(seen) == {f"{prefix}/SIM-00001", f"{prefix}/SIM-00002"}
    assert (
        seen[f"{prefix}/SIM-00001"]["transport"] == "coap"
        and seen[f"{prefix}/SIM-00002"]["transport"] == "mqtt"
    )
    assert all(d["board"] == "unix" and d["reports_total"] >= 1 for d in seen.values())
    assert json.loads((data / f"{prefix}%2FSIM-00002" / "identity.json").read_text())["transport"] == "mqtt"
    assert _processes_under(data) == [], "no firmware process is left running"


def test_ctrl_c_stops_the_fleet_with_a_summary_and_nothing_left(tmp_path: Path) -> None:
    """No gateway at all: reports time out; SIGINT still ends the run promptly with the final summary."""
    dead = free_port()
    proc = subprocess.Popen(
        ida_command(
            "sim",
            "--devices",
            "20",
            "--mode",
            "light",
            "--gateway",
            f"coap://127.0.0.1:{dead}",
            "--interval",
            "1",
            "--data-dir",
            str(tmp_path),
            "--drain",
            "0.5",
            "--summary-every",
            "0",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "light fleet: 20 devices" in proc.stderr.readline()  # running, signal handlers in place
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 5
    assert "sim: 20 devices (light, coap)" in out and "acked 0" in out and "pending" in out
    assert (tmp_path / "light-boot.json").exists()


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(
        ida_command(
            "sim", "--devices", "3", "--mode", "firmware", "--interval", "2", "--data-dir", str(tmp_path)
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "10-86400" in proc.stderr
