"""`ida sim`: a simulated fleet of devices against a running gateway (library first; ``cli`` is the command).

    from tools.harness.sim import SimConfig, run_sim
    result = run_sim(SimConfig(devices=200, gateway="coap://127.0.0.1:5683", interval=10, duration=30,
                               mode="light", data_dir=Path("sim-data")))
    result.counters.acked, result.pending, result.ack_ms.percentile(99), result.to_dict()

    async: fleet = make_fleet(cfg); await fleet.start(); ...; result = await fleet.stop()

Two modes (``auto`` = firmware up to 10 devices, light above):

* **firmware** (:mod:`tools.harness.sim.firmware`): N real ``micropython firmware/main.py`` processes, each with its own
  data dir and identity (:func:`tools.harness.sim.provision.provision`, also meant for ``ida device run``). Faithful
  to the byte; each device is a process (~13 MB: the venv's ``micropython`` hosts the interpreter in a CPython
  process), so keep N small (<= 20).
* **light** (:mod:`tools.harness.sim.light`): one asyncio process that speaks docs/protocol.md itself -- CoAP over raw
  UDP endpoints with the message layer of :class:`proto.coap.Client` (:mod:`tools.harness.sim.coap`), MQTT 3.1.1
  with its own small client (:mod:`tools.harness.sim.mqtt`, connections in :mod:`tools.harness.sim.light_mqtt`) --
  keeping per-device boot/seq/uptime/queue state (:mod:`tools.harness.sim.devices`), a report schedule spread
  evenly over the interval, one report in flight per device, retries with backoff, optional resolves. 10,000
  CoAP devices at 60 s (167 reports/s) cost the simulator ~10 % of a core on the 2-core dev machine, most of
  it in the UDP send system call.

Benchmark P5 (10,000 devices every 60 s against a real ``ida gateway``, the gateway's CPU share) runs the light
fleet: :mod:`tools.harness.bench.p5`.

Modules: ``config`` (``SimConfig``, ``SimError``), ``provision`` (a device's identity, environment and process),
``fleet`` (what both fleets keep), ``firmware`` and ``light`` (the two fleets; ``light_base`` what the light fleet
holds, ``light_reports`` and ``light_resolves`` its devices' two exchanges, ``devices`` what a light device keeps
and reports, ``light_mqtt`` its MQTT connections), ``coap`` and ``mqtt`` (the light fleet's clients), ``stats``
(counters, histograms, summaries), ``runner`` (start, run, stop a fleet), ``cli`` (``ida sim``).
"""

from __future__ import annotations

from tools.harness.sim.config import SimConfig, SimError
from tools.harness.sim.runner import make_fleet, run_fleet, run_sim
from tools.harness.sim.stats import Counters, Histogram, SimResult, format_final, format_line

__all__ = [
    "SimConfig",
    "SimError",
    "SimResult",
    "Counters",
    "Histogram",
    "make_fleet",
    "run_fleet",
    "run_sim",
    "format_final",
    "format_line",
]
