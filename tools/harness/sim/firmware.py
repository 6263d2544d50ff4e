"""Firmware mode: every device is a real ``micropython firmware/main.py`` process (unix board).

Device ``n`` gets its own data dir ``<data dir>/<topic key of its identifier>/`` (its flash: identity, boot
counter, report queue, config), provisioned by :func:`tools.harness.sim.provision.provision`, a unique id, and
``IDA_INTERVAL`` = the report interval. Processes start 50 ms apart; each reports at boot and then every
interval (the firmware's own schedule). Their console is a pipe, spoken by
:class:`tools.support.console.DeviceConsole` (the ``ida console`` class, over a
:class:`~tools.support.console.PipePort`, read by a :class:`~tools.support.console.ConsolePump` thread per
device): the fleet switches it to JSON lines, asks ``status`` every couple of seconds and adds up what the devices say (reports made = seq, acknowledged,
queued, transport errors, the boot-time resolve of their own identifier, and ``resolve`` commands when
``resolve_every`` is set). The firmware does not expose retries or ack latency, so those stay empty here.

Processes run in their own session (Ctrl-C reaches only the simulator, which then stops them in order: final
status, SIGINT -- the firmware flushes its queue --, SIGKILL after 3 s) and die with the simulator
(PR_SET_PDEATHSIG) even if it is killed. stderr goes to ``<device dir>/stderr.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto import devicemsg
from tools.harness.sim.config import SimConfig, SimError
from tools.harness.sim.fleet import FleetBase
from tools.harness.sim.provision import device_env, device_process, provision, uid_for
from tools.harness.sim.stats import Histogram, SimResult
from tools.support.console import RESOLVE_TIMEOUT, Banner, ConsoleError, Crash, Event, Log, Transcript
from tools.support.console.process import ConsoleProcess
from tools.support.procs import ProcessError, micropython_binary

__all__ = ["FirmwareFleet"]

STATUS_EVERY = 2.0
START_GAP = 0.05
STOP_GRACE = 3.0
STATUS_TIMEOUT = 10.0
TAIL_LINES = 40  # console lines kept per device, shown when it exits
_RESOLVE_LOG = re.compile(r"^I app resolve id=\S+ code=(\d+)")


@dataclass
class _Device:
    n: int
    ident: str
    transport: str
    data_dir: Path
    device: ConsoleProcess | None = None
    status: dict[str, Any] = field(default_factory=dict)  # its last ``status`` reply
    exited_reported: bool = False
    replies: int = 0  # status replies received

    def alive(self) -> bool:
        return self.device is not None and self.device.alive()


class FirmwareFleet(FleetBase):
    mode = "firmware"

    def __init__(self, cfg: SimConfig, *, log: Callable[[str], None] | None = None) -> None:
        super().__init__(cfg, log=log)
        self.devices: list[_Device] = []

    async def start(self) -> None:
        cfg = self.cfg
        try:
            mp = micropython_binary()
        except ProcessError as e:
            raise SimError(str(e)) from None
        self._started()
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SimError(f"data dir {str(cfg.data_dir)!r}: {e.strerror or e}") from None
        for n in range(cfg.devices):
            ident = cfg.identifier(n)
            transport = cfg.transport_of(n)
            d = _Device(n, ident, transport, cfg.data_dir / devicemsg.topic_key(ident))
            provision(
                d.data_dir,
                ident,
                transport=transport,
                coap=cfg.gateway if cfg.uses("coap") else None,
                mqtt=cfg.broker if cfg.uses("mqtt") else None,
            )
            self.devices.append(d)
        self.log(f"firmware fleet: {cfg.devices} micropython processes under {cfg.data_dir}")
        try:
            for i, d in enumerate(self.devices):
                if i:
                    await asyncio.sleep(START_GAP)
                self._spawn(d, mp)
        except BaseException:
            await self._kill_all()
            raise
        self.spawn(self._status_loop())
        if cfg.resolve_every > 0:
            self.spawn(self._resolve_loop())

    def _spawn(self, d: _Device, mp: str) -> None:
        """The firmware process, and a console on its pipes read by its own thread (events to the loop)."""
        env = device_env(d.data_dir, uid=uid_for(self.cfg.first + d.n), interval=int(self.cfg.interval))
        d.device = device_process(
            d.ident,
            d.data_dir,
            env,
            mp,
            transcript=Transcript(d.ident, keep=TAIL_LINES),
            on_event=self._event,
            on_end=lambda _why: self._ended(d),
            loop=asyncio.get_running_loop(),
            error=SimError,
        ).start()

    def _event(self, ev: Event) -> None:
        """A log line or boot banner (replies go to whoever asked): the firmware resolves its own identifier
        once its transport is up, and says so in its log."""
        if isinstance(ev, Log | Banner | Crash):
            m = _RESOLVE_LOG.match(ev.line if not isinstance(ev, Log) else ev.text)
            if m:
                self.counters.resolves += 1
                self.counters.count_resolve(int(m.group(1)))

    def _ended(self, d: _Device) -> None:
        if not self.stopping and not d.exited_reported:
            d.exited_reported = True
            self.counters.errors += 1
            self.spawn(self._report_exit(d))

    async def _report_exit(self, d: _Device) -> None:
        if d.device is None:
            return
        await d.device.wait_exit(5.0)
        tail = list(d.device.transcript.lines)[-10:] if d.device.transcript else []
        rc = d.device.process.returncode
        self.log(f"device {d.ident} exited with {rc}; last output:\n  " + "\n  ".join(tail))

    async def _ask(self, d: _Device, line: str, timeout: float) -> dict[str, Any] | None:
        """The reply object, None when the device could not be asked or did not answer in time."""
        if d.device is None or not d.device.reading:
            return None
        try:
            return (await d.device.ask_async(line, timeout)).obj
        except ConsoleError:
            return None

    async def _status(self, d: _Device) -> None:
        st = await self._ask(d, "status", STATUS_TIMEOUT)
        if st is not None and st.get("ok"):
            d.status = st
            d.replies += 1

    async def _resolve(self, d: _Device, target: str) -> None:
        t0 = time.monotonic()
        obj = await self._ask(d, f"resolve {target}", RESOLVE_TIMEOUT)
        if obj is None:
            return  # not asked (the device is gone) or no answer at all: nothing the firmware counted
        code = obj.get("code")
        self.counters.resolves += 1
        if not isinstance(code, int):  # refused by the console: offline, busy...
            self.counters.resolve_errors += 1
        elif self.counters.count_resolve(code):
            self.resolve_ms.add((time.monotonic() - t0) * 1000.0)

    async def _status_all(self) -> None:
        await asyncio.gather(*(self._status(d) for d in self.devices if d.alive()))

    async def _status_loop(self) -> None:
        while True:
            self.spawn(self._status_all())
            await asyncio.sleep(STATUS_EVERY)

    async def _resolve_loop(self) -> None:
        ids = self.cfg.resolve_ids
        k = 0
        gap = self.cfg.resolve_every / max(1, len(self.devices))
        while True:
            for d in self.devices:
                await asyncio.sleep(gap)
                if self.stopping:
                    return
                target = ids[k % len(ids)] if ids else d.ident
                k += 1
                self.spawn(self._resolve(d, target))

    # -- results --------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return sum(int(d.status.get("queue") or 0) for d in self.devices)

    def snapshot(self) -> SimResult:
        c = self.counters.copy()
        st = [d.status for d in self.devices]
        c.made = sum(int(s.get("seq") or 0) for s in st)
        c.acked = sum(int(s.get("acked") or 0) for s in st)
        c.dropped = sum(int(s.get("dropped") or 0) for s in st)
        c.sent = c.made
        c.errors += sum(int(s.get("errors") or 0) for s in st)
        res = self._result(c, len(self.devices), self.pending, sum(1 for s in st if s.get("transport_on")))
        res.processes = sum(1 for d in self.devices if d.alive())
        res.notes.append(
            "firmware mode: counts come from each device's `status` (sent = made; retries and ack "
            "latency are not exposed by the firmware)"
        )
        return res

    def take_window(self) -> Histogram:
        return Histogram()

    async def stop(self, drain: float | None = None) -> SimResult:
        drain = self.cfg.drain if drain is None else drain
        self.stopping = True
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and any(d.status.get("queue") for d in self.devices):
            await self._status_within(max(0.05, deadline - time.monotonic()))
            await asyncio.sleep(0.3)
        await self._status_within(1.5)  # one last status from everyone
        self.t_stop = time.monotonic()
        await self.tasks.cancel()
        await self._kill_all()
        return self.snapshot()

    async def _status_within(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._status_all(), seconds)

    async def _kill_all(self) -> None:
        """SIGINT (the firmware flushes its queue and exits), SIGKILL after STOP_GRACE; reap every process,
        end every console thread."""
        self.stopping = True
        live = [d for d in self.devices if d.alive()]
        for d in live:
            assert d.device is not None
            d.device.interrupt()
        await asyncio.gather(*(d.device.wait_exit(STOP_GRACE) for d in live if d.device is not None))
        for d in live:
            if d.device is not None and d.device.alive():
                await asyncio.to_thread(d.device.process.kill)
        for d in self.devices:
            if d.device is not None:
                await asyncio.to_thread(d.device.release)
