"""`ida bench`: the benchmark suite (library first; ``tools.harness.bench.cli`` is the command line).

    from tools.harness.bench import LoadSpec, run_load                 # the CoAP load generator
    result = run_load(LoadSpec("127.0.0.1", 5683, (("r", "88.123.99", "PUMP-0001"),), duration=2))
    result.rps, result.p50_ms, result.p99_ms

    from tools.harness.bench import BenchOptions, run_scenarios, load_scenarios
    load_scenarios()
    results = run_scenarios(["P1", "P3"], BenchOptions(quick=True))   # ScenarioResult per key

Modules: ``loadgen`` (closed-loop CoAP generator on :class:`proto.coap.Client`, worker processes), ``mqttload``
(the MQTT resolve load, on :mod:`proto.mqtt`), ``mqttreports`` (the MQTT report fleet: one report in flight per
device), ``servers`` (anchor servers, run as processes), ``anchors`` (start/stop them), ``broker`` (a Mosquitto
for P2/P5/P6), ``procs`` (``Child``: a :class:`tools.support.procs.Process` with
``BenchError`` and CPU time), ``project`` (``ida node`` / ``ida gateway`` subprocesses), ``scenario``
(framework), ``p1``...``p5`` (scenarios; ``p5`` is also ``measure_p5`` and ``python -m tools.harness.bench.p5``, on
the light simulator), ``ingest`` (the report-ingest engine against the bare-SQLite ceiling), ``ingest_mqtt`` (P6's MQTT figure:
``measure_mqtt_ingest``, reports through Mosquitto to ``ida gateway`` against the bare broker round trip), ``report`` (text,
JSON, Markdown), ``cli``. The CoAP bytes are :mod:`proto.coap`'s, the MQTT bytes :mod:`proto.mqtt`'s.
"""

from __future__ import annotations

import importlib

from tools.harness.bench.loadgen import LoadGenerator, LoadSpec, run_load
from tools.harness.bench.loadresult import LoadResult
from tools.harness.bench.scenario import SCENARIOS, BenchOptions, ScenarioResult, run_scenarios

__all__ = [
    "BenchOptions",
    "LoadGenerator",
    "LoadResult",
    "LoadSpec",
    "SCENARIOS",
    "SCENARIO_KEYS",
    "ScenarioResult",
    "load_scenarios",
    "run_load",
    "run_scenarios",
]

SCENARIO_KEYS = ("P1", "P2", "P3", "P4", "P5", "P6")


def load_scenarios() -> None:
    """Import the scenario modules (each registers itself in SCENARIOS)."""
    for key in SCENARIO_KEYS:
        importlib.import_module(f"tools.harness.bench.{key.lower()}")
