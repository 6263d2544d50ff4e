"""A closed-loop MQTT report load generator (MQTT 3.1.1 from proto/mqtt, no paho), as a fleet of devices reports.

    spec = ReportLoadSpec("127.0.0.1", 1883, devices=400, connections=400, duration=2.0)
    load = ReportLoad(spec)
    result = asyncio.run(load.run())     # LoadResult, as the CoAP generator's
    load.acked                           # {(identifier, boot, seq)} of every report acknowledged with code 1

Each of ``devices`` simulated devices has its own identifier (``88.123.99/MQB-<tag>-<n>``, ``tag`` new for every
generator) and keeps exactly one report in flight, as the firmware does: it publishes a ``report`` at QoS 1 on
``<root>/<key>/rpt`` and sends its next report (seq + 1) as soon as the ``report_ack`` for this one (matched by
boot and seq) arrives on ``<root>/<key>/ack``, which it subscribes to at QoS 1. A report unacknowledged after
``timeout`` counts as a timeout and is sent again unchanged (the firmware keeps it in its queue and sends it
again), so a gateway that refuses reports under overload slows the fleet down instead of losing reports. The
devices share ``connections`` TCP connections (``connections == devices``: one each, as real devices have).
Only acks in the measurement window (after ``warmup``) count towards the rates; :attr:`ReportLoad.acked` holds
every report acknowledged OK during the whole run (for the lost / stored-twice check); an ack with another code
counts as an error.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import cbor2

from proto import devicemsg, mqtt
from tools.harness.bench.ingest import sample_reports
from tools.harness.bench.loadresult import NS
from tools.harness.bench.mqttclient import BenchConnection, ClosedLoop, MqttRunSpec

__all__ = ["ReportLoadSpec", "ReportLoad", "report_template", "device_ident"]

_MARK = 0xFEEDFACE  # a seq no real report of the run reaches: where the seq goes in the template
_PUBLISH_QOS1 = mqtt.PUBLISH << 4 | 0x02


def device_ident(tag: str, n: int) -> str:
    return f"88.123.99/MQB-{tag}-{n:05d}"


def report_template(ident: str, boot: int) -> tuple[bytes, bytes]:
    """A ``report`` as the firmware sends it (the engine benchmark's sample report), as (bytes before the seq's
    value, bytes after it)."""
    fields = {**sample_reports(1, 1)[0], "id": ident, "boot": boot, "seq": _MARK}
    pre, post = devicemsg.encode("report", fields).split(b"\x1a" + _MARK.to_bytes(4, "big"))
    return pre, post


@dataclass(frozen=True)
class ReportLoadSpec(MqttRunSpec):
    devices: int = 400  # one report in flight each
    connections: int = 400
    timeout: float = 5.0  # seconds before a device sends its report again
    connect_timeout: float = 20.0
    boot: int = 1


class _Device:
    __slots__ = ("ident", "conn", "rpt_head", "pre", "post", "seq", "sent_at", "first_at", "expect")

    def __init__(self, ident: str, conn: _Connection, root: str, boot: int) -> None:
        self.ident = ident
        self.conn = conn
        key = devicemsg.topic_key(ident)
        topic = f"{root}/{key}/rpt".encode()
        self.rpt_head = len(topic).to_bytes(2, "big") + topic  # the PUBLISH's topic field
        self.pre, self.post = report_template(ident, boot)
        self.seq = 0
        self.sent_at = 0  # when this report was last sent
        self.first_at = 0  # when it was first sent (latency is measured from here)
        self.expect = b""  # the ack it waits for, as the gateway encodes it (no desired config)


class _Connection(BenchConnection):
    """One TCP connection carrying some of the devices."""

    def __init__(self, load: ReportLoad, client_id: str) -> None:
        super().__init__(client_id)
        self.load = load
        self.devices: dict[bytes, _Device] = {}  # ack topic -> device
        self.pid = 0
        self.heads = mqtt.FixedHeaders(_PUBLISH_QOS1)

    def filters(self) -> list[tuple[str, int]]:
        return [(topic.decode(), 1) for topic in self.devices]

    def on_publish(self, topic: bytes, payload: bytes, now: int, out: list[bytes]) -> None:
        dev = self.devices.get(topic)
        if dev is not None:
            self.load.on_ack(dev, payload, now, out)
        else:
            self.load.result.unmatched += 1

    def report(self, dev: _Device) -> bytes:
        """The PUBLISH of ``dev``'s current report."""
        self.pid = self.pid % 0xFFFF + 1
        seq = cbor2.dumps(dev.seq)
        size = len(dev.rpt_head) + 2 + len(dev.pre) + len(seq) + len(dev.post)
        return b"".join((self.heads[size], dev.rpt_head, self.pid.to_bytes(2, "big"), dev.pre, seq, dev.post))


