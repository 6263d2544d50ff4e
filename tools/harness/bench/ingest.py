"""P6's storage anchor and the registry's ingest engine, measured in one run (in this process).

    from tools.harness.bench.ingest import run_ingest
    fig = run_ingest(reports=20_000, devices=2_000, sink=True, rounds=3)
    fig.as_dict()   # {"reports_per_s", "cpu_us_per_report", "sqlite_rows_per_s", "ratio_sqlite", "lost", ...}

* **Ceiling** (:func:`measure_ceiling`): the registry's own SQLite file -- schema made by ``gateway.registry.
  Registry``, opened by ``gateway.outbox.connect`` (WAL, ``synchronous=FULL``) -- and one ``reports`` row per
  report inserted by a bare loop, ``batch`` rows per transaction (``executemany``, one fsync each; by default as
  many as the engine's batches held in the same round). No de-duplication, no device row, no outbox: the most
  SQLite does for one row per report here.
* **Engine** (:func:`measure_engine`): the same reports through ``Registry.submit_report`` (the front ends'
  entry: reports already decoded and checked, as a front end holds them) or ``Registry.record_report_async``
  (a dict of fields, checked inside), submitted by ``callers`` concurrent coroutines in a closed loop, with or
  without an outbox sink (a sink that is never started: each report is enqueued, nothing is delivered).
  Afterwards the registry is asked what it holds: ``lost`` = acknowledged but not stored, ``duplicates`` =
  stored more than once (both must be 0).

CPU is the process's CPU time (``time.process_time``: the event loop and the registry's writer thread together)
over the run; reports/s is wall-clock. Both are this machine's figures; nothing here asserts a time.
``python -m tools.harness.bench.ingest --devices 1,100,10000`` prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.outbox import Outbox, connect
from gateway.registry import Registry
from proto import devicemsg

__all__ = ["IngestFigures", "Run", "measure_ceiling", "measure_engine", "run_ingest", "sample_reports"]

TRANSPORT = "coap"


@dataclass
class Run:
    """One measured run: reports (rows) stored, seconds, CPU seconds."""

    label: str
    reports: int
    devices: int
    seconds: float
    cpu_s: float
    stored: int = 0
    duplicates: int = 0
    lost: int = 0
    written: int = 0  # bytes handed to write() meanwhile (WAL and checkpoints; 0 where /proc is missing)
    commits: int = 0  # transactions (= fsyncs of the WAL)

    @property
    def reports_per_s(self) -> float:
        return self.reports / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_report(self) -> float:
        return self.cpu_s / self.reports * 1e6 if self.reports else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            reports_per_s=round(self.reports_per_s), cpu_us_per_report=round(self.cpu_us_per_report, 2)
        )
        return out


@dataclass
class IngestFigures:
    """The ceiling and the engine, measured ``rounds`` times each, alternating, on the same reports.

    Each target's throughput is its best round and its CPU per report its lowest (other load on the machine
    only ever slows a round down); ``lost`` and ``duplicates`` are the worst round's (both must be 0)."""

    ceiling_runs: list[Run]
    engine_runs: list[Run]
    sink: bool

    @property
    def ceiling(self) -> Run:
        return max(self.ceiling_runs, key=lambda r: r.reports_per_s)

    @property
    def engine(self) -> Run:
        return max(self.engine_runs, key=lambda r: r.reports_per_s)

    @property
    def ceiling_cpu_us(self) -> float:
        return min(r.cpu_us_per_report for r in self.ceiling_runs)

    @property
    def engine_cpu_us(self) -> float:
        return min(r.cpu_us_per_report for r in self.engine_runs)

    @property
    def ratio(self) -> float:
        """Engine reports/s over ceiling rows/s (the issue's ``ratio_sqlite``)."""
        return self.engine.reports_per_s / max(self.ceiling.reports_per_s, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        """Flat figures, named as P6's (``reports_per_s``, ``sqlite_rows_per_s``, ``ratio_sqlite``, ...)."""
        e = self.engine
        return {
            "reports": e.reports,
            "devices": e.devices,
            "outbox_sink": self.sink,
            "rounds": len(self.engine_runs),
            "reports_per_s": round(e.reports_per_s),
            "cpu_us_per_report": round(self.engine_cpu_us, 2),
            "sqlite_rows_per_s": round(self.ceiling.reports_per_s),
            "sqlite_cpu_us_per_row": round(self.ceiling_cpu_us, 2),
            "ratio_sqlite": round(self.ratio, 3),
            "cpu_ratio": round(self.engine_cpu_us / max(self.ceiling_cpu_us, 1e-9), 2),
            "bytes_per_report": round(e.written / e.reports) if e.reports else 0,
            "sqlite_bytes_per_row": round(self.ceiling.written / self.ceiling.reports)
            if self.ceiling.reports
            else 0,
            "reports_per_commit": round(e.reports / e.commits, 1) if e.commits else 0.0,
            "lost": max(r.lost for r in self.engine_runs),
            "duplicates": max(r.duplicates for r in self.engine_runs),
        }


class _NullSink:
    """An outbox sink that is never started: reports are enqueued, nothing is delivered."""

    name = "bench-null"

    async def start(self) -> None: ...

    async def deliver(self, payload: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


def _written() -> int:
    """Bytes this process passed to write() so far (Linux ``/proc/self/io`` wchar; 0 elsewhere)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def device_id(i: int) -> str:
    return f"88.123.99/BENCH-{i:06d}"


def sample_reports(reports: int, devices: int, seed: int = 6) -> list[dict[str, Any]]:
    """``reports`` report fields as the firmware sends them from ``devices`` devices: every device once per
    pass, in a shuffled order each pass (a fleet's reports arrive in no order of identifiers), each device's
    (boot, seq) new every time."""
    rng = random.Random(seed)
    order = list(range(devices))
    out = []
    for n in range(reports):
        if n % devices == 0:
            rng.shuffle(order)
        dev, seq = order[n % devices], n // devices + 1
        out.append(
            {
                "id": device_id(dev),
                "boot": 1,
                "seq": seq,
                "uptime": 60 * seq,
                "heap": 81234 - seq % 100,
                "rssi": -61,
                "queue": 0,
                "board": "esp32-devkitc",
                "fw": "0.1.0",
                "dropped": 0,
                "time": 1_760_000_000 + seq,
                "sensors": {"temp": 21.5, "rpm": 1480, "ok": True},
            }
        )
    return out


def measure_ceiling(workdir: Path, reports: Sequence[dict[str, Any]], *, batch: int = 256) -> Run:
    """Bare loop: one ``reports`` row per report into the registry's schema, ``batch`` rows per transaction."""
    path = workdir / "ceiling.sqlite3"
    Registry(path).close()  # the registry's schema, nothing else
    conn = connect(path)
    now = time.time()
    rows = [
        (f["id"], f["boot"], f["seq"], now, TRANSPORT, None, devicemsg.check_report(f).raw) for f in reports
    ]
    devices = len({f["id"] for f in reports})
    sql = "INSERT INTO reports(device, boot, seq, received, transport, peer, fields) VALUES (?, ?, ?, ?, ?, ?, ?)"
    try:
        w0, c0, t0 = _written(), time.process_time(), time.perf_counter()
        for i in range(0, len(rows), batch):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows[i : i + batch])
            conn.execute("COMMIT")
        t, c, w = time.perf_counter() - t0, time.process_time() - c0, _written() - w0
        (stored,) = conn.execute("SELECT COUNT(*) FROM reports").fetchone()
    finally:
        conn.close()
    commits = -(-len(rows) // batch)
    return Run("sqlite ceiling", len(rows), devices, t, c, stored=int(stored), written=w, commits=commits)


async def _drive(submit: Callable[[int], Awaitable[bool]], n: int, callers: int) -> tuple[int, int]:
    """``callers`` coroutines submit report 0..n-1 (each the next one not taken); (new, duplicate) answers."""
    todo = iter(range(n))
    counts = [0, 0]

    async def caller() -> None:
        for i in todo:
            counts[0 if await submit(i) else 1] += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return counts[0], counts[1]


def measure_engine(
    workdir: Path,
    reports: Sequence[dict[str, Any]],
    *,
    sink: bool,
    callers: int = 512,
    checked: bool = True,
    make_registry: Callable[[Path, Outbox | None], Any] | None = None,
) -> Run:
    """The reports through a fresh registry (``checked``: ``submit_report`` with reports decoded beforehand, as a
    front end holds them; else ``record_report_async`` with dicts). ``make_registry(path, outbox)`` replaces
    ``Registry(path, outbox)`` (e.g. another implementation to compare)."""
    path = workdir / f"engine-{'sink' if sink else 'nosink'}.sqlite3"
    outbox = Outbox(path, [_NullSink()]) if sink else None
    reg = (make_registry or Registry)(path, outbox)
    devices = len({f["id"] for f in reports})
    idents = [f["id"] for f in reports]
    try:
        if checked:
            payloads = [devicemsg.check_report(f) for f in reports]

            def submit(i: int) -> Awaitable[bool]:
                return reg.submit_report(idents[i], payloads[i], TRANSPORT)

        else:

            def submit(i: int) -> Awaitable[bool]:
                return reg.record_report_async(idents[i], reports[i], TRANSPORT)  # type: ignore[no-any-return]

        w0, c0, t0 = _written(), time.process_time(), time.perf_counter()
        commits = reg.commits
        new, dup = asyncio.run(_drive(submit, len(reports), callers))
        t, c, w = time.perf_counter() - t0, time.process_time() - c0, _written() - w0
        commits = reg.commits - commits
        stats = reg.stats()
        rows = [] if outbox is None else outbox.rows()
        keys = (
            None
            if outbox is None
            else [(r["payload"]["id"], r["payload"]["boot"], r["payload"]["seq"]) for r in rows]
        )
    finally:
        reg.close()
        if outbox is not None:
            outbox.close()
    lost = new - int(stats["reports_total"])  # acknowledged as new, not in the registry's durable count
    duplicates = dup  # every sample report is new: a duplicate answer is a wrong one
    if keys is not None:  # every stored report has its outbox row: a report stored twice shows there
        duplicates += len(keys) - len(set(keys))
        lost = max(lost, new - len(set(keys)))
    label = (
        f"engine ({'submit_report' if checked else 'record_report_async'}, {'outbox' if sink else 'no sink'})"
    )
    return Run(
        label,
        len(reports),
        devices,
        t,
        c,
        stored=int(stats["reports_total"]),
        duplicates=duplicates,
        lost=lost,
        written=w,
        commits=commits,
    )


def run_ingest(
    *,
    reports: int = 20_000,
    devices: int = 2_000,
    sink: bool = True,
    rounds: int = 3,
    callers: int = 512,
    checked: bool = True,
    batch: int = 0,
    workdir: Path | None = None,
) -> IngestFigures:
    """The ceiling and the engine on the same reports, ``rounds`` times each, alternating (a temporary directory
    unless ``workdir`` is given; every round starts from fresh files). The ceiling commits ``batch`` rows per
    transaction; 0 = as many as the engine's batches held on average in the same round."""
    if reports < 1 or devices < 1 or rounds < 1:
        raise ValueError("need reports, devices and rounds >= 1")
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="ida-ingest-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    try:
        sample = sample_reports(reports, devices)
        ceiling: list[Run] = []
        engine: list[Run] = []
        for n in range(rounds):
            round_dir = base / f"round-{n}"
            round_dir.mkdir()
            e = measure_engine(round_dir, sample, sink=sink, callers=callers, checked=checked)
            engine.append(e)
            rows = batch or max(1, round(e.reports / max(e.commits, 1)))  # the engine's own batches
            ceiling.append(measure_ceiling(round_dir, sample, batch=rows))
            shutil.rmtree(round_dir, ignore_errors=True)
        return IngestFigures(ceiling, engine, sink)
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.harness.bench.ingest", description=__doc__.split("\n")[0]
    )
    p.add_argument("--reports", type=int, default=20_000)
    p.add_argument("--devices", default="1,100,10000", help="comma-separated device counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--callers", type=int, default=512)
    p.add_argument(
        "--dicts", action="store_true", help="record_report_async with dicts instead of submit_report"
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    out = []
    for devices, sink in itertools.product([int(d) for d in a.devices.split(",")], (False, True)):
        fig = run_ingest(
            reports=a.reports,
            devices=devices,
            sink=sink,
            rounds=a.rounds,
            callers=a.callers,
            checked=not a.dicts,
        )
        o = fig.as_dict()
        out.append(o)
        if not a.json:
            print(
                f"devices {devices:>6}  {'outbox ' if sink else 'no sink'}"
                f"  ceiling {o['sqlite_rows_per_s']:>8} rows/s {o['sqlite_cpu_us_per_row']:6.2f} us/row"
                f"  engine {o['reports_per_s']:>8} reports/s {o['cpu_us_per_report']:6.2f} us/report"
                f"  ratio {o['ratio_sqlite']:.2f}  lost {o['lost']} dup {o['duplicates']}",
                flush=True,
            )
    if a.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
