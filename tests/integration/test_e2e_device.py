"""End to end, every piece real and on loopback (issue 5, "Must show"): ``ida node`` (upstream recursive node),
a real Mosquitto, ``ida gateway`` (CoAP, HTTP and MQTT front ends, its outbox delivering to a webhook served
here) and two devices that are the real firmware under ``micropython``, each started with ``ida device run``:
one over CoAP (through a UDP relay that records what it sends, to count bytes on the wire) and one over MQTT.

(a) the CoAP device resolves its own identifier upstream, and from the gateway's cache after a reboot; its
    reports appear in ``GET /api/devices/<id>``;
(b) the MQTT device resolves over MQTT and its reports appear;
(c) the gateway is stopped, the devices keep queueing (``status`` queue > 0), the gateway is restarted on the
    same ports and data dir, and every report each device made reaches the gateway exactly once: the device's
    (boot, seq) set equals the registry's, and the webhook consumer sees it at least once (raw count) and
    exactly once after de-duplicating by (id, boot, seq);
(d) a remote config change is applied by each device (``config get``) and acknowledged (state ``applied``);
(e) the device's heap after boot + first report, and the bytes of one CoAP resolve request for a 24-character
    identifier, are printed and checked against the targets (32 KB, 48 bytes).

The tests share one set of processes (module fixture) and run in file order.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proto import devicemsg
from proto.coap import Message, MessageError
from proto.coap.numbers import GET
from tests.support.brokers import Broker, mosquitto_binary
from tests.support.devicerun import IdaDevice
from tests.support.webapp import LoopbackApp
from tools.harness.bench.procs import Child
from tools.harness.bench.project import NodeProcess, rest_record
from tools.harness.sim.provision import FIRMWARE_DIR
from tools.support.procs import free_port, ida_command, micropython_binary

pytestmark = pytest.mark.slow

COAP_ID = "88.123.99/E2E-COAP-00001"  # 24 characters: the resolve request the target is about
MQTT_ID = "88.123.99/E2E-MQTT-00001"
HEAP_TARGET = 32 * 1024
REQUEST_TARGET = 48
URI_PATH = 11


def _record(handle: str) -> dict[str, Any]:
    return rest_record(handle, f"https://example.com/{handle}")


# -- what runs in this test process: a webhook consumer and a UDP relay, on one asyncio loop in a thread -----------
class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Webhook(LoopbackApp):
    """The northbound consumer: every POST of the gateway's outbox, in arrival order."""

    path = "/hook"

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[tuple[str, int, int]] = []
        self.keys: list[str] = []

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.deliveries.append((body["id"], int(body["boot"]), int(body["seq"])))
        self.keys.append(request.headers.get("Idempotency-Key", ""))
        return web.json_response({"ok": True})

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(self.path, self._post)

    def of(self, ident: str) -> tuple[int, set[tuple[int, int]]]:
        """(raw deliveries, de-duplicated (boot, seq) set) for one device."""
        raw = [(b, s) for i, b, s in list(self.deliveries) if i == ident]
        return len(raw), set(raw)


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on: Callable[[bytes, Any], None]) -> None:
        self.on = on
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable while the gateway is down
        pass


class UdpRelay:
    """device <-> relay port <-> gateway: forwards both ways (also the gateway's Observe notifications) and
    keeps every datagram the device sent, so the bytes on the wire can be counted."""

    def __init__(self, gateway_port: int) -> None:
        self.gateway = ("127.0.0.1", gateway_port)
        self.up: list[bytes] = []
        self.device: Any = None
        self.port = 0
        self._front: _Side | None = None
        self._back: _Side | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._front = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_device), local_addr=("127.0.0.1", 0)
        )
        _, self._back = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_gateway), local_addr=("127.0.0.1", 0)
        )
        assert self._front.transport is not None
        self.port = self._front.transport.get_extra_info("sockname")[1]

    def _from_device(self, data: bytes, addr: Any) -> None:
        self.device = addr
        self.up.append(data)
        if self._back is not None and self._back.transport is not None:
            self._back.transport.sendto(data, self.gateway)

    def _from_gateway(self, data: bytes, addr: Any) -> None:
        if self.device is not None and self._front is not None and self._front.transport is not None:
            self._front.transport.sendto(data, self.device)

    async def stop(self) -> None:
        for side in (self._front, self._back):
            if side is not None and side.transport is not None:
                side.transport.close()

    def resolve_requests(self) -> list[bytes]:
        """Datagrams the device sent that are a GET of /r/..."""
        out = []
        for d in list(self.up):
            try:
                m = Message.decode(d)
            except MessageError:
                continue
            if m.code != GET:
                continue
            path = m.values(URI_PATH)
            if path and path[0] == b"r":
                out.append(d)
        return out


