"""How a device of the light fleet reports (:mod:`tools.harness.sim.light`), as the firmware's reporter does.

A device has one report in flight and sends the oldest queued first; a full queue drops its oldest report not in
flight (``dropped``). On no answer, 4.29 or 5.xx it retries the same report after a backoff (2 s doubling to
300 s) -- after a 5.03 with a Max-Age (the gateway's "registry busy, come back later") it waits that long
instead (``busy``); any other 4.xx drops it (``rejected``).

CoAP devices: ``POST /d/<id>/rpt`` confirmable, via :mod:`tools.harness.sim.coap`; the 2.04 carries the
``report_ack``. MQTT devices: QoS 1 on ``rpt``; the ``report_ack`` on ``ack`` (matched by boot and seq) completes
it; none within 10 s counts as a timeout and the report is retried.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Any

from proto import devicemsg
from proto.coap import Message, MessageError
from proto.coap.numbers import CHANGED, Code, Option
from tools.harness.sim import devices
from tools.harness.sim.coap import NO_RESPONSE, RESET
from tools.harness.sim.devices import Device, Report
from tools.harness.sim.light_base import LightBase, perf

__all__ = ["Reporting", "MQTT_REPORT_TIMEOUT"]

MQTT_REPORT_TIMEOUT = 10.0
TOO_MANY = Code.TOO_MANY_REQUESTS


class Reporting(LightBase):
    """The report exchanges of the light fleet: made on schedule (:meth:`_make`), sent, answered."""

    def _make(self, d: Device) -> None:
        """The report of ``d``'s schedule: queued, and sent unless one is in flight."""
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
            d.report_t0 = perf()
            d.report_timer = self.loop.call_later(MQTT_REPORT_TIMEOUT, self._mqtt_report_timeout, d, rep)
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
        if wait is not None:
            d.retry_timer = self.loop.call_later(wait * self.rng.uniform(1.0, 1.25), self._retry, d)
            return
        d.retry_timer = self.loop.call_later(d.backoff * self.rng.uniform(1.0, 1.25), self._retry, d)
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
            self._acked(d, rep, (perf() - d.report_t0) * 1000.0)
        elif code == devicemsg.RATE_LIMITED or code >= 500:
            self.counters.errors += 1
            self._failed(d, rep)
        else:
            self._rejected(d, rep)


def _max_age(datagram: bytes) -> float | None:
    """The Max-Age option of an answer, None when it has none (or does not parse)."""
    try:
        for number, value in Message.decode(datagram).options:
            if number == Option.MAX_AGE:
                return float(int.from_bytes(value, "big"))
    except MessageError:
        return None
    return None
