"""What a light fleet holds (:mod:`tools.harness.sim.light`), shared by its report and resolve exchanges
(:mod:`tools.harness.sim.light_reports`, :mod:`tools.harness.sim.light_resolves`): the devices, the random
source, the fleet's boot number, the CoAP sockets and MQTT connections once started, the event loop, and the
latency histograms."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from tools.harness.sim.coap import CoapClient
from tools.harness.sim.config import SimConfig
from tools.harness.sim.devices import Device
from tools.harness.sim.fleet import FleetBase
from tools.harness.sim.light_mqtt import MqttLinks
from tools.harness.sim.stats import Histogram

__all__ = ["LightBase", "perf"]

perf = time.perf_counter  # the clock of the latencies


class LightBase(FleetBase):
    mode = "light"

    def __init__(self, cfg: SimConfig, *, log: Callable[[str], None] | None = None) -> None:
        super().__init__(cfg, log=log)
        self.rng = random.Random(cfg.seed)
        self.ack_ms = Histogram()
        self.window_ms = Histogram()
        self.devices = [
            Device(n, cfg.identifier(n), cfg.transport_of(n), self.rng) for n in range(cfg.devices)
        ]
        self.boot = 0
        self.coap: CoapClient | None = None
        self.mqtt: MqttLinks | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.resolving = 0  # resolves waiting for an answer
        self._token = self.rng.randrange(0x100000000)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the fleet runs on, once started."""
        assert self._loop is not None, "the fleet is not started"
        return self._loop
