"""Counters, gauges and histograms of the gateway, rendered in the Prometheus text format 0.0.4.

One :class:`Metrics` object per gateway (no module-level state), handed to every front end. Front ends count
their requests with :meth:`Metrics.count_request`; components that keep their own counters (the resolver's
cache, the device registry) are read at scrape time through *collectors*: callables returning
``(name, labels, value)`` samples for families declared here. Thread-safe (the MQTT client calls back from its
network thread).

    m = Metrics()
    m.count_request("coap", wire.OK)
    m.observe_upstream("hdl://10.0.0.1:2641", 0.012)
    text = m.render()
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upstream round trips: sub-millisecond (local node) to the 1.8 s client timeout and beyond.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Labels = tuple[tuple[str, str], ...]

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

# name -> (type, help). Declared up front so a scrape always shows every family, even before the first event.
STANDARD: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ida_requests_total": (
        COUNTER,
        "Requests answered, by front end (coap, mqtt, http) and result code (docs/protocol.md codes).",
        ("frontend", "code"),
    ),
    "ida_cache_hits_total": (COUNTER, "Resolutions answered from the cache.", ()),
    "ida_cache_misses_total": (COUNTER, "Resolutions that had to ask an upstream node.", ()),
    "ida_cache_stale_total": (COUNTER, "Stale answers served because every upstream failed.", ()),
    "ida_cache_prefetches_total": (
        COUNTER,
        "Refreshes started for entries hit near the end of their lifetime.",
        (),
    ),
    "ida_cache_evictions_total": (COUNTER, "Entries evicted to stay within the entry and byte limits.", ()),
    "ida_cache_entries": (GAUGE, "Answers in the cache.", ()),
    "ida_upstream_requests_total": (COUNTER, "Requests sent to each upstream node.", ("node",)),
    "ida_upstream_latency_seconds": (HISTOGRAM, "Round-trip time of upstream requests, by node.", ("node",)),
    "ida_devices_online": (GAUGE, "Devices whose last known status is online.", ()),
    "ida_outbox_depth": (GAUGE, "Reports waiting to go northbound.", ()),
    "ida_reports_total": (COUNTER, "Reports accepted (new, not duplicates).", ()),
    "ida_reports_duplicate_total": (COUNTER, "Reports received again and acknowledged without storing.", ()),
    "ida_reports_overloaded_total": (
        COUNTER,
        "Reports refused at once because too many waited for their commit (CoAP 5.03, MQTT no ack), by front end.",
        ("frontend",),
    ),
    "ida_ratelimited_total": (
        COUNTER,
        "Requests refused by a rate limit (CoAP 4.29, HTTP 429, MQTT dropped), by front end and limit (device, source).",
        ("frontend", "limit"),
    ),
}


@dataclass(frozen=True, slots=True)
class HistogramSample:
    """One histogram series: ``cumulative`` = [(upper bound, observations <= bound), ...] without +Inf."""

    cumulative: tuple[tuple[float, int], ...]
    sum: float
    count: int


Value = float | HistogramSample
Sample = tuple[str, Mapping[str, str], Value]
Collector = Callable[[], Iterable[Sample]]


@dataclass(slots=True)
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int]  # non-cumulative; observations above the last bound only count in ``count``
    total: float = 0.0
    count: int = 0

    def sample(self) -> HistogramSample:
        running, out = 0, []
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append((bound, running))
        return HistogramSample(tuple(out), self.total, self.count)


@dataclass(slots=True)
class _Family:
    kind: str
    help: str
    labelled: bool
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    values: dict[Labels, float] = field(default_factory=dict)
    histograms: dict[Labels, _Histogram] = field(default_factory=dict)


def _labels(labels: Mapping[str, str] | None) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items())) if labels else ()


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._collectors: list[Collector] = []
        self._adders: list[Collector] = []
        for name, (kind, help_text, labelnames) in STANDARD.items():
            self.declare(name, kind, help_text, labelnames)

    # -- declaring ---------------------------------------------------------------------------------------
    def declare(
        self,
        name: str,
        kind: str,
        help_text: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        """Add a metric family (idempotent for the same type). An unlabelled family renders 0 until set."""
        if kind not in (COUNTER, GAUGE, HISTOGRAM):
            raise ValueError(f"unknown metric type {kind!r}")
        with self._lock:
            old = self._families.get(name)
            if old is not None:
                if old.kind != kind:
                    raise ValueError(f"metric {name} already declared as a {old.kind}")
                return
            self._families[name] = _Family(kind, help_text, bool(labelnames), tuple(sorted(buckets)))

    def add_collector(self, collector: Collector, *, add: bool = False) -> None:
        """Called at every :meth:`render`; its samples (float, or HistogramSample for a histogram) replace the
        series of declared families with the same name and labels. With ``add=True`` its (float) samples are
        added to the series instead, after every replacing collector ran: counts kept outside (e.g. the CoAP
        fast path's integer counters) on top of those counted here."""
        with self._lock:
            (self._adders if add else self._collectors).append(collector)

    # -- recording ---------------------------------------------------------------------------------------
    def inc(self, name: str, value: float = 1.0, labels: Mapping[str, str] | None = None) -> None:
        key = _labels(labels)
        with self._lock:
            fam = self._family(name, COUNTER)
            fam.values[key] = fam.values.get(key, 0.0) + value

    def set(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._family(name, GAUGE).values[_labels(labels)] = float(value)

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        key = _labels(labels)
        with self._lock:
            fam = self._family(name, HISTOGRAM)
            h = fam.histograms.get(key)
            if h is None:
                h = fam.histograms[key] = _Histogram(fam.buckets, [0] * len(fam.buckets))
            i = bisect.bisect_left(h.buckets, value)
            if i < len(h.counts):
                h.counts[i] += 1
            h.total += value
            h.count += 1

    def count_request(self, frontend: str, code: int) -> None:
        """One answered request of a front end (``coap``, ``mqtt``, ``http``) with its wire result code."""
        self.inc("ida_requests_total", 1.0, {"frontend": frontend, "code": str(code)})

    def count_ratelimited(self, frontend: str, limit: str) -> None:
        """One request refused by a rate limit (``limit``: "device" or "source")."""
        self.inc("ida_ratelimited_total", 1.0, {"frontend": frontend, "limit": limit})

    def observe_upstream(self, node: str, seconds: float) -> None:
        """One upstream round trip: counts the request and records its latency."""
        self.inc("ida_upstream_requests_total", 1.0, {"node": node})
        self.observe("ida_upstream_latency_seconds", seconds, {"node": node})

    def _family(self, name: str, kind: str) -> _Family:
        fam = self._families.get(name)
        if fam is None:
            raise KeyError(f"metric {name} is not declared")
        if fam.kind != kind:
            raise TypeError(f"metric {name} is a {fam.kind}, not a {kind}")
        return fam

    # -- reading -----------------------------------------------------------------------------------------
    def value(self, name: str, labels: Mapping[str, str] | None = None) -> Value:
        """Current value of a sample (after collectors): a float, or a HistogramSample; 0 when never set."""
        return self._snapshot().get(name, {}).get(_labels(labels), 0.0)

    def _snapshot(self) -> dict[str, dict[Labels, Value]]:
        with self._lock:
            collectors = list(self._collectors)
            adders = list(self._adders)
            out: dict[str, dict[Labels, Value]] = {}
            for name, fam in self._families.items():
                series: dict[Labels, Value] = dict(fam.values)
                series.update((k, h.sample()) for k, h in fam.histograms.items())
                out[name] = series
        for collect in collectors:
            try:
                samples = list(collect())
            except Exception:  # a broken collector must not take /metrics down with it
                log.exception("metrics collector %r failed", collect)
                continue
            for name, labels, value in samples:
                if name in out:
                    out[name][_labels(labels)] = value if isinstance(value, HistogramSample) else float(value)
        for collect in adders:
            try:
                samples = list(collect())
            except Exception:
                log.exception("metrics collector %r failed", collect)
                continue
            for name, labels, value in samples:
                target = out.get(name)
                if target is not None and not isinstance(value, HistogramSample):
                    key = _labels(labels)
                    old = target.get(key, 0.0)
                    target[key] = (0.0 if isinstance(old, HistogramSample) else old) + float(value)
        return out

    def render(self) -> str:
        """The exposition text (format 0.0.4)."""
        snapshot = self._snapshot()
        with self._lock:
            families = [(n, f.kind, f.help, f.labelled) for n, f in self._families.items()]
        lines: list[str] = []
        for name, kind, help_text, labelled in families:
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            series = snapshot.get(name, {})
            if not series and not labelled and kind != HISTOGRAM:
                series = {(): 0.0}
            for key, v in sorted(series.items()):
                if isinstance(v, HistogramSample):
                    for bound, n in v.cumulative:
                        lines.append(f"{name}_bucket{_fmt_labels(key + (('le', _num(bound)),))} {n}")
                    lines.append(f"{name}_bucket{_fmt_labels(key + (('le', '+Inf'),))} {v.count}")
                    lines.append(f"{name}_sum{_fmt_labels(key)} {_num(v.sum)}")
                    lines.append(f"{name}_count{_fmt_labels(key)} {v.count}")
                elif kind != HISTOGRAM:
                    lines.append(f"{name}{_fmt_labels(key)} {_num(v)}")
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def _escape_help(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_labels(key: Labels) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in key) + "}"
