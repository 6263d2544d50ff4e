"""`ida bench` P4's 32-bit figures (tools/harness/bench/heap32.py): whole device processes on the 32-bit
interpreters against an OSCORE gateway. Numbers are reported, not held to the issue's goals (the heap diet comes
later); what is checked is that each figure means what its name says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mp import mp32
from tools.harness.bench.heap32 import BUDGETS_32, MEASURE_HEAP, Heap32Rig, p4_rows


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Heap32Rig]:
    mp32(frozen=True), mp32(frozen=False)  # skips, saying why, where they cannot be built
    with Heap32Rig(tmp_path_factory.mktemp("heap32")) as r:
        yield r


def test_figures_and_rows(tmp_path: Path) -> None:
    mp32(frozen=True)
    figures, rows, notes = p4_rows(tmp_path, quick=True)
    assert notes == [], notes
    frozen, mpy, least = (figures[k] for k in ("heap_32_frozen", "heap_32_mpy", "min_heap_32_frozen"))
    assert frozen is not None and mpy is not None and least is not None
    assert 0 < frozen < mpy, "the .mpy layout loads the bytecode into the heap: more in use"
    assert frozen < least <= 112000, "the workload needs at least what boot leaves in use"
    assert [r[2] for r in rows if r[2] is not None] == list(BUDGETS_32.values())
    print(f"32-bit heap: frozen {frozen} B, .mpy {mpy} B, smallest heap for the workload {least} B (quick)")


def test_a_probe_fails_in_a_heap_too_small_and_passes_in_a_roomy_one(rig: Heap32Rig) -> None:
    ok = rig.probe(True, MEASURE_HEAP, workload=True)
    assert ok.ok and ok.heap_used is not None, ok.why
    small = rig.probe(True, 16384, workload=True)
    assert not small.ok and small.heap_used is None
    assert "MemoryError" in small.why or "exited" in small.why, small.why
