"""Counters, latency histograms and the summary a fleet run prints (periodic one-liners and the final result).

A run can last hours at thousands of reports per minute, so latencies go into a log-bucketed histogram (4 %
wide buckets from 10 us to ~10 min: percentiles are within 2 % of the exact figure) instead of a growing list.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from proto import devicemsg

__all__ = ["Histogram", "Counters", "SimResult", "format_line", "format_final"]

_BASE_MS = 0.01
_GROWTH = 1.04
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = 460  # 0.01 ms * 1.04**460 ~ 680 s


class Histogram:
    """Latencies in milliseconds; ``percentile(p)`` is the (geometric) middle of the bucket holding it."""

    __slots__ = ("counts", "n", "max_ms")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.n = 0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        i = int(math.log(ms / _BASE_MS) / _LOG_GROWTH) if ms > _BASE_MS else 0
        self.counts[min(i, _BUCKETS - 1)] += 1
        self.n += 1
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.n += other.n
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, p: float) -> float | None:
        if not self.n:
            return None
        rank = max(1, math.ceil(self.n * p / 100.0))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                mid = _BASE_MS * _GROWTH ** (i + 0.5)
                return round(min(mid, self.max_ms), 3)
        return round(self.max_ms, 3)  # pragma: no cover - ranks never exceed n


@dataclass
class Counters:
    """What a fleet did. Reports: ``made`` (queued by a device), ``sent`` (first transmission), ``acked``
    (report_ack code 1, once per report), ``retried`` (a report sent again after no answer or a 5.xx/4.29, or a
    CoAP retransmission), ``rejected`` (a 4.xx answer: dropped), ``dropped`` (oldest report out of a full
    device queue). ``timeouts`` counts exchanges that got no answer at all, ``errors`` every other failure
    (error codes, socket errors, lost connections), ``late`` answers that arrived after the device gave up;
    ``busy`` the CoAP 5.03 answers with a Max-Age (the gateway's "come back later": the device waited that long)."""

    made: int = 0
    sent: int = 0
    acked: int = 0
    retried: int = 0
    retransmits: int = 0
    rejected: int = 0
    dropped: int = 0
    timeouts: int = 0
    errors: int = 0
    late: int = 0
    busy: int = 0
    resolves: int = 0
    resolves_ok: int = 0
    resolves_not_found: int = 0
    resolves_not_modified: int = 0
    resolve_errors: int = 0
    configs: int = 0
    connects: int = 0
    disconnects: int = 0

    def copy(self) -> Counters:
        return Counters(**asdict(self))

    def count_resolve(self, code: int) -> bool:
        """One resolve's outcome by its docs/protocol.md code (the caller counts ``resolves`` when it asks): True
        for an answer (found, not modified, not found), False for an error (counted in ``resolve_errors``)."""
        if code == devicemsg.OK:
            self.resolves_ok += 1
        elif code == devicemsg.NOT_MODIFIED:
            self.resolves_not_modified += 1
        elif code in (devicemsg.NOT_FOUND, devicemsg.VALUES_NOT_FOUND):
            self.resolves_not_found += 1
        else:
            self.resolve_errors += 1
            return False
        return True

    def minus(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


@dataclass
class SimResult:
    """A snapshot of a run (``to_dict()`` is the ``--json`` form)."""

    mode: str
    transport: str
    devices: int
    elapsed_s: float
    counters: Counters = field(default_factory=Counters)
    pending: int = 0  # reports made but not acknowledged (still queued on the devices)
    online: int | None = None  # devices with a working transport (MQTT connected / firmware transport on)
    ack_ms: Histogram = field(default_factory=Histogram, repr=False)
    resolve_ms: Histogram = field(default_factory=Histogram, repr=False)
    sim_cpu_s: float = 0.0
    processes: int = 0  # firmware processes still running when the snapshot was taken
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        c = self.counters
        return {
            "mode": self.mode,
            "transport": self.transport,
            "devices": self.devices,
            "elapsed_s": round(self.elapsed_s, 3),
            "online": self.online,
            "reports": {
                "made": c.made,
                "sent": c.sent,
                "acked": c.acked,
                "retried": c.retried,
                "retransmits": c.retransmits,
                "rejected": c.rejected,
                "dropped": c.dropped,
                "pending": self.pending,
                "late": c.late,
                "busy": c.busy,
            },
            "ack_latency_ms": {
                "p50": self.ack_ms.percentile(50),
                "p99": self.ack_ms.percentile(99),
                "max": round(self.ack_ms.max_ms, 3) if self.ack_ms.n else None,
                "n": self.ack_ms.n,
            },
            "resolves": {
                "total": c.resolves,
                "ok": c.resolves_ok,
                "not_modified": c.resolves_not_modified,
                "not_found": c.resolves_not_found,
                "errors": c.resolve_errors,
                "p50_ms": self.resolve_ms.percentile(50),
                "p99_ms": self.resolve_ms.percentile(99),
            },
            "configs_applied": c.configs,
            "timeouts": c.timeouts,
            "errors": c.errors,
            "connects": c.connects,
            "disconnects": c.disconnects,
            "reports_per_s": round(c.acked / self.elapsed_s, 2) if self.elapsed_s > 0 else 0.0,
            "sim_cpu_pct_of_one_core": round(100 * self.sim_cpu_s / self.elapsed_s, 1)
            if self.elapsed_s > 0
            else 0.0,
            "notes": list(self.notes),
        }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_line(r: SimResult, window: Counters | None = None, window_ms: Histogram | None = None) -> str:
    """One periodic line: totals, plus the latency of the last window when given."""
    c = r.counters
    lat = window_ms if window_ms is not None and window_ms.n else r.ack_ms
    online = "" if r.online is None else f" online {r.online}"
    rate = ""
    if window is not None:
        rate = f" (+{window.acked})"
    return (
        f"[{r.elapsed_s:6.1f}s] {r.devices} devices{online} | reports sent {c.sent} acked {c.acked}{rate} "
        f"retried {c.retried} pending {r.pending} | resolves {c.resolves} | errors {c.errors} "
        f"timeouts {c.timeouts} | ack p50 {_ms(lat.percentile(50))} ms p99 {_ms(lat.percentile(99))} ms"
    )


def format_final(r: SimResult) -> str:
    d = r.to_dict()
    rep, lat, res = d["reports"], d["ack_latency_ms"], d["resolves"]
    lines = [
        f"sim: {r.devices} devices ({r.mode}, {r.transport}) for {r.elapsed_s:.1f} s",
        f"  reports   made {rep['made']}  sent {rep['sent']}  acked {rep['acked']}  retried {rep['retried']} "
        f"(coap retransmits {rep['retransmits']})  rejected {rep['rejected']}  dropped {rep['dropped']}  "
        f"pending {rep['pending']}  late answers {rep['late']}",
        f"  ack latency  p50 {_ms(lat['p50'])} ms  p99 {_ms(lat['p99'])} ms  max {_ms(lat['max'])} ms  "
        f"({d['reports_per_s']} acked reports/s)",
        f"  resolves  {res['total']} (ok {res['ok']}, not modified {res['not_modified']}, not found "
        f"{res['not_found']}, errors {res['errors']})  p50 {_ms(res['p50_ms'])} ms",
        f"  errors {d['errors']}  timeouts {d['timeouts']}  configs applied {d['configs_applied']}  "
        f"connects {d['connects']}  disconnects {d['disconnects']}  sim CPU {d['sim_cpu_pct_of_one_core']} % of a core",
    ]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
