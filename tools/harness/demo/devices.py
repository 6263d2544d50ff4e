"""The demo's three devices: the real firmware under ``micropython`` (provisioned with
:mod:`tools.harness.sim.provision`), each driven through its console by a
:class:`~tools.support.console.DeviceConsole` over the process's pipes, read by a
:class:`~tools.support.console.ConsolePump` thread. What the consoles say (boot, network, resolves, status) is
narrated; the story asks them questions with :meth:`DemoDevice.ask`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto import devicemsg
from tools.harness.demo import narration
from tools.harness.demo.errors import DemoError
from tools.harness.demo.settings import (
    DEMO_DIR_ENV,
    DEVICE_STOP_GRACE,
    DEVICES,
    REPORT_INTERVAL,
    START_TIMEOUT,
    STATUS_EVERY,
)
from tools.harness.sim.config import SimError
from tools.harness.sim.provision import device_env, device_process, provision, uid_for
from tools.support.console import (
    Banner,
    CommandTimeout,
    ConsoleError,
    Crash,
    Event,
    Log,
    Transcript,
)
from tools.support.console.process import ConsoleProcess
from tools.support.procs import ProcessError, micropython_binary

__all__ = ["DemoDevice", "DemoFleet"]

TRANSCRIPT_LINES = 200  # console lines kept in memory per device (console.log has them all)


@dataclass
class DemoDevice:
    ident: str
    transport: str
    role: str
    data_dir: Path
    device: ConsoleProcess | None = None
    status: dict[str, Any] | None = None
    booted: asyncio.Event = field(default_factory=asyncio.Event)
    first_resolve: asyncio.Event = field(default_factory=asyncio.Event)
    catching_up: bool = False
    offline_at: float | None = None
    exit_code: int | None = None
    stopping: bool = False

    @property
    def name(self) -> str:
        return self.ident.split("/", 1)[1]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.transport})"

    async def ask(self, line: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a console command and wait for its JSON reply (the reply object)."""
        if self.device is None or not self.device.reading:
            raise DemoError(f"device {self.name} is not running")
        try:
            reply = await self.device.ask_async(line, timeout)
        except CommandTimeout:
            raise DemoError(f"device {self.name} did not answer `{line}` within {timeout:.0f} s") from None
        except ConsoleError as e:
            raise DemoError(f"device {self.name}: {e}") from None
        return reply.obj


