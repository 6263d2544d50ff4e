"""P5: not written yet."""

from __future__ import annotations

from tools.bench.procs import BenchError
from tools.bench.scenario import BenchOptions, ScenarioResult, scenario


@scenario("P5", "P5", "see issue 7")
def run_p5(opts: BenchOptions) -> ScenarioResult:
    raise BenchError("not implemented yet")
