"""P6's MQTT figure: device reports at QoS 1 through a real Mosquitto to a real ``ida gateway``, closed loop, and in
the same run the bare broker round trip.

    from tools.harness.bench.ingest_mqtt import measure_mqtt_ingest
    fig = measure_mqtt_ingest(BenchOptions(quick=True), devices=400)
    fig.as_dict()   # {"mqtt_reports_per_s", "p99_ms", "cpu_us_per_report", "lost", "duplicates", ...}

Setup: ``ida node`` (the gateway's start-up probe resolves through it), a Mosquitto (tools/harness/bench/broker.py),
``ida gateway --mqtt`` (its device link subscribes to ``$share/ida-gw/ida/v1/d/+/rpt`` at QoS 1 and acknowledges
each report after its commit: gateway/frontends/mqtt_reports.py), and the anchor ``mqtt_raw``: a bare asyncio MQTT
client behind the same broker that acknowledges every report at once without storing it (``servers.py mqtt-ack``,
on its own topic root so the gateway never sees that traffic) -- what the broker round trip of a report can do
on this machine. Both are driven by the closed-loop fleet of :mod:`tools.harness.bench.mqttreports` (``devices``
simulated devices, one report in flight each, over ``connections`` TCP connections) and measured with
:func:`~tools.harness.bench.scenario.measure_targets` (rounds in rotating order, each target's best round; the
CPU share of the gateway process and of the broker over each round).

Afterwards the gateway is stopped (SIGTERM) and its registry's SQLite file read: ``lost`` = reports the gateway
acknowledged with code 1 (in any round, warm-up included) whose key (device, boot, seq) is in neither ``reports``
nor ``seen``; ``duplicates`` = keys stored twice (in both). Every round's devices are new identifiers, so no device
sends more reports than the registry keeps keys of (``[registry] dedupe``, checked).
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.harness.bench.anchors import Target
from tools.harness.bench.broker import ANCHOR_ROOT, Mosquitto, spec_args
from tools.harness.bench.loadresult import LoadResult
from tools.harness.bench.mqttreports import ReportLoad, ReportLoadSpec
from tools.harness.bench.procs import BenchError
from tools.harness.bench.project import GatewayProcess, NodeProcess, require_gateway
from tools.harness.bench.scenario import BenchOptions, Figure, Measurement, measure_targets, ratio

__all__ = ["MqttIngestFigures", "measure_mqtt_ingest", "stored_keys", "DEVICES", "ANCHOR_ROOT"]

DEVICES = 1000  # enough reports in flight to saturate the gateway on the 2-core bench machine
DEDUPE = 1024  # the registry's default de-duplication window (keys kept per device)
STORED = "SELECT device, boot, seq FROM reports UNION ALL SELECT device, boot, seq FROM seen"


@dataclass
class MqttIngestFigures:
    """The gateway's and the anchor's best rounds, and what the registry holds afterwards."""

    gateway: Measurement
    anchor: Measurement | None
    devices: int
    connections: int
    acked: int  # reports acknowledged with code 1, every round
    stored: int  # keys the registry holds
    lost: int
    duplicates: int

    @property
    def cpu_us_per_report(self) -> float | None:
        g = self.gateway
        return None if not g.server_cpu or not g.rps else g.server_cpu / g.rps * 1e6

    def as_dict(self) -> dict[str, Figure]:
        g, a = self.gateway, self.anchor
        cpu = self.cpu_us_per_report
        return {
            "mqtt_reports_per_s": round(g.rps),
            "p50_ms": g.figures()["p50_ms"],
            "p99_ms": g.figures()["p99_ms"],
            "cpu_us_per_report": None if cpu is None else round(cpu, 1),
            "server_cpu": g.figures()["server_cpu"],
            "broker_cpu": _share(g, "broker"),
            "loadgen_cpu": _share(g, "loadgen"),
            "lost": self.lost,
            "duplicates": self.duplicates,
            "acked": self.acked,
            "timeouts": g.result.timeouts,
            "errors": g.result.errors,
            "mqtt_raw_reports_per_s": None if a is None else round(a.rps),
            "mqtt_raw_broker_cpu": None if a is None else _share(a, "broker"),
            "ratio_mqtt_raw": None if a is None else ratio(g.rps, a.rps),
            "devices": self.devices,
            "connections": self.connections,
        }


def _share(m: Measurement, name: str) -> float | None:
    v = m.other_cpu.get(name)
    return None if v is None else round(v, 3)


def stored_keys(registry: Path) -> collections.Counter[tuple[str, int, int]]:
    """Every (device, boot, seq) a registry file holds, with how often (more than once: stored twice)."""
    conn = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
    try:
        return collections.Counter(conn.execute(STORED).fetchall())
    finally:
        conn.close()


def measure_mqtt_ingest(
    opts: BenchOptions | None = None,
    *,
    devices: int = DEVICES,
    connections: int | None = None,
    anchor: bool = True,
) -> MqttIngestFigures:
    """Measure the gateway's MQTT report ingest (module doc): ``devices`` simulated devices, one report in flight
    each, over ``connections`` TCP connections (default: one per device); ``anchor`` also measures the bare
    broker round trip. Durations, rounds, logs and progress lines come from ``opts``."""
    opts = opts or BenchOptions(quick=True)
    require_gateway()
    conns = connections or devices
    log_dir = opts.logs()
    acked: set[tuple[str, int, int]] = set()

    def load(t: Target) -> Callable[[], LoadResult]:
        spec = ReportLoadSpec(
            **spec_args(t.name, t.host, t.port, opts.measure_s, opts.warmup_s),
            devices=devices,
            connections=conns,
        )

        def go() -> LoadResult:
            gen = ReportLoad(spec)
            result = asyncio.run(gen.run())
            if t.name == "gateway":
                busiest = max(d.seq for d in gen.devices)
                if busiest > DEDUPE:
                    raise BenchError(
                        f"a device sent {busiest} reports (> {DEDUPE} keys kept): use more devices"
                    )
                acked.update(gen.acked)
            return result

        return go

    with (
        NodeProcess(log_dir, name="p6-node") as node,
        Mosquitto(log_dir, "p6-mosquitto") as broker,
    ):
        gw = GatewayProcess(log_dir, node.url, mqtt=broker.url, name="p6-gateway").start()
        try:
            gateway = Target(
                "gateway", "ida gateway (MQTT device link), reports", broker.host, broker.port, (), gw.child
            )
            targets = [gateway]
            if anchor:
                acker = broker.client("mqtt-ack", ANCHOR_ROOT, name="mqtt_raw_ack")
                label = "bare asyncio MQTT acker (broker round trip, nothing stored)"
                targets.append(Target("mqtt_raw", label, broker.host, broker.port, (), acker))
            try:
                opts.say(
                    f"  {devices} devices over {conns} connections, one report in flight each, {opts.n_rounds} "
                    f"round(s) x {opts.measure_s:g} s"
                )
                assert broker.child is not None
                ms = measure_targets(targets, opts, load=load, watch={"broker": broker.child})
            finally:
                for t in targets[1:]:
                    if t.child is not None:
                        t.child.stop()
        finally:
            gw.stop()
    held = stored_keys(gw.data_dir / "registry.sqlite3")
    return MqttIngestFigures(
        gateway=ms["gateway"],
        anchor=ms.get("mqtt_raw"),
        devices=devices,
        connections=conns,
        acked=len(acked),
        stored=len(held),
        lost=sum(1 for key in acked if key not in held),
        duplicates=sum(n - 1 for n in held.values() if n > 1),
    )
