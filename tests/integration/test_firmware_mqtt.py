"""The firmware's MQTT 3.1.1 client under the real ``micropython`` against a real Mosquitto (``mosquitto`` fixture,
tests/conftest.py), checked with paho on this side: QoS 1 both ways, keepalive and a dead (SIGSTOPped) broker
detected, reconnect with resubscribe, the last will; then the whole device over MQTT with paho playing the gateway
(report acks, retained desired config, resolve with tokens, broker restart, last will on kill -9)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.brokers import Broker
from tests.support.fwdevice import FIRMWARE, DeviceProc, provision, wait_for
from tools.support.procs import micropython_binary

ID = "88.123.99/PUMP-0001"
DEV = "88.123.99%2FPUMP-0001"
BASE = f"ida/v1/d/{DEV}/"

CLIENT_SCRIPT = """
import sys, time
from carrier import mqtt
port, ka, secs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = mqtt.Client(b"mp-test", ka, (b"t/will", b"gone", 1, True), retry_ms=2000)
ups = []
def up(now):
    ups.append(now)
    print("UP", len(ups))
    c.subscribe([(b"t/in", 1)], now)
    c.publish(b"t/out", b"hello %d" % len(ups), 1, False, now)
c.on_msg = lambda t, p, r: print("MSG", bytes(t).decode(), bytes(p).decode(), r)
c.on_puback = lambda pid: print("PUBACK", pid)
c.on_suback = lambda pid, ok: print("SUBACK", pid, ok)
s = mqtt.Session(c, "127.0.0.1", port, up)
s.start(time.ticks_ms())
last = -1
end = time.ticks_add(time.ticks_ms(), secs * 1000)
while time.ticks_diff(end, time.ticks_ms()) > 0:
    t0 = time.ticks_ms()
    s.poll(t0)
    took = time.ticks_diff(time.ticks_ms(), t0)
    if took > 100:
        print("SLOW", took)
    if c.state != last:
        print("STATE", c.state, c.reason)
        last = c.state
    time.sleep_ms(10)
