"""P5: one gateway holding a fleet of simulated devices that each report every 60 s (CoAP ``POST /d/<id>/rpt``).

The fleet is open-loop and paced, as real devices are: device ``i`` of ``n`` reports at ``i/n * period`` and
every ``period`` after, each report a real ``report`` payload (id, boot, seq, uptime, heap, rssi, queue,
board, fw, sensors) sent confirmable from one of ``SOURCES`` source ports (devices behind a few NAT'd
addresses). The figure is the gateway process's CPU share (``/proc/<pid>/stat``, utime + stime, as a fraction
of one core) over the whole run, plus how many reports were acknowledged (2.04 with a ``report_ack``) and their
latency. ``--quick`` runs 10 s (a sixth of the fleet reports once), a full run one whole period (every
device reports once). There is no anchor: the goal is an absolute CPU budget.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, cast

from tools.harness.bench.coapmsg import CON, OPT_CONTENT_FORMAT, OPT_URI_PATH, encode_message, uint_value
from tools.harness.bench.loadgen import LoadResult, percentile
from tools.harness.bench.project import PREFIX, GatewayProcess, NodeProcess, require_gateway
from tools.harness.bench.scenario import BenchOptions, ScenarioResult, scenario

__all__ = ["run_p5", "FleetSpec", "run_fleet", "GOAL_P5"]

GOAL_P5 = "10,000 simulated devices reporting every 60 s at <= 50 % of one core (one gateway process)"
LIMITS_P5 = (
    "The gateway's CPU time over the run divided by the run's wall time, idle housekeeping included. A "
    "quick run (10 s) sends a sixth of the fleet's reports; a full run one period (every device once)."
)
DEVICES = 10_000
PERIOD = 60.0
SOURCES = 64
ACK_TIMEOUT = 2.0  # RFC 7252 4.8 (without the random factor)
MAX_RETRANSMIT = 4
POST = 0x02
CHANGED = 0x44
_perf_ns = time.perf_counter_ns


@dataclass(frozen=True)
class FleetSpec:
    host: str
    port: int
    devices: int = DEVICES
    period: float = PERIOD
    duration: float = 10.0
    timeout: float = 10.0  # after the last report: room for 2 retransmissions (2 s, then 4 s later)
    sources: int = SOURCES


def _report(ident: str, seq: int, uptime: int) -> bytes:
    from proto import devicemsg

    return devicemsg.encode(
        "report",
        {
            "id": ident,
            "boot": 1,
            "seq": seq,
            "uptime": uptime,
            "heap": 90_000,
            "rssi": -61,
            "queue": 0,
            "board": "esp32-devkitc",
            "fw": "0.1.0",
            "sensors": {"temp": 21.5, "ok": True},
        },
    )


class _Source(asyncio.DatagramProtocol):
    def __init__(self, fleet: _Fleet) -> None:
        self.fleet = fleet
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[bytes, int] = {}  # token -> when the report was first sent (ns)
        self.unacked: dict[bytes, list[Any]] = {}  # token -> [datagram, retransmissions, next deadline (ns)]
        self.mid = int.from_bytes(os.urandom(2), "big")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.fleet.on_datagram(self, data)


@dataclass
class _Fleet:
    spec: FleetSpec
    result: LoadResult = field(default_factory=LoadResult)
    sources: list[_Source] = field(default_factory=list)

    def on_datagram(self, src: _Source, data: bytes) -> None:
        now = _perf_ns()
        if len(data) < 4:
            return
        tkl = data[0] & 0x0F
        token = data[4 : 4 + tkl]
        kind = data[0] >> 4
        if kind == 6:  # an ACK (empty or piggybacked): the gateway has the report, stop retransmitting
            if data[1] == 0:
                self._acked_empty(src, data)
            else:
                src.unacked.pop(token, None)
        elif (
            kind == 4 and src.transport is not None
        ):  # a separate CON response: acknowledge it, as a device does
            src.transport.sendto(b"\x60\x00" + data[2:4])
        t0 = src.pending.pop(token, None)
        if t0 is None:
            if data[1] != 0:  # an empty ACK is not an answer
                self.result.unmatched += 1
            return
        if data[1] == CHANGED:
            self.result.ok += 1
            self.result.latencies_ns.append(now - t0)
        else:
            self.result.errors += 1
            code = f"{data[1] >> 5}.{data[1] & 31:02d}"
            self.result.codes[code] = self.result.codes.get(code, 0) + 1

    @staticmethod
    def _acked_empty(src: _Source, data: bytes) -> None:
        mid = data[2:4]
        for token, entry in list(src.unacked.items()):
            if entry[0][2:4] == mid:
                del src.unacked[token]
                return

    def retransmit(self, now: int) -> None:
        """Send again what is neither acknowledged nor answered, as a CoAP device does (RFC 7252 4.2: ACK_TIMEOUT
        2 s doubling, MAX_RETRANSMIT 4)."""
        for src in self.sources:
            for token, entry in list(src.unacked.items()):
                if token not in src.pending or entry[1] >= MAX_RETRANSMIT:
                    del src.unacked[token]
                elif now >= entry[2]:
                    entry[1] += 1
                    entry[2] = now + int(ACK_TIMEOUT * 2 ** entry[1] * 1e9)
                    assert src.transport is not None
                    src.transport.sendto(entry[0])
                    self.result.retransmits += 1

    def send(self, i: int, seq: int, elapsed: float) -> None:
        src = self.sources[i % len(self.sources)]
        src.mid = (src.mid + 1) & 0xFFFF
        token = src.mid.to_bytes(2, "big") + (i & 0xFFFF).to_bytes(2, "big")
        suffix = f"SIM-{i:05d}"
        ident = f"{PREFIX}/{suffix}"
        opts = [
            (OPT_URI_PATH, b"d"),
            (OPT_URI_PATH, PREFIX.encode()),
            (OPT_URI_PATH, suffix.encode()),
            (OPT_URI_PATH, b"rpt"),
            (OPT_CONTENT_FORMAT, uint_value(60)),
        ]
        data = encode_message(
            CON, POST, src.mid, token, opts, _report(ident, seq, int(elapsed) + 1000 + i % 977)
        )
        now = src.pending[token] = _perf_ns()
        src.unacked[token] = [data, 0, now + int(ACK_TIMEOUT * 1e9)]
        assert src.transport is not None
        src.transport.sendto(data)
        self.result.sent += 1


async def run_fleet(spec: FleetSpec) -> LoadResult:
    """Pace ``spec.devices`` reports per ``spec.period`` for ``spec.duration`` s, then wait for the answers."""
    loop = asyncio.get_running_loop()
    fleet = _Fleet(spec)
    for _ in range(spec.sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((spec.host, spec.port))
        sock.setblocking(False)
        src = _Source(fleet)
        await loop.create_datagram_endpoint(lambda s=src: s, sock=sock)  # type: ignore[misc]
        fleet.sources.append(src)
    gap = spec.period / spec.devices
    total = int(spec.duration / gap)
    cpu0 = time.process_time()
    t0 = time.monotonic()

    async def retransmissions() -> None:
        while True:
            await asyncio.sleep(0.1)
            fleet.retransmit(_perf_ns())

    resender = loop.create_task(retransmissions())
    try:
        for n in range(total):
            due = t0 + n * gap
            delay = due - time.monotonic()
            if delay > 0.002:
                await asyncio.sleep(delay)
            i = n % spec.devices
            fleet.send(i, 1 + n // spec.devices, time.monotonic() - t0)
        end = time.monotonic() + spec.timeout
        while any(s.pending for s in fleet.sources) and time.monotonic() < end:
            await asyncio.sleep(0.02)
    finally:
        resender.cancel()
        for s in fleet.sources:
            if s.transport is not None:
                s.transport.close()
    res = fleet.result
    res.timeouts = sum(len(s.pending) for s in fleet.sources)
    res.elapsed_s = time.monotonic() - t0
    res.cpu_s = time.process_time() - cpu0
    res.endpoints = len(fleet.sources)
    return res


@scenario("P5", "a fleet reporting every 60 s: gateway CPU share", GOAL_P5, LIMITS_P5)
def run_p5(opts: BenchOptions) -> ScenarioResult:
    require_gateway()
    log_dir = opts.logs()
    res = ScenarioResult(
        "P5", "a fleet reporting every 60 s: gateway CPU share", GOAL_P5, columns=("figure", "value")
    )
    duration = (
        opts.duration if opts.duration is not None and not opts.quick else (10.0 if opts.quick else PERIOD)
    )
    with (
        NodeProcess(log_dir, name="p5-node") as node,
        GatewayProcess(log_dir, node.url, name="p5-gateway") as gw,
    ):
        assert gw.child is not None
        spec = FleetSpec(gw.host, gw.port, duration=duration)
        opts.say(
            f"  {spec.devices} devices every {spec.period:g} s = {spec.devices / spec.period:.0f} reports/s "
            f"for {duration:g} s"
        )
        c0, w0 = gw.child.cpu_seconds(), time.monotonic()
        r = asyncio.run(run_fleet(spec))
        c1, w1 = gw.child.cpu_seconds(), time.monotonic()
    share = (c1 - c0) / (w1 - w0)
    lat = sorted(r.latencies_ns)
    res.figures = {
        "gateway_cpu": round(share, 3),
        "devices": spec.devices,
        "period_s": spec.period,
        "reports_per_s": round(spec.devices / spec.period, 1),
        "duration_s": round(duration, 1),
        "reports_sent": r.sent,
        "reports_acked": r.ok,
        "errors": r.errors,
        "timeouts": r.timeouts,
        "retransmits": r.retransmits,
        "p50_ms": round(percentile(lat, 50), 3) if lat else None,
        "p99_ms": round(percentile(lat, 99), 3) if lat else None,
        "cpu_ms_per_report": round((c1 - c0) * 1000 / r.ok, 3) if r.ok else None,
        "meets_goal": share <= 0.5 and r.ok == r.sent,
    }
    res.rows = [
        ("**gateway CPU share (fraction of one core)**", round(share, 3)),
        ("reports sent / acknowledged (2.04)", f"{r.sent} / {r.ok}"),
        ("errors / timeouts", f"{r.errors} / {r.timeouts}"),
        ("retransmissions (CON, ACK_TIMEOUT 2 s)", r.retransmits),
        ("report latency p50 / p99 ms", f"{res.figures['p50_ms']} / {res.figures['p99_ms']}"),
        ("gateway CPU per report, ms", res.figures["cpu_ms_per_report"]),
    ]
    if r.codes:
        res.notes.append(f"error codes: {r.codes}")
    res.notes.append(
        f"fleet generator CPU {r.cpu_s / max(r.elapsed_s, 1e-9):.2f} of a core; the gateway's share "
        "includes its idle housekeeping"
    )
    return res
