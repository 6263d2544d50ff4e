"""The other ends of the fault tests (tests/integration/test_faults.py), in the test process:

* :class:`Consumer` -- the northbound side: an HTTP webhook (aiohttp) that counts every raw delivery and
  de-duplicates by ``(id, boot, seq)`` (the ``Idempotency-Key``), as a real consumer must.
* :class:`MqttFleet` -- light devices over MQTT (paho, as tests/support/brokers.Device) that retry like the
  firmware: resolves with a new token after a timeout, reports until their ``report_ack`` arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from aiohttp import web

from proto import devicemsg
from tests.support.brokers import Device
from tests.support.webapp import LoopbackApp

__all__ = ["Consumer", "FleetStats", "MqttFleet"]


# -- the northbound consumer ------------------------------------------------------------------------------
class Consumer(LoopbackApp):
    """Webhook sink consumer: counts raw deliveries, keeps the de-duplicated set of (id, boot, seq)."""

    path = "/reports"

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = (
            delay  # seconds before answering 200 (widens the crash window between delivery and delete)
        )
        self.raw = 0
        self.keys: Counter[tuple[str, int, int]] = Counter()
        self.by_transport: Counter[str] = Counter()

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = (str(body["id"]), int(body["boot"]), int(body["seq"]))
        assert request.headers.get("Idempotency-Key") == f"{key[0]}|{key[1]}|{key[2]}"
        self.raw += 1
        if key not in self.keys:
            self.by_transport[str(body.get("transport"))] += 1
        self.keys[key] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"ok": True})

    @property
    def unique(self) -> int:
        return len(self.keys)

    @property
    def duplicates(self) -> int:
        return self.raw - len(self.keys)

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(self.path, self._post)


# -- light MQTT devices ---------------------------------------------------------------------------------------
@dataclass
class FleetStats:
    resolves_sent: int = 0  # resolve requests published (retries included)
    resolves_answered: int = 0  # distinct resolves that got an answer
    resolve_codes: Counter[int] = field(default_factory=Counter)
    reports: int = 0  # distinct reports made
    reports_sent: int = 0  # publishes (retries included)
    reports_acked: int = 0
    failures: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # longest time a device waited for any answer

    @property
    def resolve_retries(self) -> int:
        """Resolve requests that went unanswered: each was followed by a new one, or the device gave up."""
        return self.resolves_sent - self.resolves_answered

    @property
    def report_retries(self) -> int:
        """Report publishes that went unacknowledged: each was followed by a new one, or the device gave up."""
        return self.reports_sent - self.reports_acked

    def figures(self) -> dict[str, Any]:
        """The fleet's part of a fault test's FIGURES line: requests sent and retried, the longest wait."""
        return {
            "resolves_sent": self.resolves_sent,
            "resolve_retries": self.resolve_retries,
            "reports_sent": self.reports_sent,
            "report_retries": self.report_retries,
            "max_wait_s": round(max(self.gaps), 2),
        }


@dataclass
class MqttFleet:
    """``idents`` devices on the broker at ``url``; each runs ``cycles`` rounds of (one resolve of one of
    ``handles``, one report), retrying every request until it is answered (resolve: a new token after
    ``resolve_timeout``; report: the same report after ``report_timeout``), as the firmware does. ``boot`` is the
    boot number of every device's reports."""

    url: str
    idents: list[str]
    handles: list[str]
    _: KW_ONLY
    boot: int = 1
    cycles: int = 10
    pause: float = 0.05
    resolve_timeout: float = 1.0
    report_timeout: float = 1.5
    give_up: float = 40.0  # seconds one request is retried before it counts as a failure
    devices: list[Device] = field(default_factory=list, init=False)
    stats: FleetStats = field(default_factory=FleetStats, init=False)
    sent_keys: set[tuple[str, int, int]] = field(default_factory=set, init=False)
    progress: int = field(
        default=0, init=False
    )  # answered requests, all devices together (the test watches it)

    async def connect(self) -> None:
        self.devices = [Device(self.url, ident) for ident in self.idents]
        await asyncio.gather(*(d.connect(10) for d in self.devices))

    def close(self) -> None:
        for d in self.devices:
            with contextlib.suppress(Exception):
                d.disconnect()

    async def run(self) -> FleetStats:
        await asyncio.gather(*(self._device(i, d) for i, d in enumerate(self.devices)))
        return self.stats

    async def _await(
        self, q: asyncio.Queue[tuple[bytes, bool]], match: Callable[[dict[int, Any]], bool], timeout: float
    ) -> dict[int, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                payload, _ = await asyncio.wait_for(q.get(), left)
            except TimeoutError:
                return None
            try:
                obj = devicemsg.loads(payload)
            except devicemsg.WireError:
                continue
            if isinstance(obj, dict) and match(obj):
                return obj

    async def _until_answered(
        self,
        attempt: Callable[[], Callable[[dict[int, Any]], bool]],
        q: asyncio.Queue[tuple[bytes, bool]],
        timeout: float,
        failure: str,
    ) -> tuple[dict[int, Any] | None, float]:
        """``attempt()`` sends a request and returns the test of its answer; sent again after ``timeout`` until
        answered, or until ``give_up`` seconds have passed (then ``failure`` is recorded and the answer is None).
        Returns the answer and the seconds it took."""
        t0 = time.monotonic()
        while True:
            answer = await self._await(q, attempt(), timeout)
            if answer is not None:
                self.progress += 1
                return answer, time.monotonic() - t0
            if time.monotonic() - t0 > self.give_up:
                self.stats.failures.append(failure)
                return None, time.monotonic() - t0

    async def _device(self, i: int, dev: Device) -> None:
        st = self.stats
        tokens = itertools.count(1)
        res_q, ack_q = dev.queue("res"), dev.queue("ack")
        for cycle in range(self.cycles):
            handle = self.handles[(i + cycle) % len(self.handles)]
            seq = cycle + 1

            def resolve(handle: str = handle) -> Callable[[dict[int, Any]], bool]:
                token = i.to_bytes(2, "big") + next(tokens).to_bytes(4, "big")  # a new token each time
                dev.resolve(token, handle)
                st.resolves_sent += 1
                return lambda o: o.get(devicemsg.KEYS["token"]) == token

            def report(seq: int = seq) -> Callable[[dict[int, Any]], bool]:
                dev.report(self.boot, seq)  # the same report each time
                st.reports_sent += 1
                return lambda o: (
                    o.get(devicemsg.KEYS["boot"]) == self.boot and o.get(devicemsg.KEYS["seq"]) == seq
                )

            ans, resolve_wait = await self._until_answered(
                resolve, res_q, self.resolve_timeout, f"{dev.identifier} resolve {handle} never answered"
            )
            if ans is not None:
                st.resolves_answered += 1
                st.resolve_codes[int(ans.get(devicemsg.KEYS["code"], 0))] += 1
            self.sent_keys.add((dev.identifier, self.boot, seq))
            st.reports += 1
            ack, report_wait = await self._until_answered(
                report, ack_q, self.report_timeout, f"{dev.identifier} report {seq} never acknowledged"
            )
            if ack is not None:
                st.reports_acked += 1
            st.gaps.append(max(resolve_wait, report_wait))
            await asyncio.sleep(self.pause)
