"""P2: resolve round trip over MQTT through Mosquitto, per gateway process.

Setup: ``ida node``, a Mosquitto broker, ``ida gateway --mqtt`` (its MQTT front end subscribes to the shared
``$share/ida-gw/ida/v1/d/+/req``). The MQTT load generator (:mod:`tools.harness.bench.mqttload`, MQTT 3.1.1
from proto/mqtt) plays ``CONNECTIONS`` devices keeping ``--concurrency`` requests in flight in total, for the
cached ``88.123.99/PUMP-0001``. Anchor, behind the same broker in the same run: ``mqtt_raw``, a bare asyncio MQTT
client answering each request with the gateway's own answer bytes (token patched in), on its own topic root
so the gateway does not see that traffic: the ceiling for a Python process behind this broker. The broker's
CPU share is recorded with each figure (on 2 cores the broker is often the limit).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import cbor2

from tools.harness.bench.anchors import Target
from tools.harness.bench.broker import ANCHOR_ROOT, Mosquitto, spec_args
from tools.harness.bench.loadresult import LoadResult
from tools.harness.bench.mqttload import MqttLoadSpec, mqtt_request, run_mqtt_load
from tools.harness.bench.procs import BenchError
from tools.harness.bench.project import SAMPLE_ID, GatewayProcess, NodeProcess, require_gateway
from tools.harness.bench.scenario import (
    BenchOptions,
    ScenarioResult,
    comparison_rows,
    measure_targets,
    ratio,
    scenario,
)

__all__ = ["run_p2", "GOAL_P2"]

GOAL_P2 = "resolve round trip over MQTT through Mosquitto >= 10,000/s per gateway process"
LIMITS_P2 = (
    "The machine: gateway, Mosquitto and the load generator share 2 cores, and the broker (one thread; two "
    "packets in and two out per round trip) takes the largest share (column broker CPU); together they keep "
    "both cores busy. The gateway answers a cached request on its device link (gateway/frontends/"
    "mqtt_link.py: proto/mqtt framing on the asyncio loop, no paho; the table's pre-encoded answer with "
    "the token put in; all answers of one socket read in one write) for about as much CPU per request as the "
    "bare responder (server CPU / req/s: about 20 us on this machine; py-spy of the event loop's busy time: "
    "the link's packet parsing, table lookup and answer building about 60 %, the socket write about 20 %, "
    "reads and the loop the rest). The bare responder (the "
    "same framing, no resolver, no table) is what one Python process behind this broker can do. Before the "
    "device link, paho's network thread and the asyncio loop shared the GIL and one process topped out near "
    "2,000/s."
)
CONNECTIONS = 4
COLUMNS = ("target", "req/s", "p50 ms", "p99 ms", "server CPU", "broker CPU", "gateway / this")


def _wait_mqtt(broker: Mosquitto, gw: GatewayProcess, timeout: float = 30.0) -> bytes:
    """Ask until the gateway's MQTT front end answers; returns its answer payload."""
    deadline = time.monotonic() + timeout
    while True:
        if gw.child is not None and not gw.child.alive():
            raise gw.child.fail("exited")
        try:
            return asyncio.run(mqtt_request(broker.host, broker.port, SAMPLE_ID, timeout=1.0))
        except (TimeoutError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise (
                    gw.child.fail("no MQTT answer") if gw.child else BenchError("no MQTT answer")
                ) from None


def _anchor(broker: Mosquitto, answer: bytes) -> Target:
    obj = cbor2.loads(answer)
    obj[1] = b"\xfe\xed\xfa\xce"
    pre, post = cbor2.dumps(obj).split(b"\xfe\xed\xfa\xce")
    child = broker.client("mqtt", ANCHOR_ROOT, "--payload", f"{pre.hex()}:{post.hex()}")
    return Target(
        "mqtt_raw", "bare asyncio MQTT responder (Python ceiling)", broker.host, broker.port, (), child
    )


@scenario("P2", "resolve over MQTT through Mosquitto", GOAL_P2, LIMITS_P2)
def run_p2(opts: BenchOptions) -> ScenarioResult:
    require_gateway()
    log_dir = opts.logs()
    res = ScenarioResult("P2", "resolve over MQTT through Mosquitto", GOAL_P2, columns=COLUMNS)

    def load(t: Target) -> Any:
        spec = MqttLoadSpec(
            **spec_args(t.name, t.host, t.port, opts.measure_s, opts.warmup_s),
            ident=SAMPLE_ID,
            connections=CONNECTIONS,
            concurrency=opts.concurrency,
        )

        def go() -> LoadResult:
            return run_mqtt_load(spec)

        return go

    with (
        NodeProcess(log_dir, name="p2-node") as node,
        Mosquitto(log_dir, "p2-mosquitto") as broker,
        GatewayProcess(log_dir, node.url, mqtt=broker.url, name="p2-gateway") as gw,
    ):
        answer = _wait_mqtt(broker, gw)
        if cbor2.loads(answer).get(3) != 1:
            raise BenchError(f"the gateway's MQTT answer is not OK: {cbor2.loads(answer)!r}")
        gateway = Target(
            "gateway", "ida gateway (MQTT device link), cache hit", broker.host, broker.port, (), gw.child
        )
        anchor = _anchor(broker, answer)
        try:
            assert broker.child is not None
            opts.say(
                f"  {CONNECTIONS} device connections, {opts.concurrency} in flight, {opts.n_rounds} round(s) x "
                f"{opts.measure_s:g} s"
            )
            ms = measure_targets([gateway, anchor], opts, load=load, watch={"broker": broker.child})
        finally:
            if anchor.child is not None:
                anchor.child.stop()
    g, a = ms["gateway"], ms["mqtt_raw"]
    gf = g.figures()
    res.figures = {
        "rps": gf["rps"],
        "p50_ms": gf["p50_ms"],
        "p99_ms": gf["p99_ms"],
        "server_cpu": gf["server_cpu"],
        "broker_cpu": round(g.other_cpu["broker"], 3) if "broker" in g.other_cpu else None,
        "ratio_mqtt_raw": ratio(g.rps, a.rps),
        "mqtt_raw_rps": round(a.rps, 1),
        "mqtt_raw_broker_cpu": round(a.other_cpu["broker"], 3) if "broker" in a.other_cpu else None,
        "concurrency": opts.concurrency,
        "connections": CONNECTIONS,
        "meets_goal": g.rps >= 10_000,
    }
    res.rows = comparison_rows(ms, lambda m: _round3(m.other_cpu.get("broker")))
    bad = {
        n: (m.result.errors, m.result.timeouts) for n, m in ms.items() if m.result.errors or m.result.timeouts
    }
    if bad:
        res.notes.append(
            "errors/timeouts: " + ", ".join(f"{n} {e}/{t} {ms[n].result.codes}" for n, (e, t) in bad.items())
        )
    return res


def _round3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
