"""What a load run measured (:class:`LoadResult`: counts and latencies, several workers merged) and the percentile
the reports use -- shared by the CoAP load generator (``loadgen.py``) and the MQTT ones (``mqttload.py``,
``mqttreports.py``)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoadResult", "NS", "percentile"]

NS = 1_000_000_000


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of sorted nanoseconds, in milliseconds; nan when empty."""
    if not sorted_ns:
        return math.nan
    k = max(0, min(len(sorted_ns) - 1, math.ceil(q / 100 * len(sorted_ns)) - 1))
    return sorted_ns[k] / 1e6


@dataclass
class LoadResult:
    """Counts and latencies of one run (or several merged). Only requests completed in the window count."""

    ok: int = 0  # 2.xx responses
    errors: int = 0  # other codes, RST
    timeouts: int = 0  # no response after the last retransmission
    sent: int = 0  # requests started (first transmissions), whole run
    retransmits: int = 0
    unmatched: int = 0  # responses for no request in flight (late, duplicate, garbage)
    endpoints: int = 0  # source ports used
    elapsed_s: float = 0.0  # measurement window
    codes: dict[str, int] = field(default_factory=dict)
    latencies_ns: array = field(default_factory=lambda: array("q"))
    workers: int = 1
    cpu_s: float = 0.0  # CPU time of the generator process(es) over the whole run
    acked: dict[str, int] = field(
        default_factory=dict
    )  # report mode: device -> last seq acknowledged (whole run)

    @property
    def completed(self) -> int:
        return self.ok + self.errors + self.timeouts

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def sorted_latencies(self) -> list[int]:
        return sorted(self.latencies_ns)

    @property
    def p50_ms(self) -> float:
        return percentile(self.sorted_latencies(), 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.sorted_latencies(), 99)

    def summary(self) -> dict[str, Any]:
        lat = self.sorted_latencies()
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(percentile(lat, 50), 3),
            "p99_ms": round(percentile(lat, 99), 3),
            "ok": self.ok,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "retransmits": self.retransmits,
            "elapsed_s": round(self.elapsed_s, 3),
            "codes": dict(self.codes),
            "workers": self.workers,
            "loadgen_cpu": round(self.cpu_s / self.elapsed_s, 3) if self.elapsed_s > 0 else None,
        }

    @classmethod
    def merge(cls, parts: Sequence[LoadResult]) -> LoadResult:
        """Workers ran side by side over the same window: counts add up, the window is the longest."""
        out = cls(workers=len(parts))
        for p in parts:
            out.ok += p.ok
            out.errors += p.errors
            out.timeouts += p.timeouts
            out.sent += p.sent
            out.retransmits += p.retransmits
            out.unmatched += p.unmatched
            out.endpoints += p.endpoints
            out.cpu_s += p.cpu_s
            out.elapsed_s = max(out.elapsed_s, p.elapsed_s)
            for k, v in p.codes.items():
                out.codes[k] = out.codes.get(k, 0) + v
            out.acked.update(p.acked)
            out.latencies_ns.extend(p.latencies_ns)
        return out

    def to_wire(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "ok",
                "errors",
                "timeouts",
                "sent",
                "retransmits",
                "unmatched",
                "endpoints",
                "elapsed_s",
                "codes",
                "workers",
                "cpu_s",
                "acked",
            )
        }
        d["latencies"] = self.latencies_ns.tobytes()
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> LoadResult:
        lat = array("q")
        lat.frombytes(d.pop("latencies"))
        return cls(latencies_ns=lat, **d)
