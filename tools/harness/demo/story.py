"""The demo's story: the devices look each other up (from upstream, from the gateway cache, over CoAP and MQTT,
from their own cache), VALVE-0001 loses its network and catches up, then a quieter loop keeps the system busy
until the end. Every step says what happened, with resolution times measured at the device's console."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tools.harness.demo import narration
from tools.harness.demo.devices import DemoDevice, DemoFleet
from tools.harness.demo.gatewayapi import GatewayApi
from tools.harness.demo.settings import OUTAGE_S, PREFIX, REPORT_INTERVAL, STEP, SUMMARY_EVERY

__all__ = ["Story"]

STEADY_TARGETS = tuple(
    f"{PREFIX}/{s}"
    for s in (
        "MOTOR-0002",
        "VALVE-0002",
        "LINE-0001",
        "TTL-0001",
        "MANY-0001",
        "PUMP-0001",
        "SENSOR-0001",
        "NOPE-0404",
    )
)


class Story:
    def __init__(self, fleet: DemoFleet, gateway: GatewayApi, say: Callable[[str], None]) -> None:
        self.fleet = fleet
        self.gateway = gateway
        self.say = say

    async def summary(self, final: bool = False) -> None:
        self.say(await self.gateway.summary(final))

    async def resolve(self, d: DemoDevice, target: str) -> str | None:
        t0 = time.monotonic()
        reply = await d.ask(f"resolve {target}", timeout=15)
        ms = (time.monotonic() - t0) * 1000
        source = str(reply.get("source"))
        words = narration.source_words(source)
        if reply.get("code") in (
            100,
            200,
        ):  # handle not found / values not found: a real answer, cached briefly
            what = "does not exist (handle not found)" if reply.get("code") == 100 else "has no such values"
            self.say(f"{d.label} resolved {target} in {ms:.1f} ms {words}: it {what}")
            return source
        if not reply.get("ok"):
            self.say(f"{d.label} could not resolve {target}: {reply.get('error')}")
            return None
        values = reply.get("values") or []
        shown = narration.shown_value(values)
        self.say(
            f"{d.label} resolved {reply.get('id', target)} in {ms:.1f} ms {words}: {len(values)} values"
            + (f", {shown}" if shown else "")
        )
        return source

    async def outage(
        self, d: DemoDevice, seconds: float, reports: int, during: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        await d.ask("net down")
        await asyncio.sleep(STEP / 2)
        for _ in range(reports):
            await d.ask("report")
            await asyncio.sleep(STEP / 2)
        reply = await d.ask(f"resolve {PREFIX}/PUMP-0001")
        if not reply.get("ok"):
            self.say(f"{d.label} tries to resolve {PREFIX}/PUMP-0001 while offline: {reply.get('error')}")
        if during is not None:
            await during()
        left = seconds - (time.monotonic() - (d.offline_at or time.monotonic()))
        if left > 0:
            await asyncio.sleep(left)
        st = await self.fleet.fresh_status(d)
        queued, acked0 = int(st.get("queue") or 0), int(st.get("acked") or 0)
        offline = time.monotonic() - (d.offline_at or time.monotonic())
        d.catching_up = True
        t0 = time.monotonic()
        await d.ask("net up")
        self.say(f"{d.name} network is back after {offline:.0f} s offline: {queued} queued reports to send")
        try:
            deadline = time.monotonic() + 60
            while True:
                await asyncio.sleep(0.25)
                st = await d.ask("status", timeout=5)
                d.status = st
                if (
                    st.get("transport_on")
                    and int(st.get("queue") or 0) == 0
                    and int(st.get("acked") or 0) > acked0
                ):
                    break
                if time.monotonic() > deadline:
                    self.say(f"{d.name} has not caught up after 60 s: {st.get('queue')} reports still queued")
                    return
        finally:
            d.catching_up = False
        delivered = int(st.get("acked") or 0) - acked0
        self.say(
            f"{d.label} back online: {delivered} queued reports delivered in {time.monotonic() - t0:.1f} s "
            f"(queue {queued} -> 0, all acknowledged)"
        )
        confirmed = await self.gateway.reports_of(d.ident, d.name)
        if confirmed:
            self.say(confirmed)

    async def tell(self) -> None:
        """The story; once it is told, a quieter loop keeps the system busy until the end."""
        dev = self.fleet.dev
        pump, motor, valve = dev("PUMP-0001"), dev("MOTOR-0001"), dev("VALVE-0001")
        say = self.say
        await asyncio.sleep(STEP)
        say("-- each device resolved its own identifier from upstream; now they look up each other's")
        await self.resolve(pump, motor.ident)  # MOTOR resolved it at boot: in the gateway cache (CoAP)
        await asyncio.sleep(STEP)
        await self.resolve(motor, pump.ident)  # gateway cache, over MQTT
        await asyncio.sleep(STEP)
        await self.resolve(pump, f"{PREFIX}/SENSOR-0001")  # nobody asked yet: upstream, CoAP
        await asyncio.sleep(STEP)
        await self.resolve(motor, f"{PREFIX}/LINE-0001/STATION-03")  # upstream, MQTT
        await asyncio.sleep(STEP)
        say(f"-- VALVE-0001 loses its network for {OUTAGE_S:.0f} s; the others carry on")

        async def meanwhile() -> None:
            await self.resolve(pump, f"{PREFIX}/SENSOR-0001")  # the device's own cache
            await asyncio.sleep(STEP / 2)
            await self.resolve(motor, f"{PREFIX}/SENSOR-0001")  # gateway cache, MQTT
            await asyncio.sleep(STEP / 2)
            await pump.ask("report")
            await motor.ask("report")

        await self.outage(valve, OUTAGE_S, 3, meanwhile)
        await asyncio.sleep(STEP / 2)
        await self.resolve(valve, f"{PREFIX}/LINE-0001/STATION-03")  # gateway cache, CoAP
        await asyncio.sleep(STEP / 2)
        await self.summary()
        say(
            f"-- the story is told; devices keep reporting every {REPORT_INTERVAL} s and resolving now and then "
            "(Ctrl-C to stop)"
        )
        await self.steady()

    async def steady(self) -> None:
        devices = self.fleet.devices
        k = 0
        last_summary = time.monotonic()
        while True:
            d = devices[k % len(devices)]
            await self.resolve(d, STEADY_TARGETS[(k // len(devices) + k) % len(STEADY_TARGETS)])
            k += 1
            await asyncio.sleep(2 * STEP)
            if time.monotonic() - last_summary >= SUMMARY_EVERY:
                await self.summary()
                last_summary = time.monotonic()
            if k % 45 == 0:
                await self.outage(self.fleet.dev("VALVE-0001"), OUTAGE_S, 2)
