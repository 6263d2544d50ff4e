"""Per-node counters of the upstream pool: a Prometheus-style latency histogram and a snapshot of a node."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "Histogram", "NodeStats"]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(slots=True)
class Histogram:
    """A Prometheus-style histogram: ``counts[i]`` observations <= ``buckets[i]`` (non-cumulative), the last
    count is the +Inf overflow. :meth:`cumulative` gives the ``_bucket{le=...}`` series."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1  # first bucket with value <= bound
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """[(le, count <= le), ..., (inf, total)]."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.sum, self.count)


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A snapshot of one node's counters (for ``ida_upstream_*{node=...}`` metrics)."""

    node: str
    requests: int
    answers: int
    failures: int
    cancelled: int
    consecutive_failures: int
    healthy: bool
    latency_ewma: float | None
    latency: Histogram
