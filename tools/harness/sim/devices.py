"""What a device of the light fleet keeps (tools/harness/sim/light.py), as the firmware keeps it: a boot number
(one per run, persisted by :func:`next_boot` so a second run against the same gateway is not taken for duplicates),
a sequence number per boot, a bounded queue of unacknowledged reports, the report in flight, its retry backoff,
the ETags of its last answers, and its resolve and MQTT state."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proto import devicemsg
from proto.coap import RequestTemplate
from tools.harness.sim.coap import report_template
from tools.harness.sim.config import SimError
from tools.harness.sim.mqtt import MqttConn

__all__ = ["Device", "Report", "Schedule", "next_boot", "BOARD", "FW", "RETRY_MIN", "RETRY_MAX", "BOOT_FILE"]

BOARD = "sim"
FW = "0.1.0-sim"
RETRY_MIN = 2.0  # firmware/carrier/reporter.py
RETRY_MAX = 300.0
BOOT_FILE = "light-boot.json"


def next_boot(data_dir: Path) -> int:
    """The fleet's boot number for this run: the last one + 1, persisted (temp file + rename)."""
    path = data_dir / BOOT_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            boot = int(json.loads(path.read_text())["boot"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            boot = 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"boot": boot}))
        os.replace(tmp, path)
    except OSError as e:
        raise SimError(f"data dir {str(data_dir)!r}: {e.strerror or e}") from None
    return boot


class Schedule:
    """A device's recurring job (its reports, its resolves): ``job()`` at ``due`` (event loop time), then every
    ``period`` seconds, until :meth:`cancel`."""

    __slots__ = ("loop", "job", "period", "due", "timer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, job: Callable[[], None], period: float, first: float
    ) -> None:
        self.loop = loop
        self.job = job
        self.period = period
        self.due = first
        self.timer: asyncio.TimerHandle | None = loop.call_at(first, self._run)

    def _run(self) -> None:
        self.due += self.period
        self.timer = self.loop.call_at(self.due, self._run)
        self.job()

    def set_period(self, period: float) -> None:
        """As the firmware takes a new interval: a shorter one brings the next run forward, a longer one applies
        after it."""
        self.period = period
        t = self.loop.time() + period
        if t < self.due and self.timer is not None:
            self.timer.cancel()
            self.due = t
            self.timer = self.loop.call_at(t, self._run)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Report:
    __slots__ = ("seq", "payload", "sends")

    def __init__(self, seq: int, payload: bytes) -> None:
        self.seq = seq
        self.payload = payload
        self.sends = 0


class Device:
    __slots__ = (
        "n",
        "ident",
        "key",
        "transport",
        "seq",
        "queue",
        "inflight",
        "backoff",
        "retry_timer",
        "report_schedule",
        "rssi",
        "heap",
        "template",
        "sock",
        "conn",
        "etags",
        "resolve_token",
        "resolve_timer",
        "resolve_schedule",
        "resolves",
        "resolve_t0",
        "resolve_target",
        "cfgver",
        "report_timer",
        "report_t0",
        "dropped",
    )

    def __init__(self, n: int, ident: str, transport: str, rng: random.Random) -> None:
        self.n = n
        self.ident = ident
        self.key = devicemsg.topic_key(ident)
        self.transport = transport
        self.seq = 0
        self.queue: deque[Report] = deque()
        self.inflight: Report | None = None
        self.backoff = RETRY_MIN
        self.retry_timer: asyncio.TimerHandle | None = None
        self.report_schedule: Schedule | None = None  # once the fleet starts
        self.rssi = -rng.randrange(40, 85)
        self.heap = rng.randrange(70_000, 110_000)
        self.template: RequestTemplate | None = report_template(ident) if transport == "coap" else None
        self.sock = 0
        self.conn: MqttConn | None = None
        self.etags: dict[str, bytes] = {}
        self.resolve_token: bytes | None = None
        self.resolve_timer: asyncio.TimerHandle | None = None
        self.resolve_schedule: Schedule | None = None
        self.resolves = 0
        self.resolve_t0 = 0.0
        self.resolve_target = ident
        self.cfgver = 0
        self.report_timer: asyncio.TimerHandle | None = None
        self.report_t0 = 0.0
        self.dropped = 0

    def queue_report(self, boot: int, uptime: int, cap: int) -> bool:
        """Make the next report and queue it; True when the queue was full (``cap``) and its oldest report not in
        flight was dropped to make room."""
        self.seq += 1
        fields: dict[str, Any] = {
            "id": self.ident,
            "boot": boot,
            "seq": self.seq,
            "uptime": uptime,
            "heap": self.heap,
            "rssi": self.rssi,
            "queue": len(self.queue),
            "board": BOARD,
            "fw": FW,
            "dropped": self.dropped,
            "time": int(time.time()),
            "sensors": {"temp": round(18.0 + (self.n % 80) / 10.0, 1)},
        }
        payload = devicemsg.encode("report", fields)
        full = len(self.queue) >= cap
        if full:
            victim = 1 if self.inflight is not None and self.queue[0] is self.inflight else 0
            del self.queue[victim]
            self.dropped += 1
        self.queue.append(Report(self.seq, payload))
        return full