@dataclass
class DemoFleet:
    """Starts the devices, narrates their consoles, follows their status; ``failed`` is called when one dies."""

    workdir: Path
    say: Callable[[str], None]
    failed: Callable[[str], None]
    coap_port: int
    broker_port: int
    devices: list[DemoDevice] = field(default_factory=list)

    def dev(self, name: str) -> DemoDevice:
        return next(d for d in self.devices if d.name == name)

    # ---- start
    async def start(self) -> None:
        try:
            mp = micropython_binary()
        except ProcessError as e:
            raise DemoError(str(e)) from None
        loop = asyncio.get_running_loop()
        for i, (ident, transport, role) in enumerate(DEVICES, start=1):
            d = DemoDevice(ident, transport, role, self.workdir / "devices" / devicemsg.topic_key(ident))
            try:
                provision(
                    d.data_dir,
                    ident,
                    transport=transport,
                    coap=f"coap://127.0.0.1:{self.coap_port}" if transport == "coap" else None,
                    mqtt=f"mqtt://127.0.0.1:{self.broker_port}" if transport == "mqtt" else None,
                )
            except SimError as e:
                raise DemoError(f"cannot provision {ident}: {e}") from None
            env = device_env(d.data_dir, uid=uid_for(i), interval=REPORT_INTERVAL)
            env[DEMO_DIR_ENV] = str(self.workdir)
            transcript = Transcript(d.name, keep=TRANSCRIPT_LINES)
            transcript.attach(d.data_dir / "console.log")
            d.device = device_process(
                d.name,
                d.data_dir,
                env,
                mp,
                transcript=transcript,
                on_event=functools.partial(self._event, d),
                on_end=functools.partial(self._ended, d),
                loop=loop,
                error=DemoError,
            ).start()
            self.devices.append(d)
            self.say(
                f"device {d.name} started: real firmware under micropython, {role}, provisioned as {ident}"
            )
        try:
            await asyncio.wait_for(asyncio.gather(*(d.booted.wait() for d in self.devices)), START_TIMEOUT)
            await asyncio.wait_for(
                asyncio.gather(*(d.first_resolve.wait() for d in self.devices)), START_TIMEOUT
            )
        except TimeoutError:
            late = [d.name for d in self.devices if not d.first_resolve.is_set()]
            raise DemoError(
                f"devices {', '.join(late)} did not come online within {START_TIMEOUT:.0f} s "
                f"(see {self.workdir}/devices/*/console.log)"
            ) from None

    # ---- device output
    def _event(self, d: DemoDevice, ev: Event) -> None:
        if isinstance(ev, Banner):
            line = narration.boot_line(d.label, ev.line)
            if line is not None:
                d.booted.set()
                self.say(line)
            return
        if not isinstance(ev, Log | Crash):
            return  # replies nobody waits for any more, echoed text
        text = ev.text if isinstance(ev, Log) else ev.line
        target = (
            f"127.0.0.1:{self.coap_port}"
            if d.transport == "coap"
            else f"the broker 127.0.0.1:{self.broker_port}"
        )
        told = narration.log_line(
            d.name, d.label, text.strip(), target=target, first_resolve_done=d.first_resolve.is_set()
        )
        if told is None:
            return
        kind, sentence = told
        if kind == "down":
            d.offline_at = time.monotonic()
        self.say(sentence)
        if kind == "resolved":
            d.first_resolve.set()

    def _ended(self, d: DemoDevice, _why: ConsoleError | None = None) -> None:
        """The console's pipe closed: the process exited (or is about to)."""
        asyncio.ensure_future(self._reap(d))

    async def _reap(self, d: DemoDevice) -> None:
        if d.device is not None:
            await d.device.wait_exit(5.0)
            d.exit_code = d.device.process.returncode
        if not d.stopping:
            self.failed(f"device {d.name} exited with code {d.exit_code} (see {d.data_dir}/stderr.log)")

    # ---- status: reports made, queued, delivered
    async def status_loop(self) -> None:
        while True:
            for d in self.devices:
                if d.booted.is_set() and d.exit_code is None and not d.stopping:
                    with contextlib.suppress(DemoError):
                        self.status(d, await d.ask("status", timeout=5))
            await asyncio.sleep(STATUS_EVERY)

    def status(self, d: DemoDevice, st: dict[str, Any]) -> None:
        """Take a ``status`` reply; say what changed: reports queued offline, reports delivered."""
        prev = d.status or {"seq": 0, "acked": 0, "queue": 0}
        d.status = st
        seq, acked, queue = int(st.get("seq") or 0), int(st.get("acked") or 0), int(st.get("queue") or 0)
        made = seq - int(prev.get("seq") or 0)
        delivered = acked - int(prev.get("acked") or 0)
        if made > 0 and st.get("net") == "down":
            what = f"report {seq}" if made == 1 else f"reports {seq - made + 1}-{seq}"
            self.say(f"{d.name} offline: {what} queued in flash ({queue} waiting)")
        if delivered > 0 and not d.catching_up:
            if delivered == 1 and queue == 0:
                self.say(
                    f"{d.label} report {seq} delivered: the gateway acknowledged it ({acked} since boot)"
                )
            else:
                self.say(
                    f"{d.label} {delivered} reports delivered ({acked} since boot, {queue} still queued)"
                )

    async def fresh_status(self, d: DemoDevice) -> dict[str, Any]:
        st = await d.ask("status", timeout=5)
        self.status(d, st)
        return st

    # ---- stop
    async def stop(self) -> None:
        """SIGINT to every device (the firmware flushes its queue to flash), SIGKILL after DEVICE_STOP_GRACE."""
        for d in self.devices:
            d.stopping = True
        for d in self.devices:
            if d.device is not None:
                d.device.interrupt()
        killed = []
        for d in self.devices:
            if d.device is None:
                continue
            if not await d.device.wait_exit(DEVICE_STOP_GRACE):
                killed.append(d.name)
                await asyncio.to_thread(d.device.process.kill)
            await asyncio.to_thread(d.device.release)
            if d.device.transcript is not None:
                d.device.transcript.close()
        if self.devices:
            extra = f" ({', '.join(killed)} killed after {DEVICE_STOP_GRACE:.0f} s)" if killed else ""
            q = ", ".join(f"{d.name} {d.status.get('queue', 0)}" for d in self.devices if d.status)
            self.say(
                f"{len(self.devices)} devices stopped{extra}; reports left in their queues: {q or 'none'}"
            )
