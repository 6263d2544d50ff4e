"""What the MQTT load generators share (mqttload.py: resolve requests, mqttreports.py: reports): one client
connection and the run of a closed loop. MQTT 3.1.1 from proto/mqtt, as devices speak it; no paho.

* :class:`BenchConnection` -- one TCP connection to the broker: CONNECT and SUBSCRIBE (:meth:`~BenchConnection.
  filters`) when it opens, ``subscribed`` settles on the SUBACK; each PUBLISH that comes in is acknowledged when at
  QoS 1 and handed to :meth:`~BenchConnection.on_publish` with the time it was read; what that puts in ``out`` is
  written at once, in one write per read.
* :class:`ClosedLoop` -- :meth:`~ClosedLoop.run`: connect (``_open``), start the loop (``_begin``), look for overdue
  messages every ``tick`` seconds (``_overdue``) until the measurement window (``warmup``, then ``duration``) is
  over and nothing is in flight (or ``grace`` more seconds have passed), then disconnect; the result is a
  :class:`~tools.harness.bench.loadresult.LoadResult` counting only what completed in the window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast

from proto import mqtt
from tools.harness.bench.loadresult import NS, LoadResult

__all__ = ["BenchConnection", "ClosedLoop", "V311", "perf_ns"]

perf_ns = time.perf_counter_ns
V311 = mqtt.MQTT311


@dataclass(frozen=True)
class MqttRunSpec:
    """Where a closed-loop MQTT run goes and for how long (the load generators' specs add what they send)."""

    host: str
    port: int
    root: str = "ida/v1/d"
    duration: float = 2.0
    warmup: float = 0.0


class BenchConnection(asyncio.Protocol):
    """One client connection of a load generator (module doc)."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.reader = mqtt.Reader()
        self.transport: asyncio.Transport | None = None
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False

    def filters(self) -> list[tuple[str, int]]:
        """The (topic filter, QoS) pairs to subscribe to."""
        raise NotImplementedError

    def on_publish(self, topic: bytes, payload: bytes, now: int, out: list[bytes]) -> None:
        """A message from the broker, read at ``now`` (perf_counter_ns); packets put in ``out`` are written."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            mqtt.connect(self.client_id, 120, version=V311) + mqtt.subscribe(1, self.filters(), version=V311)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"broker closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = perf_ns()
        out: list[bytes] = []
        try:
            for first, body in self.reader.feed(data):
                kind = first >> 4
                if kind == mqtt.PUBLISH:
                    topic, payload, pid = mqtt.parse_publish(first, body, version=V311)
                    if pid:
                        out.append(mqtt.puback(pid))
                    self.on_publish(topic, payload, now, out)
                elif kind == mqtt.SUBACK and not self.subscribed.done():
                    if any(code >= 0x80 for code in mqtt.parse_suback(body, version=V311).codes):
                        self.subscribed.set_exception(ConnectionError("subscription refused"))
                    else:
                        self.subscribed.set_result(None)
                elif kind == mqtt.CONNACK and (code := mqtt.parse_connack(body, version=V311).code):
                    self._fail(f"CONNACK return code {code} ({mqtt.reason(code, V311)})")
                # a PUBACK for one of our messages needs nothing: the answer is what counts
        except mqtt.MqttProtocolError as e:
            self._fail(f"bad data from the broker: {e}")
            return
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _fail(self, why: str) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(mqtt.DISCONNECT_BYTES)
            self.transport.close()


class ClosedLoop:
    """The run of a closed-loop generator (module doc); ``conns`` are its connections."""

    tick = 0.05  # seconds between looks for overdue messages
    grace = 5.0  # seconds the run waits after the window for what is still in flight (at most)

    def __init__(self, warmup: float, duration: float) -> None:
        self.warmup = warmup
        self.duration = duration
        self.result = LoadResult()
        self.conns: list[BenchConnection] = []
        self._win_start = self._win_end = 0
        self._stopping = False
        self._inflight = 0
        self._done: asyncio.Future[None] | None = None

    async def _open(self) -> None:
        """Connect ``conns`` and wait until each is subscribed."""
        raise NotImplementedError

    def _begin(self, start: int) -> None:
        """Send the first messages (at ``start``)."""
        raise NotImplementedError

    def _overdue(self, now: int) -> None:
        """Deal with the messages in flight for too long."""
        raise NotImplementedError

    def in_window(self, now: int) -> bool:
        return self._win_start <= now <= self._win_end

    def going_on(self, now: int, lost: bool) -> bool:
        """Whether to send another message now (False once the window is over: then the run may end)."""
        if now >= self._win_end:
            self._stopping = True
        if self._stopping or lost:
            if self._inflight == 0 and self._done is not None and not self._done.done():
                self._done.set_result(None)
            return False
        return True

    def _tick(self) -> None:
        assert self._done is not None
        now = perf_ns()
        self._overdue(now)
        if now >= self._win_end:
            self._stopping = True
        if self._stopping and (self._inflight == 0 or now >= self._win_end + int(self.grace * NS)):
            if not self._done.done():
                self._done.set_result(None)
            return
        asyncio.get_running_loop().call_later(self.tick, self._tick)

    async def run(self) -> LoadResult:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        cpu0 = time.process_time()
        try:
            await self._open()
            start = perf_ns()
            self._win_start = start + int(self.warmup * NS)
            self._win_end = self._win_start + int(self.duration * NS)
            self._begin(start)
            loop.call_later(self.tick, self._tick)
            hard = loop.call_later(self.warmup + self.duration + self.grace + 5, self._done.cancel)
            try:
                await self._done
            finally:
                hard.cancel()
        finally:
            for c in self.conns:
                c.close()
        self.result.elapsed_s = (min(perf_ns(), self._win_end) - self._win_start) / NS
        self.result.cpu_s = time.process_time() - cpu0
        self.result.endpoints = len(self.conns)
        return self.result
