"""tools/harness/bench/ingest.py (P6's storage anchor and the engine, in one run): it runs small, reports every
figure as a number, and the engine neither loses nor doubles a report. Never asserts a time."""

from __future__ import annotations

import json

import pytest

from tools.harness.bench.ingest import main, run_ingest

KEYS = {
    "reports",
    "devices",
    "outbox_sink",
    "rounds",
    "reports_per_s",
    "cpu_us_per_report",
    "sqlite_rows_per_s",
    "sqlite_cpu_us_per_row",
    "ratio_sqlite",
    "cpu_ratio",
    "bytes_per_report",
    "sqlite_bytes_per_row",
    "reports_per_commit",
    "lost",
    "duplicates",
}


@pytest.mark.parametrize("sink", [False, True])
def test_run_ingest_reports_numbers(sink: bool) -> None:
    fig = run_ingest(reports=300, devices=7, sink=sink, rounds=2, callers=16)
    out = fig.as_dict()
    assert set(out) == KEYS
    assert (out["reports"], out["devices"], out["outbox_sink"], out["rounds"]) == (300, 7, sink, 2)
    for k in (
        "reports_per_s",
        "cpu_us_per_report",
        "sqlite_rows_per_s",
        "sqlite_cpu_us_per_row",
        "reports_per_commit",
    ):
        assert isinstance(out[k], int | float) and out[k] > 0, k
    assert out["ratio_sqlite"] == pytest.approx(
        out["reports_per_s"] / out["sqlite_rows_per_s"], rel=0.01, abs=0.001
    )
    assert out["lost"] == 0 and out["duplicates"] == 0
    assert isinstance(out["bytes_per_report"], int) and isinstance(out["sqlite_bytes_per_row"], int)
    assert all(r.stored == 300 for r in fig.engine_runs) and all(r.stored == 300 for r in fig.ceiling_runs)


def test_dict_entry_and_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["--reports", "120", "--devices", "1,3", "--rounds", "1", "--callers", "8", "--dicts", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(r["devices"], r["outbox_sink"]) for r in rows] == [(1, False), (1, True), (3, False), (3, True)]
    assert all(r["lost"] == 0 and r["duplicates"] == 0 and r["reports_per_s"] > 0 for r in rows)