# -- the gateway as an operator runs it --------------------------------------------------------------------------
class GatewayProc:
    """``ida gateway --config FILE`` on fixed ports and one data dir, so it can be stopped and started again."""

    def __init__(self, work: Path, upstream: str, broker: str, webhook: str) -> None:
        self.work = work
        self.coap_port = free_port(socket.SOCK_DGRAM)
        self.http_port = free_port(socket.SOCK_STREAM)
        self.config = work / "gateway.toml"
        self.config.write_text(
            f'[coap]\nhost = "127.0.0.1"\nport = {self.coap_port}\n'
            f'[http]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
            f'[mqtt]\nurl = "{broker}"\n'
            f'[upstream]\nurls = ["{upstream}"]\n'
            f'[data]\ndir = "{work / "gateway-data"}"\n'
            f'[outbox]\nwebhook_url = "{webhook}"\n'
            '[log]\nlevel = "info"\n'
        )
        self.child: Child | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        self.child = Child(
            f"gateway-{self.starts}", ida_command("gateway", "--config", str(self.config)), log_dir=self.work
        ).start()
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive():
                raise self.child.fail("exited")
            try:
                h = self.get("/healthz")
                if h["components"].get("coap") == "listening" and h["components"].get("mqtt") == "ready":
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise self.child.fail(f"not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> int | None:
        if self.child is None:
            return None
        self.child.stop(grace=15)
        rc = self.child.proc.returncode if self.child.proc else None
        self.child = None
        return rc

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw.startswith((b"{", b"[")) else raw.decode()

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def device(self, ident: str) -> dict[str, Any]:
        d: dict[str, Any] = self.get("/api/devices/" + urllib.parse.quote(ident, safe="/"))
        return d

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples and sums over labels: {"ida_cache_hits_total": 3.0, ...}."""
        out: dict[str, float] = {}
        for line in str(self.get("/metrics")).splitlines():
            m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out


@dataclass
class Env:
    work: Path
    gw: GatewayProc
    hook: Webhook
    relay: UdpRelay
    broker: Broker
    coap: IdaDevice
    mqtt: IdaDevice
    boots: dict[str, dict[int, int]] = field(
        default_factory=dict
    )  # device -> {boot: last seq}, earlier boots
    figures: dict[str, Any] = field(default_factory=dict)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    micropython_binary()
    work = tmp_path_factory.mktemp("e2e")
    lt = LoopThread()
    hook = Webhook()
    lt.run(hook.start())
    devices: list[IdaDevice] = []
    gw: GatewayProc | None = None
    relay: UdpRelay | None = None
    try:
        with (
            Broker(work / "mosquitto") as broker,
            NodeProcess(work, extra_records=[_record(COAP_ID), _record(MQTT_ID)]) as node,
        ):
            gw = GatewayProc(work, node.url, broker.url, hook.url)
            relay = UdpRelay(gw.coap_port)
            lt.run(relay.start())
            gw.start()
            # the CoAP device talks to the relay; a report interval of a day: it reports at boot and when told
            coap = IdaDevice(
                work / "dev-coap",
                COAP_ID,
                "--gateway",
                f"coap://127.0.0.1:{relay.port}",
                "--interval",
                "86400",
            )
            mqtt = IdaDevice(
                work / "dev-mqtt",
                MQTT_ID,
                "--transport",
                "mqtt",
                "--broker",
                broker.url,
                "--interval",
                "86400",
            )
            devices += [coap.start(), mqtt.start()]
            yield Env(work, gw, hook, relay, broker, coap, mqtt)
    finally:
        for d in devices:
            d.stop()
        if gw is not None:
            gw.stop()
        if relay is not None:
            lt.run(relay.stop())
        lt.run(hook.stop())
        lt.close()


# -- (a) (e) ------------------------------------------------------------------------------------------------------
def test_coap_device_resolves_upstream_then_from_cache_and_its_reports_appear(env: Env) -> None:
    dev, gw = env.coap, env.gw
    m = dev.expect(r"^I app resolve id=(\S+) code=(-?\d+) values=(\d+) src=(-?\d+)", 30)
    assert m.group(1) == COAP_ID and m.group(2) == "1" and m.group(3) == "2", m.string
    assert int(m.group(4)) == devicemsg.SOURCE_UPSTREAM, "the first resolve of the identifier went upstream"
    dev.json_on()
    st = dev.wait_status(lambda s: s["acked"] >= 1 and s["queue"] == 0, timeout=20)
    env.figures["heap_used"] = st["heap_used"]
    d = gw.device(COAP_ID)
    assert d["transport"] == "coap" and d["board"] == "unix" and d["fw"] == "0.1.0"
    assert d["reports_total"] >= 1 and d["last_report"]["boot"] == st["boot"]
    assert {(r["boot"], r["seq"]) for r in d["recent_reports"]} >= {(st["boot"], 1)}

    reqs = env.relay.resolve_requests()
    assert reqs, "the relay saw the device's resolve request"
    env.figures["resolve_request_bytes"] = len(reqs[0])

    # reboot: the device's own cache is RAM, so its boot-time resolve asks the gateway again -> gateway cache
    before = gw.metrics()
    env.boots.setdefault(COAP_ID, {})[st["boot"]] = st["seq"]
    dev.send("reboot")
    m = dev.expect(r"^I app resolve id=(\S+) code=(-?\d+) values=(\d+) src=(-?\d+)", 30)
    assert m.group(1) == COAP_ID and m.group(2) == "1", m.string
    assert int(m.group(4)) == devicemsg.SOURCE_CACHE, (
        "the second resolve was answered from the gateway's cache"
    )
    assert gw.metrics()["ida_cache_hits_total"] > before.get("ida_cache_hits_total", 0.0)
    dev.json_on()  # a reboot starts a new console in text mode
    st2 = dev.wait_status(lambda s: s["acked"] >= 1 and s["queue"] == 0, timeout=20)
    assert st2["boot"] == st["boot"] + 1
    assert gw.device(COAP_ID)["last_report"]["boot"] == st2["boot"]


# -- (b) ----------------------------------------------------------------------------------------------------------
def test_mqtt_device_resolves_over_mqtt_and_its_reports_appear(env: Env) -> None:
    dev, gw = env.mqtt, env.gw
    m = dev.expect(r"^I app resolve id=(\S+) code=(-?\d+) values=(\d+) src=(-?\d+)", 30)
    assert m.group(1) == MQTT_ID and m.group(2) == "1" and m.group(3) == "2", m.string
    assert int(m.group(4)) == devicemsg.SOURCE_UPSTREAM
    dev.json_on()
    st = dev.wait_status(lambda s: s["acked"] >= 1 and s["queue"] == 0, timeout=20)
    assert st["transport"] == "mqtt" and st["transport_on"]
    d = gw.device(MQTT_ID)
    assert d["transport"] == "mqtt" and d["online"] is True and d["reports_total"] >= 1
    # a resolve typed on the console goes over MQTT too; the CoAP device's identifier is in the gateway cache
    r = dev.json(f"resolve {COAP_ID}", timeout=15)
    assert r["ok"] and r["code"] == 1 and r["source"] == "cache", r
    assert [v[1] for v in r["values"]] == ["URL", "EMAIL"]


# -- (d) ----------------------------------------------------------------------------------------------------------
def _config_applied(dev: IdaDevice, gw: GatewayProc, ident: str, interval: int, meta: dict[str, str]) -> None:
    cfg = gw._call("PUT", "/api/devices/" + ident + "/config", {"interval": interval, "meta": meta})
    cfgver = cfg["config"]["cfgver"]

    def applied() -> bool:
        c = dev.json("config get")
        return bool(c["interval"] == interval and c["meta"] == meta and c["cfgver"] == cfgver)

    # a CoAP device without a desired config at boot has no observation: it fetches again after a report
    dev.json("report")
    wait_until(applied, 20, f"{ident} to apply interval {interval}", poll=0.3)
    d = wait_until(
        lambda: (lambda x: x if x["config"]["state"] == "applied" else None)(gw.device(ident)),
        10,
        f"the gateway to record {ident}'s acknowledgement",
    )
    assert d["config"]["acked_cfgver"] == cfgver and d["config"]["ack_code"] == devicemsg.OK
    assert dev.json("status")["interval"] == interval


def test_remote_config_change_is_applied_and_acknowledged(env: Env) -> None:
    # 600 s, not 15: a periodic report made between the last `status` and the registry read in the outage test
    # would be a (boot, seq) the test did not know about; every report here is made on request
    _config_applied(env.coap, env.gw, COAP_ID, 600, {"URL": "https://example.com/e2e/coap"})
    _config_applied(env.mqtt, env.gw, MQTT_ID, 600, {"URL": "https://example.com/e2e/mqtt", "EMAIL": "a@b.c"})


# -- (c) ----------------------------------------------------------------------------------------------------------
def _expected(env: Env, ident: str, st: dict[str, Any]) -> set[tuple[int, int]]:
    """Every (boot, seq) the device made: earlier boots (recorded before their reboot) and the current one."""
    out = {(st["boot"], s) for s in range(1, st["seq"] + 1)}
    for boot, last in env.boots.get(ident, {}).items():
        out |= {(boot, s) for s in range(1, last + 1)}
    return out


def test_gateway_outage_every_queued_report_is_delivered_exactly_once(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    gw, devs = env.gw, {COAP_ID: env.coap, MQTT_ID: env.mqtt}
    for dev in devs.values():
        dev.wait_status(lambda s: s["queue"] == 0, timeout=30)
    assert gw.stop() == 0, "graceful stop"
    t_down = time.monotonic()
    queued: dict[str, int] = {}
    for dev in devs.values():
        for _ in range(3):
            dev.json("report")
    time.sleep(3.0)  # the gateway stays away for a while; the devices keep trying and keep queueing
    for ident, dev in devs.items():
        st = dev.json("status")
        assert st["queue"] >= 3 and st["acked"] >= 1, st
        queued[ident] = st["queue"]
    gw.start()  # same ports, same data dir
    t_up = time.monotonic()
    final: dict[str, dict[str, Any]] = {}
    for ident, dev in devs.items():
        final[ident] = dev.wait_status(lambda s: s["queue"] == 0, timeout=60, poll=0.5)
    drained = time.monotonic() - t_up

    lines = []
    for ident, st in final.items():
        expected = _expected(env, ident, st)
        assert st["dropped"] == 0, st
        d = gw.device(ident)
        stored = {(r["boot"], r["seq"]) for r in d["recent_reports"]}
        assert d["reports_total"] == len(expected) <= 20, "each report stored once (and all fit the history)"
        assert stored == expected, (sorted(stored ^ expected), ident)

        def northbound(i: str = ident, e: set[tuple[int, int]] = expected) -> bool:
            return env.hook.of(i)[1] >= e

        wait_until(northbound, 15, f"the webhook to receive {ident}'s reports")
        raw, dedup = env.hook.of(ident)
        assert dedup == expected and raw >= len(expected)
        lines.append(
            f"{ident} ({st['transport']}): queued during the outage {queued[ident]}, made {len(expected)}"
            f", stored {d['reports_total']} (duplicates received and acknowledged again: "
            f"{d['duplicates_total']}), webhook deliveries raw {raw} / de-duplicated {len(dedup)}"
        )
    wait_until(lambda: gw.metrics().get("ida_outbox_depth") == 0, 15, "the outbox to empty")
    with capsys.disabled():  # the figures belong in the test output, captured or not
        print(
            f"\n[e2e] gateway down {t_up - t_down:.1f} s; every device queue drained {drained:.1f} s after the "
            "restart"
        )
        for line in lines:
            print("[e2e]   " + line)


# -- (e) ----------------------------------------------------------------------------------------------------------
def _code_heap(transport: str) -> int:
    """gc.mem_alloc() of a MicroPython process that has imported what a running device keeps, nothing run (what
    only boot imports is loaded and dropped again, as boot does: carrier.unload)."""
    mods = "app, coap" if transport == "coap" else "app, mqttdevice"
    script = (
        f"import sys\nsys.path.insert(0, {str(FIRMWARE_DIR)!r})\nimport gc, json\n"
        f"from carrier import {mods}, rcache, hal, console, queue, reporter, unload\nfrom carrier.hal import unix\n"
        "from carrier import startup, identity, idsyntax, config, qfile\nfrom carrier.hal import boardfile\n"
        "unload('startup', 'identity', 'idsyntax', 'config', 'qfile', 'hal.boardfile')\n"
        "del startup, identity, idsyntax, config, qfile, boardfile\n"
        "gc.collect()\ngc.collect()\nprint(gc.mem_alloc())\n"
    )
    out = subprocess.run([micropython_binary(), "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_device_heap_and_resolve_request_bytes(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    heap = env.figures.get("heap_used")
    nbytes = env.figures.get("resolve_request_bytes")
    if heap is None or nbytes is None:
        pytest.skip("needs test (a) to have run")
    code = _code_heap("coap")
    state = heap - code
    with capsys.disabled():
        _print_figures(heap, code, state, nbytes)
    assert len(COAP_ID) == 24
    assert nbytes <= REQUEST_TARGET
    assert 0 < state <= HEAP_TARGET
    assert heap <= 160 * 1024, "regression guard on the whole process (about 96 KB when measured)"


def _print_figures(heap: int, code: int, state: int, nbytes: int) -> None:
    print(
        f"\n[e2e] device heap in use after boot + first report (gc.mem_alloc after gc.collect, status heap_used, "
        f"64-bit unix port, code loaded as source): {heap} B in all; firmware code alone {code} B; "
        f"application state {state} B (target <= {HEAP_TARGET} B)"
    )
    print(
        f"[e2e] CoAP resolve request for the 24-character identifier {COAP_ID}: {nbytes} bytes on the wire "
        f"(UDP payload, target <= {REQUEST_TARGET})"
    )