class ReportLoad(ClosedLoop):
    tick = 0.05

    def __init__(self, spec: ReportLoadSpec) -> None:
        if spec.devices < 1 or not 1 <= spec.connections <= spec.devices:
            raise ValueError("need devices >= 1 and 1 <= connections <= devices")
        super().__init__(spec.warmup, spec.duration)
        self.spec = spec
        self.grace = spec.timeout
        self.tag = os.urandom(2).hex()
        self.acked: set[tuple[str, int, int]] = set()
        self.devices: list[_Device] = []

    # -- the closed loop ---------------------------------------------------------------------------------------
    def on_ack(self, dev: _Device, payload: bytes, now: int, out: list[bytes]) -> None:
        boot, seq = self.spec.boot, dev.seq
        if payload == dev.expect:  # the usual ack: nothing to decode
            code = devicemsg.OK
        else:
            try:
                obj = cbor2.loads(payload)
                boot, seq, code = obj.get(10), obj.get(11), obj.get(3)
            except Exception:
                self.result.unmatched += 1
                return
        if boot != self.spec.boot or seq != dev.seq or not dev.first_at:
            self.result.unmatched += 1  # a late ack of a report sent again, or garbage
            return
        res = self.result
        if code == devicemsg.OK:
            self.acked.add((dev.ident, boot, seq))
        if self.in_window(now):
            if code == devicemsg.OK:
                res.ok += 1
                res.latencies_ns.append(now - dev.first_at)
            else:
                res.errors += 1
                res.codes[str(code)] = res.codes.get(str(code), 0) + 1
        dev.first_at = 0
        self._inflight -= 1
        self._next(dev, now, out)

    def _next(self, dev: _Device, now: int, out: list[bytes] | None = None) -> None:
        """``dev``'s next report (into ``out``, written by the caller, or written now)."""
        if not self.going_on(now, dev.conn.lost):
            return
        dev.seq += 1
        dev.expect = devicemsg.encode_report_ack(self.spec.boot, dev.seq, devicemsg.OK)
        dev.first_at = dev.sent_at = now
        self._inflight += 1
        self.result.sent += 1
        self._send(dev, out)

    def _send(self, dev: _Device, out: list[bytes] | None) -> None:
        packet = dev.conn.report(dev)
        if out is not None:
            out.append(packet)
        elif dev.conn.transport is not None:
            dev.conn.transport.write(packet)

    def _overdue(self, now: int) -> None:
        limit = int(self.spec.timeout * NS)
        for dev in self.devices:
            if dev.first_at and now - dev.sent_at >= limit and not dev.conn.lost:
                if self.in_window(now):
                    self.result.timeouts += 1
                self.result.retransmits += 1
                dev.sent_at = now
                self._send(dev, None)  # the same report again

    def _begin(self, start: int) -> None:
        for dev in self.devices:
            self._next(dev, start)

    async def _open(self) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        conns = [_Connection(self, f"mqb-{self.tag}-{i}") for i in range(spec.connections)]
        self.conns.extend(conns)
        for n in range(spec.devices):
            conn = conns[n % spec.connections]
            dev = _Device(device_ident(self.tag, n), conn, spec.root, spec.boot)
            conn.devices[f"{spec.root}/{devicemsg.topic_key(dev.ident)}/ack".encode()] = dev
            self.devices.append(dev)

        async def connect(c: _Connection) -> Any:
            return await loop.create_connection(lambda: c, spec.host, spec.port)

        await asyncio.wait_for(asyncio.gather(*(connect(c) for c in conns)), spec.connect_timeout)
        await asyncio.wait_for(asyncio.gather(*(c.subscribed for c in conns)), spec.connect_timeout)
