"""What both fleets keep and do alike (:mod:`tools.harness.sim.firmware`, :mod:`tools.harness.sim.light`): the
configuration and the log, the counters and the resolve latencies, the tasks they spawn, when they ran and the
CPU time they took, and the :class:`~tools.harness.sim.stats.SimResult` a snapshot returns."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from tools.harness.sim.config import SimConfig
from tools.harness.sim.stats import Counters, Histogram, SimResult
from tools.support.tasks import TaskSet

__all__ = ["FleetBase"]


class FleetBase:
    """The subclass sets ``mode``, calls :meth:`_started` when its devices start and ``t_stop`` when they stop."""

    mode = ""

    def __init__(self, cfg: SimConfig, *, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda _m: None)
        self.counters = Counters()
        self.resolve_ms = Histogram()
        self.stopping = False
        self.t_start = 0.0
        self.t_stop: float | None = None
        self._cpu0 = 0.0
        self.tasks = TaskSet()

    def _started(self) -> None:
        self.t_start = time.monotonic()
        self._cpu0 = time.process_time()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as one of the fleet's ``tasks`` (cancelled when it stops)."""
        self.tasks.spawn(coro)

    def _result(self, counters: Counters, devices: int, pending: int, online: int) -> SimResult:
        """A snapshot: these figures, with the run's mode, transport, duration and CPU time so far."""
        running = bool(self.t_start)
        end = self.t_stop if self.t_stop is not None else time.monotonic()
        return SimResult(
            self.mode,
            self.cfg.transport,
            devices,
            max(0.0, end - self.t_start) if running else 0.0,
            counters=counters,
            pending=pending,
            online=online,
            resolve_ms=self.resolve_ms,
            sim_cpu_s=time.process_time() - self._cpu0 if running else 0.0,
        )
