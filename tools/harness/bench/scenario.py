"""The scenario framework: options, results, the registry of scenarios, and measuring targets side by side.

A scenario is a function ``(BenchOptions) -> ScenarioResult`` registered with :func:`scenario`. It starts
its own processes (project and anchors), measures them under the same load generator in the same run, and
returns figures (for ``--json``), table rows (for the text and Markdown report) and notes. A scenario that
cannot run raises :class:`tools.harness.bench.procs.BenchError` (or returns :func:`skipped`); the report then says
why -- never a made-up number.

Measuring (:func:`measure_targets`): every target is measured ``rounds`` times, the order rotating each
round so a slow patch of the (shared, noisy) machine does not hit one target only; each target's figure is
its best round (other load on the machine only ever slows a run down, so the best round is the least
disturbed one). The CPU the rest of the machine used meanwhile (``/proc/stat`` minus the processes of
the measurement; interrupt and softirq time included) is recorded as ``other`` load, in cores. The server's CPU share (``/proc/<pid>/stat``, fraction of one core over the load run) is
recorded with every figure: a server below ~0.9 was not saturated (the machine or the load generator was
the limit) -- ``rps_per_cpu`` (requests per CPU-second of the server) is the saturation-independent
cross-check.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.harness.bench.anchors import Target
from tools.harness.bench.loadgen import LoadSpec, run_load
from tools.harness.bench.loadresult import LoadResult
from tools.harness.bench.procs import BenchError, Child, machine_busy

__all__ = [
    "BenchOptions",
    "Measurement",
    "ScenarioResult",
    "Scenario",
    "SCENARIOS",
    "scenario",
    "skipped",
    "measure_targets",
    "comparison_rows",
    "run_scenarios",
    "ratio",
]

Figure = float | int | str | bool | None


@dataclass
class BenchOptions:
    """Run-wide settings. ``None`` fields take the quick or full default."""

    quick: bool = False
    workers: int = 1  # load generator processes
    concurrency: int = 32
    duration: float | None = None  # seconds per measurement
    warmup: float | None = None
    rounds: int | None = None
    log_dir: Path | None = None
    verbose: bool = False
    progress: Callable[[str], None] | None = None

    @property
    def measure_s(self) -> float:
        return self.duration if self.duration is not None else (0.6 if self.quick else 5.0)

    @property
    def warmup_s(self) -> float:
        return self.warmup if self.warmup is not None else (0.2 if self.quick else 1.0)

    @property
    def n_rounds(self) -> int:
        return self.rounds if self.rounds is not None else (2 if self.quick else 3)

    def logs(self) -> Path:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="ida-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)


@dataclass
class Measurement:
    """One target's figure: its best round, plus every round's throughput."""

    name: str
    label: str
    result: LoadResult
    server_cpu: float | None  # fraction of one core used by the server process during the load run
    rounds_rps: list[float] = field(default_factory=list)
    other_cpu: dict[str, float] = field(default_factory=dict)  # load generator, watched processes (broker)

    @property
    def rps(self) -> float:
        return self.result.rps

    @property
    def rps_per_cpu(self) -> float | None:
        if not self.server_cpu:
            return None
        return self.rps / self.server_cpu

    def figures(self) -> dict[str, Figure]:
        r = self.result
        return {
            "rps": round(r.rps, 1),
            "p50_ms": _r3(r.p50_ms),
            "p99_ms": _r3(r.p99_ms),
            "server_cpu": None if self.server_cpu is None else round(self.server_cpu, 3),
            "rps_per_cpu": None if self.rps_per_cpu is None else round(self.rps_per_cpu, 1),
            "loadgen_cpu": round(self.other_cpu["loadgen"], 3) if "loadgen" in self.other_cpu else None,
            "other_load": round(self.other_cpu["other"], 2) if "other" in self.other_cpu else None,
            "errors": r.errors,
            "timeouts": r.timeouts,
        }


def _r3(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def comparison_rows(
    ms: dict[str, Measurement], *extra: Callable[[Measurement], Figure]
) -> list[tuple[Any, ...]]:
    """One table row per target measured side by side: its label (the gateway's in bold), req/s, p50 and p99 ms,
    the server's CPU share, the ``extra`` columns, and the gateway's throughput divided by this one's."""
    g = ms["gateway"]
    rows: list[tuple[Any, ...]] = []
    for name, m in ms.items():
        f = m.figures()
        rows.append(
            (
                m.label if name != "gateway" else f"**{m.label}**",
                f["rps"],
                f["p50_ms"],
                f["p99_ms"],
                f["server_cpu"],
                *(column(m) for column in extra),
                "" if name == "gateway" else ratio(g.rps, m.rps),
            )
        )
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to 3 places; None when either is missing or b is 0."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)


@dataclass
class ScenarioResult:
    key: str
    title: str
    goal: str
    figures: dict[str, Figure] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    limits: str = ""  # what limits the figure (Markdown report)

    def as_json(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        out: dict[str, Any] = dict(self.figures)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


ScenarioFn = Callable[[BenchOptions], ScenarioResult]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    goal: str
    fn: ScenarioFn
    limits: str = ""


SCENARIOS: dict[str, Scenario] = {}


def scenario(key: str, title: str, goal: str, limits: str = "") -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario function under ``key`` (``"P1"``...); ``limits`` says what limits its figure."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        SCENARIOS[key] = Scenario(key, title, goal, fn, limits)
        return fn

    return register


def skipped(key: str, why: str) -> ScenarioResult:
    sc = SCENARIOS[key]
    return ScenarioResult(key, sc.title, sc.goal, skipped=why)


def _cpu(child: Child | None) -> float | None:
    if child is None or not child.alive():
        return None
    try:
        return child.cpu_seconds()
    except OSError:
        return None


def measure_once(
    t: Target,
    load: Callable[[], LoadResult],
    watch: dict[str, Child] | None = None,
) -> tuple[LoadResult, float | None, dict[str, float]]:
    """Run ``load``; the target's CPU share and each watched process's over the run."""
    watch = watch or {}
    b0, c0, w0 = machine_busy(), _cpu(t.child), time.monotonic()
    o0 = {k: _cpu(c) for k, c in watch.items()}
    res = load()
    b1, c1, w1 = machine_busy(), _cpu(t.child), time.monotonic()
    o1 = {k: _cpu(c) for k, c in watch.items()}
    if t.child is not None and not t.child.alive():
        raise t.child.fail("died under load")
    share = None if c0 is None or c1 is None else (c1 - c0) / (w1 - w0)
    others = {"loadgen": res.cpu_s / (w1 - w0)}
    for k, v in o0.items():
        after = o1[k]
        if v is not None and after is not None:
            others[k] = (after - v) / (w1 - w0)
    if b0 is not None and b1 is not None:  # everything else the machine did meanwhile (other users' work)
        others["other"] = max(0.0, (b1 - b0) / (w1 - w0) - (share or 0.0) - sum(others.values()))
    return res, share, others


def coap_load(
    t: Target, opts: BenchOptions, *, concurrency: int | None = None, confirmable: bool = True
) -> Callable[[], LoadResult]:
    spec = LoadSpec(
        t.host,
        t.port,
        t.paths,
        concurrency=concurrency or opts.concurrency,
        duration=opts.measure_s,
        warmup=opts.warmup_s,
        confirmable=confirmable,
    )
    return lambda: run_load(spec, workers=opts.workers)


def measure_targets(
    targets: Sequence[Target],
    opts: BenchOptions,
    *,
    load: Callable[[Target], Callable[[], LoadResult]] | None = None,
    watch: dict[str, Child] | None = None,
) -> dict[str, Measurement]:
    """Measure each target ``opts.n_rounds`` times in rotating order; each target's best round.

    ``load(target)`` gives the function that runs one measurement (default: the CoAP generator with the
    run's options); ``watch`` names other processes whose CPU share is recorded too (e.g. the broker)."""
    make = load or (lambda t: coap_load(t, opts))
    runs: dict[str, list[tuple[LoadResult, float | None, dict[str, float]]]] = {t.name: [] for t in targets}
    n = len(targets)
    for rnd in range(opts.n_rounds):
        for i in range(n):
            t = targets[(i + rnd) % n]
            res, share, others = measure_once(t, make(t), watch)
            extra = "".join(f"  {k} cpu {v:.2f}" for k, v in others.items())
            opts.say(
                f"  {t.name:<14} round {rnd + 1}: {res.rps:9.0f} req/s  p50 {res.p50_ms:7.3f} ms  "
                f"p99 {res.p99_ms:7.3f} ms  server cpu {share if share is not None else float('nan'):.2f}{extra}"
            )
            runs[t.name].append((res, share, others))
    out = {}
    for t in targets:
        rs = runs[t.name]
        best = max(rs, key=lambda x: x[0].rps)
        out[t.name] = Measurement(
            t.name, t.label, best[0], best[1], [round(r.rps, 1) for r, _, _ in rs], best[2]
        )
    return out


def run_scenarios(keys: Sequence[str], opts: BenchOptions) -> list[ScenarioResult]:
    """Run the named scenarios in order; a failing one becomes a skipped result saying why."""
    results = []
    for key in keys:
        sc = SCENARIOS[key]
        opts.say(f"{key}: {sc.title}")
        t0 = time.monotonic()
        try:
            res = sc.fn(opts)
        except BenchError as e:
            res = skipped(key, str(e))
        res.seconds = round(time.monotonic() - t0, 1)
        res.limits = res.limits or sc.limits
        results.append(res)
    return results


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan
