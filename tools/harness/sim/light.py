"""The light simulator: thousands of devices in one asyncio process, speaking docs/protocol.md themselves.

Each device keeps what the firmware keeps (:mod:`tools.harness.sim.devices`): a boot number (one per run, persisted in
``<data dir>/light-boot.json``), a sequence number per boot, uptime, and a bounded queue of unacknowledged reports.
It reports as the firmware's reporter does (:mod:`tools.harness.sim.light_reports`) and resolves identifiers
(:mod:`tools.harness.sim.light_resolves`); this module starts and stops the fleet, keeps its schedule, and applies
remote config.

Schedule: device ``n`` of ``N`` reports first at ``(n + u) / N * interval`` (``u`` uniform in [0, 1): the
fleet is spread evenly over the interval, with jitter inside each slot) and then every ``interval``, so the
gateway sees a steady ``N / interval`` reports per second, as from a real fleet, not bursts. Resolves
(``resolve_every``) are spread the same way.

CoAP devices speak over raw UDP endpoints with the message layer of :class:`proto.coap.Client`
(:mod:`tools.harness.sim.coap`; devices share ``coap_sockets`` sockets, default ``min(N, 1024)``). Light CoAP
devices do not observe ``/d/<id>/cfg`` (10,000 observations would measure something else); MQTT devices do apply
remote config.

MQTT devices (:mod:`tools.harness.sim.mqtt`, a small asyncio 3.1.1 client) connect one per device or share K
connections (``mqtt_connections``; :mod:`tools.harness.sim.light_mqtt` says what each costs). A ``cfg`` message
is applied (interval) and acknowledged on ``cfgack``.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from proto import devicemsg
from tools.harness.sim.coap import CoapClient
from tools.harness.sim.config import SimError, parse_url
from tools.harness.sim.devices import BOARD, FW, Device, Schedule, next_boot
from tools.harness.sim.light_mqtt import MqttLinks
from tools.harness.sim.light_reports import Reporting
from tools.harness.sim.light_resolves import Resolving
from tools.harness.sim.stats import Histogram, SimResult

__all__ = ["LightFleet", "BOARD", "FW", "next_boot"]

COAP_SOCKETS_MAX = 1024


class LightFleet(Reporting, Resolving):
    """``await start()``, then the fleet runs on the event loop until ``await stop()`` (which drains answers in
    flight for up to ``cfg.drain`` s and returns the final :class:`SimResult`); ``snapshot()`` any time."""

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        loop = self._loop = asyncio.get_running_loop()
        self.boot = next_boot(cfg.data_dir)
        self._started()
        coap_devs = [d for d in self.devices if d.transport == "coap"]
        mqtt_devs = [d for d in self.devices if d.transport == "mqtt"]
        if coap_devs:
            host, port = parse_url(cfg.gateway, "coap")
            n_socks = cfg.coap_sockets or min(len(coap_devs), COAP_SOCKETS_MAX)
            self.coap = CoapClient(host, port, n_socks, self.counters, self.rng)
            try:
                await self.coap.open()
            except OSError as e:
                raise SimError(f"coap: cannot open sockets to {cfg.gateway}: {e.strerror or e}") from None
            for i, d in enumerate(coap_devs):
                d.sock = i
        if mqtt_devs:
            self.mqtt = MqttLinks(self, mqtt_devs)
            self.mqtt.start()
        now = loop.time()
        n = len(self.devices)
        for d in self.devices:
            first = now + (d.n + self.rng.random()) / n * cfg.interval
            d.report_schedule = Schedule(loop, partial(self._make, d), cfg.interval, first)
            if cfg.resolve_every > 0:
                first = now + (d.n + self.rng.random()) / n * cfg.resolve_every
                d.resolve_schedule = Schedule(loop, partial(self._resolve, d), cfg.resolve_every, first)
        shared = self.mqtt is not None and self.mqtt.shared
        self.log(
            f"light fleet: {n} devices ({len(coap_devs)} coap, {len(mqtt_devs)} mqtt"
            + (f" on {len(self.mqtt.conns)} shared connections" if self.mqtt is not None and shared else "")
            + f"), boot {self.boot}, "
            f"{n / cfg.interval:.1f} reports/s"
        )

    async def stop(self, drain: float | None = None) -> SimResult:
        """Stop making reports and resolves, wait up to ``drain`` s for the ones in flight, then disconnect."""
        if self.closed:
            return self.snapshot()
        drain = self.cfg.drain if drain is None else drain
        self.stopping = True
        for d in self.devices:
            for s in (d.report_schedule, d.resolve_schedule):
                if s is not None:
                    s.cancel()
        deadline = time.monotonic() + drain
        while (self.pending or self.resolving) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.t_stop = time.monotonic()
        self.closed = True
        for d in self.devices:
            for h in (d.retry_timer, d.report_timer, d.resolve_timer):
                if h is not None:
                    h.cancel()
        await self.tasks.cancel()
        if self.coap is not None:
            self.coap.close()
        if self.mqtt is not None:
            await self.mqtt.close()
        return self.snapshot()

    @property
    def pending(self) -> int:
        c = self.counters
        return c.made - c.acked - c.rejected - c.dropped

    @property
    def online(self) -> int:
        n = sum(1 for d in self.devices if d.transport == "coap")
        return n + (self.mqtt.online if self.mqtt is not None else 0)

    def snapshot(self) -> SimResult:
        res = self._result(self.counters.copy(), len(self.devices), self.pending, self.online)
        res.ack_ms = self.ack_ms
        return res

    def take_window(self) -> Histogram:
        """Ack latencies since the last call (for the periodic line)."""
        h, self.window_ms = self.window_ms, Histogram()
        return h

    # -- remote config (MQTT) -------------------------------------------------------------------------------
    def _mqtt_cfg(self, d: Device, payload: bytes) -> None:
        if not payload:
            return  # retained config cleared
        try:
            obj = devicemsg.loads(payload)
        except devicemsg.WireError:
            self.counters.errors += 1
            return
        ver = obj.get(devicemsg.KEYS["cfgver"]) if isinstance(obj, dict) else None
        if not isinstance(ver, int) or ver <= d.cfgver:
            return  # already applied (retained copy after a reconnect) or unreadable
        d.cfgver = ver
        code, msg = devicemsg.OK, None
        try:
            fields = devicemsg.decode("config", payload)
        except devicemsg.WireError as e:
            code, msg = devicemsg.BAD_REQUEST, str(e)
            fields = {}
        if code == devicemsg.OK and "interval" in fields:
            if d.report_schedule is not None and not self.stopping:
                d.report_schedule.set_period(float(fields["interval"]))
        self.counters.configs += code == devicemsg.OK
        ack: dict[str, Any] = {"id": d.ident, "cfgver": ver, "code": code}
        if msg:
            ack["msg"] = msg[:120]
        if d.conn is not None:
            d.conn.publish(devicemsg.topic(d.ident, "cfgack"), devicemsg.encode("config_ack", ack), qos=1)

    # -- MQTT connections (light_mqtt.Host) ---------------------------------------------------------------------
    def ready(self, d: Device) -> None:
        self._pump(d)

    def message(self, d: Device, leaf: str, payload: bytes) -> None:
        handle = {"ack": self._mqtt_ack, "res": self._mqtt_res, "cfg": self._mqtt_cfg}.get(leaf)
        if handle is not None:
            handle(d, payload)

    def connection_lost(self, d: Device, why: str | None) -> None:
        """``d``'s connection is gone: what it had in flight cannot be answered any more."""
        if d.report_timer is not None:  # retried after reconnecting
            d.report_timer.cancel()
            d.report_timer = None
            d.inflight = None
        if d.resolve_timer is not None:
            d.resolve_timer.cancel()
            d.resolve_timer = None
        if d.resolve_token is not None:
            d.resolve_token = None
            self.resolving -= 1
            if why is not None:
                self.counters.resolve_errors += 1
