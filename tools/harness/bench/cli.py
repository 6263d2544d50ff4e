"""`ida bench`: the benchmark suite (issue 7), figures measured against anchors started in the same run.

    ida bench                          full run (3 rounds x 5 s per target), text report
    ida bench --quick                  2 rounds x 0.6 s per target
    ida bench --quick --json           one JSON object {"P1": {...}, "P3": {...}, ...}
    ida bench --only P1,P3             some scenarios
    ida bench --out docs/benchmarks.md a Markdown table of the run as well

Progress goes to stderr; the report (or the JSON object) to stdout. Exit code 0 when every scenario ran
(met or not), 1 when a scenario could not run, 2 for a bad option.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tools.errors import CliError
from tools.harness.bench import SCENARIO_KEYS, load_scenarios
from tools.harness.bench.report import as_json, as_markdown, as_text
from tools.harness.bench.scenario import BenchOptions, run_scenarios


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short run: 2 rounds x 0.6 s per target")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument(
        "--only", metavar="P1,P3", help=f"scenarios to run (default all: {','.join(SCENARIO_KEYS)})"
    )
    p.add_argument(
        "--out", metavar="FILE", help="also write the run as a Markdown report (e.g. docs/benchmarks.md)"
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="load generator processes (default 1)")
    p.add_argument("--concurrency", type=int, default=32, metavar="N", help="requests in flight (default 32)")
    p.add_argument(
        "--duration", type=float, metavar="S", help="seconds per measurement (default 0.6 quick, 5 full)"
    )
    p.add_argument("--rounds", type=int, metavar="N", help="rounds per target (default 2 quick, 3 full)")
    p.add_argument(
        "--log-dir", metavar="DIR", help="keep the servers' logs and data here (default a temp dir)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(SCENARIO_KEYS)
    keys = [k.strip().upper() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in SCENARIO_KEYS]
    if bad:
        raise CliError(f"--only: unknown scenario {', '.join(bad)} (known: {', '.join(SCENARIO_KEYS)})")
    return keys


def run(args: argparse.Namespace) -> int:
    keys = parse_only(args.only)
    if args.workers < 1 or args.concurrency < 1 or (args.rounds is not None and args.rounds < 1):
        raise CliError("--workers, --concurrency and --rounds must be >= 1")
    if args.duration is not None and args.duration <= 0:
        raise CliError("--duration must be > 0")
    load_scenarios()

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    opts = BenchOptions(
        quick=args.quick,
        workers=args.workers,
        concurrency=args.concurrency,
        duration=args.duration,
        rounds=args.rounds,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        progress=None if args.quiet else progress,
    )
    results = run_scenarios(keys, opts)
    if args.json:
        print(as_json(results))
    else:
        print(as_text(results))
    if args.out:
        command = (
            "ida bench " + shlex.join(a for a in sys.argv[2:] if a)
            if sys.argv[1:2] == ["bench"]
            else "ida bench"
        )
        Path(args.out).write_text(as_markdown(results, command))
        if not args.quiet:
            progress(f"wrote {args.out}")
    return 1 if any(r.skipped for r in results) else 0
