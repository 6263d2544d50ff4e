"""`ida demo` (what ``make demo`` runs): the whole system on loopback, narrated in plain words.

Everything runs on 127.0.0.1 on free ports, under one temporary directory (removed at the end unless
``--keep``; kept when something failed, so its logs can be read):

1. **Mosquitto** with a generated config (anonymous loopback listener, no persistence);
2. **`ida node`**, the recursive-node simulator, serving the built-in sample records over the Handle native
   protocol with some added latency (a real recursive node is a network round trip away);
3. **`ida gateway`**: CoAP, HTTP (status page, API, metrics) and its MQTT front end on that broker, a fresh data
   dir (so the cache starts cold), the node as its only upstream;
4. **three devices running the real firmware** (``firmware/main.py`` under the MicroPython unix port, provisioned
   with :mod:`tools.harness.sim.provision`): PUMP-0001 over CoAP, MOTOR-0001 over MQTT and VALVE-0001 over CoAP,
   which loses its network for a while (console ``net down``), queues its reports in flash and catches up.

The demo drives the devices through their consoles (``tools.support.console.DeviceConsole`` over the processes'
stdin/stdout pipes, JSON mode): resolves that go to the recursive node, resolves the gateway answers from its
cache over both transports, a resolve the device answers from its own cache, reports, the outage. Each line it
prints states one event, read from what the devices answer on their consoles and from the gateway's
``/api/status``, ``/api/devices`` and ``/metrics``; resolution times are round trips measured at the device's
console (console pipe included).

It runs until Ctrl-C (SIGINT) or SIGTERM, or for ``DEMO_SECONDS`` seconds (``--seconds``), then stops everything in
reverse order (devices: SIGINT, so the firmware flushes its queue; gateway, node, broker: SIGTERM; SIGKILL for
anything still running after a grace period) and checks that no process it started is left: none of its children,
and no process whose command line or environment names its temporary directory (each gets ``IDA_DEMO_DIR`` in its
environment); a straggler is killed and named in the output. Every process runs in its own session (a Ctrl-C in
the terminal reaches only the demo, which then stops them in order) and gets SIGKILL if the demo itself dies
(``PR_SET_PDEATHSIG``).

Exit codes: 0 a clean run (also when stopped with Ctrl-C); 1 a component failed to start or died while running
(the message names it and shows the end of its log); 2 bad arguments (e.g. ``DEMO_SECONDS=abc``).

Modules, one job each:

* ``cli`` -- the command: arguments, the run (``Demo``), the final check for stragglers.
* ``services`` -- the supervisor of the server processes: start Mosquitto, ``ida node``, ``ida gateway`` in
  order, watch them, stop them in reverse; ``leftover_processes``.
* ``devices`` -- the three firmware processes and their consoles (``DemoFleet``, ``DemoDevice``): start, narrate
  what the consoles say, follow ``status``, stop.
* ``story`` -- the scripted steps (``Story``): resolves, the outage, the steady loop.
* ``gatewayapi`` -- HTTP polling of the gateway: ``/healthz``, ``/api/status``, ``/api/devices``, ``/metrics``.
* ``narration`` -- the ``[  12.3s] text`` lines and the words for sources and firmware log lines.
* ``settings`` -- timings, grace periods, the devices; ``errors`` -- ``DemoError``.
"""

from tools.harness.demo.cli import add_arguments, run
from tools.harness.demo.errors import DemoError
from tools.harness.demo.services import leftover_processes

__all__ = ["DemoError", "add_arguments", "leftover_processes", "run"]
