"""Firmware mode: every device is a real ``micropython firmware/main.py`` process (unix board).

Device ``n`` gets its own data dir ``<data dir>/<topic key of its identifier>/`` (its flash: identity, boot
counter, report queue, config), provisioned by :func:`tools.harness.sim.provision.provision`, a unique id, and
``IDA_INTERVAL`` = the report interval. Processes start 50 ms apart; each reports at boot and then every
interval (the firmware's own schedule). Their console is a pipe: the fleet switches it to JSON lines, asks
``status`` every couple of seconds and adds up what the devices say (reports made = seq, acknowledged,
queued, transport errors, the boot-time resolve of their own identifier, and ``resolve`` commands when
``resolve_every`` is set). The firmware does not expose retries or ack latency, so those stay empty here.

Processes run in their own session (Ctrl-C reaches only the simulator, which then stops them in order: final
status, SIGINT -- the firmware flushes its queue --, SIGKILL after 3 s) and die with the simulator
(PR_SET_PDEATHSIG) even if it is killed. stderr goes to ``<device dir>/stderr.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proto import devicemsg
from tools.harness.sim.config import SimConfig, SimError
from tools.harness.sim.provision import (
    device_command,
    device_env,
    die_with_parent,
    micropython_binary,
    provision,
    uid_for,
)
from tools.harness.sim.stats import Counters, Histogram, SimResult

__all__ = ["FirmwareFleet"]

STATUS_EVERY = 2.0
START_GAP = 0.05
STOP_GRACE = 3.0
_RESOLVE_LOG = re.compile(r"^I app resolve id=\S+ code=(\d+)")


class _Device:
    def __init__(self, n: int, ident: str, transport: str, data_dir: Path) -> None:
        self.n = n
        self.ident = ident
        self.transport = transport
        self.data_dir = data_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.status: dict[str, Any] = {}
        self.tail: deque[str] = deque(maxlen=40)
        self.reader: asyncio.Task[None] | None = None
        self.exited_reported = False
        self.replies = 0  # status replies received


class FirmwareFleet:
    mode = "firmware"

    def __init__(self, cfg: SimConfig, *, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda _m: None)
        self.counters = Counters()
        self.resolve_ms = Histogram()
        self.devices: list[_Device] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.t_start = 0.0
        self.t_stop: float | None = None
        self.stopping = False
        self._resolve_sent: dict[int, float] = {}
        self._cpu0 = 0.0

    async def start(self) -> None:
        cfg = self.cfg
        mp = micropython_binary()
        self.t_start = time.monotonic()
        self._cpu0 = time.process_time()
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
                await self._spawn(d, mp)
        except BaseException:
            await self._kill_all()
            raise
        self._task(self._status_loop())
        if cfg.resolve_every > 0:
            self._task(self._resolve_loop())

    async def _spawn(self, d: _Device, mp: str) -> None:
        env = device_env(d.data_dir, uid=uid_for(self.cfg.first + d.n), interval=int(self.cfg.interval))
        with open(d.data_dir / "stderr.log", "ab") as err:
            d.proc = await asyncio.create_subprocess_exec(
                *device_command(mp),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=str(d.data_dir),
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        d.reader = asyncio.ensure_future(self._read(d))
        self._send(d, "json on")

    def _task(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _send(self, d: _Device, line: str) -> None:
        p = d.proc
        if p is None or p.returncode is not None or p.stdin is None or p.stdin.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            p.stdin.write(line.encode() + b"\n")

    async def _read(self, d: _Device) -> None:
        assert d.proc is not None and d.proc.stdout is not None
        while True:
            try:
                raw = await d.proc.stdout.readline()
            except (ValueError, OSError):  # a line over the limit, a closed pipe
                continue
            if not raw:
                break
            self._line(d, raw.decode("utf-8", "replace").rstrip("\r\n"))
        if not self.stopping and not d.exited_reported:
            d.exited_reported = True
            self.counters.errors += 1
            rc = await d.proc.wait()
            self.log(f"device {d.ident} exited with {rc}; last output:\n  " + "\n  ".join(list(d.tail)[-10:]))

    def _line(self, d: _Device, line: str) -> None:
        text = line
        obj: Any = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
        if isinstance(obj, dict):
            if isinstance(obj.get("log"), str):
                text = obj["log"]
            elif obj.get("cmd") == "status" and obj.get("ok"):
                d.status = obj
                d.replies += 1
                return
            elif obj.get("cmd") == "resolve":
                self._console_resolve(d, obj)
                return
            else:
                return
        d.tail.append(text)
        m = _RESOLVE_LOG.match(text)
        if m:  # the firmware resolves its own identifier once its transport is up
            self._count_resolve(int(m.group(1)))

    def _count_resolve(self, code: int) -> None:
        c = self.counters
        c.resolves += 1
        if code == devicemsg.OK:
            c.resolves_ok += 1
        elif code in (devicemsg.NOT_FOUND, devicemsg.VALUES_NOT_FOUND):
            c.resolves_not_found += 1
        else:
            c.resolve_errors += 1

    def _console_resolve(self, d: _Device, obj: dict[str, Any]) -> None:
        t0 = self._resolve_sent.pop(d.n, None)
        code = obj.get("code")
        if isinstance(code, int):
            self._count_resolve(code)
            if t0 is not None and code in (devicemsg.OK, devicemsg.NOT_FOUND, devicemsg.VALUES_NOT_FOUND):
                self.resolve_ms.add((time.monotonic() - t0) * 1000.0)
        else:  # refused by the console: offline, busy...
            self.counters.resolves += 1
            self.counters.resolve_errors += 1

    async def _status_loop(self) -> None:
        while True:
            for d in self.devices:
                self._send(d, "status")
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
                self._resolve_sent[d.n] = time.monotonic()
                self._send(d, f"resolve {target}")

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
        end = self.t_stop if self.t_stop is not None else time.monotonic()
        res = SimResult(
            mode=self.mode,
            transport=self.cfg.transport,
            devices=len(self.devices),
            elapsed_s=max(0.0, end - self.t_start) if self.t_start else 0.0,
            counters=c,
            pending=self.pending,
            online=sum(1 for s in st if s.get("transport_on")),
            resolve_ms=self.resolve_ms,
            processes=sum(1 for d in self.devices if d.proc is not None and d.proc.returncode is None),
            sim_cpu_s=time.process_time() - self._cpu0 if self.t_start else 0.0,
        )
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
            for d in self.devices:
                self._send(d, "status")
            await asyncio.sleep(0.3)
        # one last status from everyone
        before = [d.replies for d in self.devices]
        for d in self.devices:
            self._send(d, "status")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and any(
            d.replies == b and d.proc is not None and d.proc.returncode is None
            for d, b in zip(self.devices, before, strict=True)
        ):
            await asyncio.sleep(0.05)
        self.t_stop = time.monotonic()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._kill_all()
        return self.snapshot()

    async def _kill_all(self) -> None:
        """SIGINT (the firmware flushes its queue and exits), SIGKILL after STOP_GRACE; reap every process."""
        self.stopping = True
        live = [d for d in self.devices if d.proc is not None and d.proc.returncode is None]
        for d in live:
            assert d.proc is not None
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(d.proc.wait() for d in live if d.proc)), STOP_GRACE)
        for d in live:
            assert d.proc is not None
            if d.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    d.proc.kill()
                await d.proc.wait()
        for d in self.devices:
            if d.proc is not None and d.proc.stdin is not None:
                d.proc.stdin.close()
            if d.reader is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(d.reader, 2.0)
