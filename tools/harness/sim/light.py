"""The light simulator: thousands of devices in one asyncio process, speaking docs/protocol.md themselves.

Each device keeps what the firmware keeps (:mod:`tools.harness.sim.devices`): a boot number (one per run, persisted in
``<data dir>/light-boot.json``), a sequence number per boot, uptime, and a bounded queue of unacknowledged reports
(oldest dropped when full, counted in ``dropped``). As the firmware's
reporter does, a device has one report in flight, sends the oldest queued first, and on no answer, 4.29 or 5.xx
retries the same report after a backoff (2 s doubling to 300 s) -- after a 5.03 with a Max-Age (the gateway's
"registry busy, come back later") it waits that long instead (``busy``); any other 4.xx drops it (``rejected``).

Schedule: device ``n`` of ``N`` reports first at ``(n + u) / N * interval`` (``u`` uniform in [0, 1): the
fleet is spread evenly over the interval, with jitter inside each slot) and then every ``interval``, so the
gateway sees a steady ``N / interval`` reports per second, as from a real fleet, not bursts. Resolves
(``resolve_every``) are spread the same way.

CoAP devices: ``POST /d/<id>/rpt`` confirmable, via :mod:`tools.harness.sim.coap` (raw UDP endpoints, the message
layer of :class:`proto.coap.Client`; devices share ``coap_sockets`` sockets, default ``min(N, 1024)``). Resolves
are ``GET /r/<id>`` with the ETag of the last answer (2.03 when unchanged). Light CoAP devices do not observe
``/d/<id>/cfg`` (10,000 observations would measure something else); MQTT devices do apply remote config.

MQTT devices (:mod:`tools.harness.sim.mqtt`, a small asyncio 3.1.1 client) connect one per device or share K
connections (``mqtt_connections``; :mod:`tools.harness.sim.light_mqtt` says what each costs).

Reports go out at QoS 1 on ``rpt``; the ``report_ack`` on ``ack`` (matched by boot and seq) completes them;
none within 10 s counts as a timeout and the report is retried. Resolves are QoS 0 ``req`` with a 4-byte token
matched on ``res`` (5 s timeout). A ``cfg`` message is applied (interval) and acknowledged on ``cfgack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from proto import devicemsg
from proto.coap import Message, MessageError
from proto.coap.numbers import CHANGED, CONTENT, VALID, Code, Option
from tools.harness.sim import devices
from tools.harness.sim.coap import NO_RESPONSE, RESET, CoapClient, resolve_template
from tools.harness.sim.config import SimConfig, SimError, parse_url
from tools.harness.sim.devices import BOARD, FW, Device, Report, next_boot
from tools.harness.sim.light_mqtt import MqttLinks
from tools.harness.sim.stats import Counters, Histogram, SimResult

__all__ = ["LightFleet", "BOARD", "FW", "next_boot"]

MQTT_REPORT_TIMEOUT = 10.0
MQTT_RESOLVE_TIMEOUT = 5.0
COAP_SOCKETS_MAX = 1024
NOT_FOUND, TOO_MANY = Code.NOT_FOUND, Code.TOO_MANY_REQUESTS
_perf = time.perf_counter


class LightFleet:
    """``await start()``, then the fleet runs on the event loop until ``await stop()`` (which drains answers in
    flight for up to ``cfg.drain`` s and returns the final :class:`SimResult`); ``snapshot()`` any time."""

    mode = "light"

    def __init__(self, cfg: SimConfig, *, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda _m: None)
        self.rng = random.Random(cfg.seed)
        self.counters = Counters()
        self.ack_ms = Histogram()
        self.window_ms = Histogram()
        self.resolve_ms = Histogram()
        self.devices = [
            Device(n, cfg.identifier(n), cfg.transport_of(n), cfg.interval, self.rng)
            for n in range(cfg.devices)
        ]
        self.boot = 0
        self.coap: CoapClient | None = None
        self.mqtt: MqttLinks | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.closed = False
        self.resolving = 0  # resolves waiting for an answer
        self.t_start = 0.0
        self.t_stop: float | None = None
        self._cpu0 = 0.0
        self._token = self.rng.randrange(0x100000000)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        loop = self._loop = asyncio.get_running_loop()
        self.boot = next_boot(cfg.data_dir)
        self.t_start = time.monotonic()
        self._cpu0 = time.process_time()
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
            d.next_due = now + (d.n + self.rng.random()) / n * cfg.interval
            d.next_timer = loop.call_at(d.next_due, self._report_due, d)
            if cfg.resolve_every > 0:
                d.resolve_due = now + (d.n + self.rng.random()) / n * cfg.resolve_every
                d.resolve_timer_next = loop.call_at(d.resolve_due, self._resolve_due, d)
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
            for h in (d.next_timer, d.resolve_timer_next):
                if h is not None:
                    h.cancel()
            d.next_timer = d.resolve_timer_next = None
        deadline = time.monotonic() + drain
        while (self.pending or self.resolving) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.t_stop = time.monotonic()
        self.closed = True
        for d in self.devices:
            for h in (d.retry_timer, d.report_timer, d.resolve_timer):
                if h is not None:
                    h.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
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
        end = self.t_stop if self.t_stop is not None else time.monotonic()
        return SimResult(
            mode=self.mode,
            transport=self.cfg.transport,
            devices=len(self.devices),
            elapsed_s=max(0.0, end - self.t_start) if self.t_start else 0.0,
            counters=self.counters.copy(),
            pending=self.pending,
            online=self.online,
            ack_ms=self.ack_ms,
            resolve_ms=self.resolve_ms,
            sim_cpu_s=time.process_time() - self._cpu0 if self.t_start else 0.0,
        )

    def take_window(self) -> Histogram:
        """Ack latencies since the last call (for the periodic line)."""
        h, self.window_ms = self.window_ms, Histogram()
        return h

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- reports ------------------------------------------------------------------------------------------
    def _report_due(self, d: Device) -> None:
        if self.stopping:
            return
        assert self._loop is not None
        d.next_due += d.interval
        d.next_timer = self._loop.call_at(d.next_due, self._report_due, d)
        self._make(d)

    def _make(self, d: Device) -> None:
        if d.queue_report(self.boot, int(time.monotonic() - self.t_start), self.cfg.queue_cap):
            self.counters.dropped += 1
        self.counters.made += 1
        self._pump(d)

    def _pump(self, d: Device) -> None:
        """Send the oldest queued report if nothing is in flight and no backoff is running."""
        if d.inflight is not None or not d.queue or d.retry_timer is not None or self.closed:
            return
        rep = d.queue[0]
        if d.transport == "coap":
            assert self.coap is not None
            assert d.template is not None
            self.coap.request(d.sock, d.template, rep.payload, partial(self._coap_report_done, d, rep))
        else:
            conn = d.conn
            if (
                conn is None
                or not conn.ready
                or not conn.publish(devicemsg.topic(d.ident, "rpt"), rep.payload, qos=1)
            ):
                return  # offline: stays queued until the connection is back
            assert self._loop is not None
            d.report_t0 = _perf()
            d.report_timer = self._loop.call_later(MQTT_REPORT_TIMEOUT, self._mqtt_report_timeout, d, rep)
        d.inflight = rep
        if rep.sends:
            self.counters.retried += 1
        else:
            self.counters.sent += 1
        rep.sends += 1

    def _acked(self, d: Device, rep: Report, ms: float) -> None:
        d.inflight = None
        if d.queue and d.queue[0] is rep:
            d.queue.popleft()
        else:
            with contextlib.suppress(ValueError):
                d.queue.remove(rep)
        self.counters.acked += 1
        self.ack_ms.add(ms)
        self.window_ms.add(ms)
        d.backoff = devices.RETRY_MIN
        self._pump(d)

    def _failed(self, d: Device, rep: Report, wait: float | None = None) -> None:
        """No answer, 4.29 or 5.xx: the same report again after the backoff, or after ``wait`` seconds when the
        gateway said how long (a 5.03's Max-Age: it is busy, not down -- the backoff does not grow)."""
        d.inflight = None
        if self.closed:
            return
        assert self._loop is not None
        if wait is not None:
            d.retry_timer = self._loop.call_later(wait * self.rng.uniform(1.0, 1.25), self._retry, d)
            return
        d.retry_timer = self._loop.call_later(d.backoff * self.rng.uniform(1.0, 1.25), self._retry, d)
        d.backoff = min(d.backoff * 2, devices.RETRY_MAX)

    def _retry(self, d: Device) -> None:
        d.retry_timer = None
        self._pump(d)

    def _rejected(self, d: Device, rep: Report) -> None:
        d.inflight = None
        with contextlib.suppress(ValueError):
            d.queue.remove(rep)
        self.counters.rejected += 1
        self.counters.errors += 1
        self._pump(d)

    def _ack_code(self, d: Device, rep: Report, ack: Any) -> int | None:
        """The code of a report_ack for ``rep``; None when it names another report."""
        if not isinstance(ack, dict) or ack.get("boot") != self.boot or ack.get("seq") != rep.seq:
            return None
        code = ack.get("code")
        return code if isinstance(code, int) else None

    def _coap_report_done(self, d: Device, rep: Report, code: int, data: bytes, ms: float) -> None:
        if d.inflight is not rep:
            self.counters.late += 1
            return
        if code == CHANGED:
            try:
                ack = devicemsg.decode("report_ack", Message.decode(data).payload)
            except (MessageError, devicemsg.WireError):
                ack = None
            result = self._ack_code(d, rep, ack)
            if result == devicemsg.OK:
                self._acked(d, rep, ms)
                return
            self.counters.errors += 1
            if result is not None and 400 <= result < 500 and result != devicemsg.RATE_LIMITED:
                self._rejected(d, rep)
            else:
                self._failed(d, rep)
        elif code == NO_RESPONSE:
            self.counters.timeouts += 1
            self._failed(d, rep)
        elif code == Code.SERVICE_UNAVAILABLE and (wait := _max_age(data)) is not None:
            self.counters.busy += 1  # the registry is full: come back after Max-Age
            self._failed(d, rep, wait)
        elif code == RESET or code == TOO_MANY or code >> 5 == 5:
            self.counters.errors += 1
            self._failed(d, rep)
        else:
            self._rejected(d, rep)

    def _mqtt_report_timeout(self, d: Device, rep: Report) -> None:
        d.report_timer = None
        if d.inflight is rep:
            self.counters.timeouts += 1
            self._failed(d, rep)

    def _mqtt_ack(self, d: Device, payload: bytes) -> None:
        rep = d.inflight
        try:
            ack = devicemsg.decode("report_ack", payload)
        except devicemsg.WireError:
            self.counters.errors += 1
            return
        code = self._ack_code(d, rep, ack) if rep is not None else None
        if rep is None or code is None:
            self.counters.late += 1
            return
        if d.report_timer is not None:
            d.report_timer.cancel()
            d.report_timer = None
        if code == devicemsg.OK:
            self._acked(d, rep, (_perf() - d.report_t0) * 1000.0)
        elif code == devicemsg.RATE_LIMITED or code >= 500:
            self.counters.errors += 1
            self._failed(d, rep)
        else:
            self._rejected(d, rep)

    # -- resolves -----------------------------------------------------------------------------------------
    def _resolve_due(self, d: Device) -> None:
        if self.stopping:
            return
        assert self._loop is not None
        d.resolve_due += self.cfg.resolve_every
        d.resolve_timer_next = self._loop.call_at(d.resolve_due, self._resolve_due, d)
        if d.resolve_token is not None:
            return  # the previous one is still waiting
        conn = d.conn
        if d.transport == "mqtt" and (conn is None or not conn.ready):
            return  # offline: as the firmware, no resolve without a transport
        ids = self.cfg.resolve_ids
        target = ids[d.resolves % len(ids)] if ids else d.ident
        d.resolves += 1
        self.counters.resolves += 1
        self._token = (self._token + 1) & 0xFFFFFFFF
        d.resolve_token = self._token.to_bytes(4, "big")
        self.resolving += 1
        d.resolve_t0 = _perf()
        d.resolve_target = target
        etag = d.etags.get(target)
        if d.transport == "coap":
            assert self.coap is not None
            self.coap.request(
                d.sock, resolve_template(target, etag), b"", partial(self._coap_resolve_done, d, target)
            )
            return
        fields: dict[str, Any] = {"token": d.resolve_token, "id": target}
        if etag:
            fields["etag"] = etag
        assert conn is not None
        if not conn.publish(devicemsg.topic(d.ident, "req"), devicemsg.encode("resolve_request", fields)):
            self._resolved(d, target, devicemsg.INTERNAL, None, 0.0)
            return
        d.resolve_timer = self._loop.call_later(MQTT_RESOLVE_TIMEOUT, self._mqtt_resolve_timeout, d)

    def _resolved(self, d: Device, target: str, code: int, etag: bytes | None, ms: float) -> None:
        """``code`` in docs/protocol.md terms (1, 203, 100, 200, errors; -1 = no answer)."""
        if d.resolve_token is not None:
            self.resolving -= 1
        d.resolve_token = None
        c = self.counters
        if code == devicemsg.OK:
            c.resolves_ok += 1
            if etag:
                d.etags[target] = etag
        elif code == devicemsg.NOT_MODIFIED:
            c.resolves_not_modified += 1
        elif code in (devicemsg.NOT_FOUND, devicemsg.VALUES_NOT_FOUND):
            c.resolves_not_found += 1
        else:
            c.resolve_errors += 1
            if code == NO_RESPONSE:
                c.timeouts += 1
            else:
                c.errors += 1
            return
        self.resolve_ms.add(ms)

    def _coap_resolve_done(self, d: Device, target: str, code: int, data: bytes, ms: float) -> None:
        etag = None
        if code == CONTENT:
            with contextlib.suppress(MessageError):
                etag = Message.decode(data).option(Option.ETAG)
        proto = {
            CONTENT: devicemsg.OK,
            VALID: devicemsg.NOT_MODIFIED,
            NOT_FOUND: devicemsg.NOT_FOUND,
            NO_RESPONSE: NO_RESPONSE,
        }
        self._resolved(d, target, proto.get(code, devicemsg.INTERNAL), etag, ms)

    def _mqtt_resolve_timeout(self, d: Device) -> None:
        d.resolve_timer = None
        if d.resolve_token is not None:
            self._resolved(d, d.resolve_target, NO_RESPONSE, None, (_perf() - d.resolve_t0) * 1000.0)

    def _mqtt_res(self, d: Device, payload: bytes) -> None:
        try:
            obj = devicemsg.loads(payload)
        except devicemsg.WireError:
            self.counters.errors += 1
            return
        if (
            not isinstance(obj, dict)
            or d.resolve_token is None
            or obj.get(devicemsg.KEYS["token"]) != d.resolve_token
        ):
            self.counters.late += 1
            return
        if d.resolve_timer is not None:
            d.resolve_timer.cancel()
            d.resolve_timer = None
        ms = (_perf() - d.resolve_t0) * 1000.0
        code = obj.get(devicemsg.KEYS["code"])
        etag = obj.get(devicemsg.KEYS["etag"])
        self._resolved(
            d,
            d.resolve_target,
            code if isinstance(code, int) else 500,
            etag if isinstance(etag, bytes) else None,
            ms,
        )

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
            self._set_interval(d, float(fields["interval"]))
        self.counters.configs += code == devicemsg.OK
        ack: dict[str, Any] = {"id": d.ident, "cfgver": ver, "code": code}
        if msg:
            ack["msg"] = msg[:120]
        if d.conn is not None:
            d.conn.publish(devicemsg.topic(d.ident, "cfgack"), devicemsg.encode("config_ack", ack), qos=1)

    def _set_interval(self, d: Device, interval: float) -> None:
        """As the firmware: a shorter interval brings the next report forward, a longer one applies after it."""
        d.interval = interval
        assert self._loop is not None
        t = self._loop.time() + interval
        if t < d.next_due and d.next_timer is not None and not self.stopping:
            d.next_timer.cancel()
            d.next_due = t
            d.next_timer = self._loop.call_at(t, self._report_due, d)

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


def _max_age(datagram: bytes) -> float | None:
    """The Max-Age option of an answer, None when it has none (or does not parse)."""
    try:
        for number, value in Message.decode(datagram).options:
            if number == Option.MAX_AGE:
                return float(int.from_bytes(value, "big"))
    except MessageError:
        return None
    return None
