"""Benchmark P5: one gateway holds 10,000 simulated devices reporting every 60 s at <= 50 % of one core.

    from tools.harness.sim.p5 import measure_p5
    r = measure_p5()                 # 10,000 devices / 60 s, 60 s window: about 75 s plus start-up
    r = measure_p5(quick=True)       # 1,000 devices / 6 s (same 166.7 reports/s), 15 s window
    r["gateway_cpu_pct_of_one_core"], r["reports_per_s"], r["acked"], r["lost"]

    python -m tools.harness.sim.p5 [--quick] [--window S] [--json]

What runs: ``ida node`` (upstream, the gateway's probe needs it) and ``ida gateway`` as real subprocesses
(``tools.harness.bench.project``), and the light simulator (:class:`tools.harness.sim.light.LightFleet`) in this process: every
device a real ``report`` over CoAP (``POST /d/<id>/rpt``, confirmable, retried) or MQTT, its schedule spread
evenly over the interval, so the gateway sees a steady ``devices / interval`` reports per second.

What is measured: the gateway process's CPU time (utime + stime from ``/proc/<pid>/stat``) over ``window``
seconds, starting ``warmup`` seconds after the fleet started (the first round of reports also creates the
devices' registry rows, so a window inside the first interval is the dearer case), divided by the window's
wall time: a fraction of one core, idle housekeeping included. Samples every 5 s give the worst 5 s too.
``acked`` counts reports acknowledged inside the window; ``lost`` counts reports of the whole run that were
never acknowledged after a drain of ``drain`` seconds at the end (still queued, rejected or dropped).

Quick mode divides both the device count and the interval by ``QUICK_SCALE`` (10): the gateway gets the same
report rate (166.7/s) from a tenth of the devices, in a 15 s window. It measures the per-report cost, not what
10,000 distinct devices add (registry rows, CoAP peer state); the full run does.

The simulator shares the machine with the gateway (``sim_cpu_pct_of_one_core`` says how much it used), and the
figure depends on what else runs: ``loadavg`` before and after is part of the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

from tools.harness.bench.procs import cpu_seconds, free_port
from tools.harness.bench.project import GatewayProcess, NodeProcess
from tools.harness.sim.config import SimConfig
from tools.harness.sim.light import LightFleet

__all__ = ["measure_p5", "P5Result", "QUICK_SCALE", "DEVICES", "INTERVAL", "GOAL_CPU_PCT"]

DEVICES = 10_000
INTERVAL = 60.0
WINDOW = 60.0
QUICK_SCALE = 10
QUICK_WINDOW = 15.0
GOAL_CPU_PCT = 50.0
SAMPLE_EVERY = 5.0
_METRIC = re.compile(rb"^ida_reports_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


class P5Result(TypedDict):
    devices: int
    interval_s: float
    transport: str
    quick: bool
    window_s: float
    reports_per_s: float  # reports acknowledged per second inside the window
    nominal_reports_per_s: float  # devices / interval
    gateway_cpu_pct_of_one_core: float
    gateway_cpu_pct_worst_5s: float
    acked: int  # inside the window
    lost: int  # whole run, after the drain
    sent: int
    retried: int
    timeouts: int
    errors: int
    ack_p50_ms: float | None
    ack_p99_ms: float | None
    sim_cpu_pct_of_one_core: float
    gateway_reports_total: int | None  # the gateway's own count (ida_reports_total) at the end
    loadavg_before: list[float]
    loadavg_after: list[float]
    meets_goal: bool


def _reports_total(http_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            m = _METRIC.search(r.read())
    except OSError:
        return None
    return int(float(m.group(1))) if m else None


async def _measure(
    cfg: SimConfig,
    gw_pid: int,
    http_port: int,
    warmup: float,
    window: float,
    quick: bool,
    say: Callable[[str], None],
) -> P5Result:
    load0 = list(os.getloadavg())
    fleet = LightFleet(cfg, log=say)
    await fleet.start()
    try:
        await asyncio.sleep(warmup)
        c0, w0, sim0 = cpu_seconds(gw_pid), time.monotonic(), time.process_time()
        k0 = fleet.counters.copy()
        fleet.take_window()
        worst = 0.0
        last_c, last_w = c0, w0
        while (left := w0 + window - time.monotonic()) > 0:
            await asyncio.sleep(min(SAMPLE_EVERY, left))
            c, w = cpu_seconds(gw_pid), time.monotonic()
            share = (c - last_c) / max(w - last_w, 1e-9)
            worst = max(worst, share)
            say(
                f"  p5: {w - w0:5.1f} s  gateway {100 * share:5.1f} % of a core  acked {fleet.counters.acked - k0.acked}"
            )
            last_c, last_w = c, w
        c1, w1, sim1 = last_c, last_w, time.process_time()
        k1 = fleet.counters.copy()
        lat = fleet.take_window()
    finally:
        result = await fleet.stop()
    acked = k1.acked - k0.acked
    span = max(w1 - w0, 1e-9)
    share = (c1 - c0) / span
    rc = result.counters
    lost = result.pending + rc.rejected + rc.dropped
    gw_total = await asyncio.to_thread(_reports_total, http_port)
    return P5Result(
        devices=cfg.devices,
        interval_s=cfg.interval,
        transport=cfg.transport,
        quick=quick,
        window_s=round(span, 2),
        reports_per_s=round(acked / span, 1),
        nominal_reports_per_s=round(cfg.devices / cfg.interval, 1),
        gateway_cpu_pct_of_one_core=round(100 * share, 1),
        gateway_cpu_pct_worst_5s=round(100 * worst, 1),
        acked=acked,
        lost=lost,
        sent=rc.sent,
        retried=rc.retried,
        timeouts=rc.timeouts,
        errors=rc.errors,
        ack_p50_ms=lat.percentile(50),
        ack_p99_ms=lat.percentile(99),
        sim_cpu_pct_of_one_core=round(100 * (sim1 - sim0) / span, 1),
        gateway_reports_total=gw_total,
        loadavg_before=[round(x, 2) for x in load0],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        meets_goal=100 * share <= GOAL_CPU_PCT and lost == 0,
    )


def measure_p5(
    *,
    devices: int = DEVICES,
    interval: float = INTERVAL,
    window: float | None = None,
    warmup: float | None = None,
    quick: bool = False,
    transport: str = "coap",
    mqtt_connections: int = 0,
    drain: float = 10.0,
    log_dir: Path | None = None,
    gateway_args: Sequence[str] = (),
    say: Callable[[str], None] | None = None,
) -> P5Result:
    """Run P5 and return its figures (see the module doc). ``quick`` divides ``devices`` and ``interval`` by
    QUICK_SCALE (same report rate) and shortens the default window to 15 s. ``transport`` "mqtt" or "mix" also
    starts a Mosquitto (one connection per device unless ``mqtt_connections``). ``gateway_args`` are extra
    ``ida gateway`` flags. Logs of the node, gateway and broker go to ``log_dir`` (a temp dir by default)."""
    if quick:
        devices = max(1, devices // QUICK_SCALE)
        interval = interval / QUICK_SCALE
    window = window if window is not None else (QUICK_WINDOW if quick else WINDOW)
    warmup = warmup if warmup is not None else (2.0 if quick else 5.0)
    say = say or (lambda _m: None)
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="ida-p5-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    http_port = free_port(socket.SOCK_STREAM)
    with contextlib.ExitStack() as stack:
        broker = ""
        if transport in ("mqtt", "mix"):
            from tools.harness.bench.broker import Mosquitto

            broker = stack.enter_context(Mosquitto(log_dir, name="p5-mosquitto")).url
        node = stack.enter_context(NodeProcess(log_dir, name="p5-node"))
        gw = stack.enter_context(
            GatewayProcess(
                log_dir,
                node.url,
                name="p5-gateway",
                mqtt=broker,
                extra=("--http", f"127.0.0.1:{http_port}", *gateway_args),
            )
        )
        assert gw.child is not None
        cfg = SimConfig(
            devices=devices,
            gateway=f"coap://{gw.host}:{gw.port}",
            broker=broker or "mqtt://127.0.0.1:1883",
            transport=transport,
            interval=interval,
            mode="light",
            data_dir=log_dir / "p5-sim",
            drain=drain,
            summary_every=0,
            mqtt_connections=mqtt_connections,
            seed=5,
        )
        say(
            f"p5: {devices} devices every {interval:g} s = {devices / interval:.1f} reports/s over {transport}, "
            f"warm-up {warmup:g} s, window {window:g} s (gateway pid {gw.child.pid})"
        )
        return asyncio.run(_measure(cfg, gw.child.pid, http_port, warmup, window, quick, say))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.harness.sim.p5", description=__doc__.split("\n")[0] if __doc__ else ""
    )
    p.add_argument(
        "--quick", action="store_true", help="a tenth of the devices at a tenth of the interval, 15 s"
    )
    p.add_argument("--devices", type=int, default=DEVICES)
    p.add_argument("--interval", type=float, default=INTERVAL)
    p.add_argument("--window", type=float, default=None)
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--transport", choices=("coap", "mqtt", "mix"), default="coap")
    p.add_argument("--mqtt-connections", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = measure_p5(
        devices=a.devices,
        interval=a.interval,
        window=a.window,
        warmup=a.warmup,
        quick=a.quick,
        transport=a.transport,
        mqtt_connections=a.mqtt_connections,
        log_dir=a.log_dir,
        say=lambda m: print(m, flush=True) if not a.json else None,
    )
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"P5: {r['devices']} devices / {r['interval_s']:g} s: {r['reports_per_s']} reports/s acked, gateway "
            f"{r['gateway_cpu_pct_of_one_core']} % of one core (worst 5 s {r['gateway_cpu_pct_worst_5s']} %), "
            f"acked {r['acked']}, lost {r['lost']}, p99 {r['ack_p99_ms']} ms, simulator "
            f"{r['sim_cpu_pct_of_one_core']} %, load {r['loadavg_before']} -> {r['loadavg_after']}"
            f" -> {'meets' if r['meets_goal'] else 'misses'} the goal (<= {GOAL_CPU_PCT:g} %)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