"""


class Paho:
    """A paho client collecting messages per topic into queues."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str = "checker") -> None:
        self.q: dict[str, queue.Queue[tuple[bytes, bool]]] = {}
        self.lock = threading.Lock()
        self.handler: Any = None
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        self.c.reconnect_delay_set(1, 1)
        self.topics = topics
        self.connected = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.connected.clear()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port, 30)
        self.c.loop_start()
        assert self.connected.wait(10), "paho did not connect"

    def _on_connect(self, c: Any, u: Any, f: Any, rc: Any, p: Any = None) -> None:
        for t in self.topics:
            c.subscribe(t, 1)
        self.connected.set()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self.lock:
            q = self.q.setdefault(msg.topic, queue.Queue())
        q.put((msg.payload, bool(msg.retain)))
        if self.handler:
            self.handler(msg.topic, msg.payload)

    def get(self, topic: str, timeout: float = 10.0) -> tuple[bytes, bool]:
        with self.lock:
            q = self.q.setdefault(topic, queue.Queue())
        return q.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        assert self.connected.wait(15), "paho is not connected"
        self.c.publish(topic, payload, qos, retain).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Script:
    def __init__(self, port: int, keepalive: int, secs: int) -> None:
        env = dict(os.environ, MICROPYPATH=str(FIRMWARE))
        self.proc = subprocess.Popen(
            [micropython_binary(), "-c", CLIENT_SCRIPT, str(port), str(keepalive), str(secs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.all.append(line.rstrip())
            self.lines.put(line.rstrip())

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} within {timeout}s: {self.all[-20:]}")


def test_client_against_mosquitto_qos1_keepalive_reconnect_will(mosquitto: Broker) -> None:
    checker = Paho(mosquitto, ["t/out", "t/will"])
    script = Script(mosquitto.port, 2, 60)
    try:
        script.expect("UP 1")
        assert checker.get("t/out") == (b"hello 1", False)
        script.expect("SUBACK 1 True")
        script.expect("PUBACK 2")
        checker.publish("t/in", b"to device", 1)
        assert script.expect("MSG").startswith("MSG t/in to device 0")
        # a broker that stops answering (process stopped, TCP still up) is noticed through the keepalive
        assert mosquitto.proc is not None
        t0 = time.monotonic()
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            line = script.expect("STATE 0", 10)
            assert "PINGREQ" in line, line
            detected = time.monotonic() - t0
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        assert detected <= 2 * 2 + 1, detected  # keepalive 2 s: ping after 1 s idle, dead after 1 s more
        script.expect("UP 2", 30)  # reconnected (backoff + jitter), resubscribed, published again
        script.expect("SUBACK")
        checker.publish("t/in", b"after reconnect", 1)
        assert "after reconnect" in script.expect("MSG")
        assert not [x for x in script.all if x.startswith("SLOW")], "poll() blocked"
        # last will: the broker publishes it when the client dies without DISCONNECT
        script.proc.kill()
        assert checker.get("t/will", 10) == (b"gone", False)
    finally:
        script.proc.kill()
        checker.close()


class Gateway(Paho):
    """paho playing the gateway for one device: acks reports, answers resolves, records config acks."""

    RECORDS = {"88.1/thing": [[1, "URL", "https://example.org/thing", 300]]}

    def __init__(self, broker: Broker) -> None:
        self.reports: list[dict[int, Any]] = []
        self.cfgacks: list[dict[int, Any]] = []
        self.requests: list[dict[int, Any]] = []
        super().__init__(broker, [BASE + "rpt", BASE + "req", BASE + "cfgack", BASE + "status"], "gateway")
        self.handler = self._handle

    def _handle(self, topic: str, payload: bytes) -> None:
        kind = topic.rsplit("/", 1)[1]
        if kind == "rpt":
            rep = cbor2.loads(payload)
            self.reports.append(rep)
            self.c.publish(BASE + "ack", cbor2.dumps({10: rep[10], 11: rep[11], 3: 1}), 1)
        elif kind == "cfgack":
            self.cfgacks.append(cbor2.loads(payload))
        elif kind == "req":
            req = cbor2.loads(payload)
            self.requests.append(req)
            ident = req[2]
            if ident in self.RECORDS:
                res = {1: req[1], 3: 1, 2: ident, 4: self.RECORDS[ident], 5: 300, 6: b"etag0001", 23: 2}
            else:
                res = {1: req[1], 3: 100, 9: "handle not found", 5: 60}
            self.c.publish(BASE + "res", cbor2.dumps(res), 0)


def test_device_over_mqtt(tmp_path: Path, mosquitto: Broker) -> None:
    gw = Gateway(mosquitto)
    gw.publish(BASE + "cfg", cbor2.dumps({20: 2, 21: 30}), 1, retain=True)
    provision(tmp_path / "dev", ID, mqtt=mosquitto.url, transport="mqtt")
    dev = DeviceProc(tmp_path / "dev", {"IDA_INTERVAL": "60"})
    try:
        dev.start()
        status, _retained = gw.get(BASE + "status")
        assert cbor2.loads(status) == {2: ID, 24: True}
        wait_for(lambda: gw.reports and gw.cfgacks, 15, "report and config ack")
        assert gw.cfgacks[0] == {2: ID, 20: 2, 3: 1}
        assert (gw.reports[0][10], gw.reports[0][11]) == (1, 1)
        dev.expect(rf"I app resolve id={ID} code=100 ")  # the stub knows no record for the device itself
        dev.json_on()
        st = dev.wait_status(lambda s: s["acked"] >= 1 and s["queue"] == 0)
        assert (st["transport"], st["interval"], st["cfgver"]) == ("mqtt", 30, 2)
        r = dev.json("resolve 88.1/thing")
        assert r["ok"] and r["values"] == [[1, "URL", "https://example.org/thing", 300]]
        assert dev.json("resolve 88.1/thing")["source"] == "device-cache"
        assert len(gw.requests[-1][1]) == 2, "a token on every request"
        assert not dev.json("resolve 88.1/none")["ok"]
        # the broker restarts (retained messages and sessions gone): the device reconnects and resubscribes
        mosquitto.restart()
        gw.publish(BASE + "cfg", cbor2.dumps({20: 3, 21: 40}), 1, retain=True)
        wait_for(lambda: len(gw.cfgacks) >= 2, 30, "config after the broker restart")
        assert gw.cfgacks[-1] == {2: ID, 20: 3, 3: 1}
        n = len(gw.reports)
        dev.json("report")
        wait_for(lambda: len(gw.reports) > n, 15, "report after the broker restart")
        dev.wait_status(lambda s: s["queue"] == 0)
        # last will on a crash
        while True:
            try:
                gw.get(BASE + "status", 0.1)
            except queue.Empty:
                break
        dev.kill9()
        payload, _ = gw.get(BASE + "status", 10)
        assert cbor2.loads(payload) == {2: ID, 24: False}
    finally:
        dev.stop()
        gw.close()


@pytest.mark.parametrize("keepalive", [60])
def test_device_status_is_retained(tmp_path: Path, mosquitto: Broker, keepalive: int) -> None:
    provision(tmp_path / "dev", ID, mqtt=mosquitto.url, transport="mqtt")
    with DeviceProc(tmp_path / "dev") as dev:
        dev.expect(r"I net mqtt started")
        time.sleep(0.5)
        late = Paho(mosquitto, [BASE + "status"], "late")
        try:
            payload, retained = late.get(BASE + "status")
            assert retained and cbor2.loads(payload) == {2: ID, 24: True}
        finally:
            late.close()
