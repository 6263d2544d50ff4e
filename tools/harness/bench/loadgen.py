"""A closed-loop CoAP load generator that speaks CoAP itself (no aiocoap: it must cost less than the servers).

    spec = LoadSpec("127.0.0.1", 5683, paths=(("r", "88.123.99", "PUMP-0001"),), concurrency=32, duration=2.0)
    result = run_load(spec)                 # one process; run_load(spec, workers=2) splits the load
    result = await LoadGenerator(spec).run()    # inside a running event loop
    result.rps, result.p50_ms, result.p99_ms, result.timeouts

How it works: ``concurrency`` requests are kept in flight; each response immediately sends the next request from
inside ``datagram_received`` -- no tasks, no futures per request. Requests are pre-encoded per path
(:class:`proto.coap.RequestTemplate`); only the Message ID and token are patched in. The message layer is
:class:`proto.coap.Client`, one per source endpoint: tokens are ``token_len`` bytes ending in the Message ID.

RFC 7252 behaviour: confirmable requests (or non-confirmable with ``confirmable=False``, never sent again) are
retransmitted after ``ack_timeout`` doubling each time (no random factor: runs are comparable), at most
``max_retransmit`` times, then counted as a timeout and replaced. An empty ACK stops retransmission and the
separate response is then awaited (and ACKed when it is confirmable). Message IDs must not repeat towards one
server within EXCHANGE_LIFETIME (247 s), or the server's de-duplication answers the replay with an old
response: after ``mid_budget`` Message IDs a source endpoint is retired and a fresh one (a new source port)
takes over.

Report mode (``reports`` > 0): instead of ``paths``, ``reports`` simulated devices (:class:`ReportDevice`) each
``POST /d/<id>/rpt`` their next report (canonical CBOR, as the firmware sends it) with at most one in flight per
device, as the firmware does: after a 2.04 the device's ``seq`` moves on, after anything else (5.03, no answer)
the same report goes again. ``concurrency`` reports are in flight at most. The result's ``acked`` maps each device
to the last seq it got acknowledged, so a caller can check the gateway's registry afterwards.

Bounds: ``duration`` seconds of measurement after ``warmup`` seconds, or ``count`` requests; either way the run
ends by itself (``max_time`` is a hard stop). Only requests that complete inside the measurement window count.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import queue
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, cast

from proto.coap import Client, RequestTemplate, dotted, request_template
from proto.coap.client import Exchange, Reset, Response, Unexpected
from proto.coap.numbers import Timing
from tools.harness.bench.coapreports import ReportDevice
from tools.harness.bench.loadresult import NS, LoadResult

__all__ = ["LoadSpec", "LoadGenerator", "run_load"]

_perf = time.perf_counter
DRAIN_MAX = 64  # datagrams read per event-loop wake-up


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how much and for how long. ``paths`` are used round robin (each is a Uri-Path tuple)."""

    host: str
    port: int
    paths: tuple[tuple[str, ...], ...]
    concurrency: int = 32
    duration: float | None = 2.0  # measurement seconds (after warmup); None with ``count``
    count: int | None = None  # requests to complete (then the run ends); overrides duration
    warmup: float = 0.0
    confirmable: bool = True
    ack_timeout: float = 2.0  # RFC 7252 ACK_TIMEOUT
    max_retransmit: int = 4  # RFC 7252 MAX_RETRANSMIT
    token_len: int = 2  # 2..8; the last two bytes are the Message ID
    mid_budget: int = 60_000  # Message IDs per source port before a fresh port takes over
    max_time: float | None = None  # hard stop (default: warmup + duration/count time + retransmission span)
    query: tuple[str, ...] = ()
    reports: int = 0  # > 0: report mode (module doc): this many devices, one report in flight each
    device_offset: int = 0  # report mode: the first device's number (workers get disjoint devices)
    boot: int = 1  # report mode: the devices' boot number

    def __post_init__(self) -> None:
        if not self.paths and not self.reports:
            raise ValueError("at least one path")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if (self.duration is None) == (self.count is None) and self.count is None:
            raise ValueError("give a duration or a count")
        if not 2 <= self.token_len <= 8:
            raise ValueError("token_len must be 2..8 (the token carries the Message ID)")
        if not 1 <= self.mid_budget <= 65_000:
            raise ValueError("mid_budget must be 1..65000")

    def hard_limit(self) -> float:
        if self.max_time is not None:
            return self.max_time
        span = self.ack_timeout * (2 ** (self.max_retransmit + 1))  # MAX_TRANSMIT_WAIT without random factor
        if self.count is not None:
            return self.warmup + span + 60.0 + self.count * 0.01
        return self.warmup + (self.duration or 0.0) + min(span, 5.0)


class _Endpoint(asyncio.DatagramProtocol):
    """One source port and its message layer (its own Message ID space and the requests in flight on it).

    The generator owns the (connected, non-blocking) socket, so it sends with ``sock.send`` directly and,
    after asyncio hands it one datagram, drains whatever else is queued with ``sock.recv`` -- one event-loop
    iteration per burst instead of per datagram. asyncio's transport is the fallback when the send buffer
    is full.
    """

    def __init__(self, gen: LoadGenerator, client: Client, sock: socket.socket) -> None:
        self.gen = gen
        self.client = client
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        on = self.gen._on_datagram
        on(self, data)
        recv = self.sock.recv
        for _ in range(DRAIN_MAX):
            if self.closed:
                return
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable reported on a connected socket
                self.gen.icmp_errors += 1
                return
            on(self, data)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            if self.transport is not None:
                self.transport.sendto(data)
        except OSError:
            self.gen.icmp_errors += 1

    def error_received(self, exc: Exception) -> None:
        self.gen.icmp_errors += 1

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LoadGenerator:
    """One closed-loop run against one server; ``await run()`` once."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.templates: list[RequestTemplate] = [
            request_template(p, confirmable=spec.confirmable, token_len=spec.token_len, query=spec.query)
            for p in spec.paths
        ]
        self.devices = [
            ReportDevice(spec.device_offset + i, spec.boot, spec.confirmable, spec.token_len)
            for i in range(spec.reports)
        ]
        self._idle: list[ReportDevice] = list(
            reversed(self.devices)
        )  # report mode: devices with nothing in flight
        self.result = LoadResult()
        self.icmp_errors = 0
        self._lat = self.result.latencies_ns
        self._endpoints: list[_Endpoint] = []
        self._current: _Endpoint | None = None
        self._spare: _Endpoint | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self._stalled = 0
        self._issued = 0
        self._inflight = 0
        self._stopping = False
        self._win_start = 0.0
        self._win_end = 0.0
        self._last_done = 0.0
        self._drain_until = 0.0
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- endpoints --------------------------------------------------------------------------------------
    async def _open_endpoint(self) -> _Endpoint:
        assert self._loop is not None
        spec = self.spec
        sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.connect((spec.host, spec.port))  # connected: the kernel filters other senders
        sock.setblocking(False)
        client = Client(
            token_prefix=os.urandom(spec.token_len - 2),
            mid=int.from_bytes(os.urandom(2), "big"),
            timing=Timing(spec.ack_timeout, 1.0, spec.max_retransmit),
            separate_timeout=spec.ack_timeout * 2 ** (spec.max_retransmit + 1),
        )
        ep = _Endpoint(self, client, sock)
        await self._loop.create_datagram_endpoint(lambda: ep, sock=sock)
        self._endpoints.append(ep)
        self.result.endpoints += 1
        return ep

    async def _make_spare(self) -> None:
        self._spare = await self._open_endpoint()
        if self._stalled and not self._stopping:
            n, self._stalled = self._stalled, 0
            for _ in range(n):
                self._issue(_perf())

    def _endpoint(self) -> _Endpoint | None:
        ep = self._current
        if ep is not None and ep.client.used < self.spec.mid_budget:
            return ep
        if self._spare is None:
            return None
        old, self._current, self._spare = ep, self._spare, None
        if old is not None and not old.client.in_flight:
            old.close()
        assert self._loop is not None
        self._spare_task = self._loop.create_task(self._make_spare())
        return self._current

    # -- the loop ---------------------------------------------------------------------------------------
    def _issue(self, now: float) -> None:
        spec = self.spec
        if now >= self._win_end and not self._stopping:
            self._stop(now)
        if self._stopping or (spec.count is not None and self._issued >= spec.count):
            self._maybe_finish()
            return
        ep = self._endpoint()
        if ep is None:  # the next source port is still opening
            self._stalled += 1
            return
        if self.devices:
            if not self._idle:
                return
            dev = self._idle.pop()
            ex = ep.client.request(dev.template, now, dev.payload(), dev)
        else:
            ex = ep.client.request(self.templates[self._issued % len(self.templates)], now)
        self._issued += 1
        self._inflight += 1
        self.result.sent += 1
        ep.send(ex.datagram)

    def _complete(self, ep: _Endpoint, ex: Exchange, code: int, now: float) -> None:
        """``code``: the answer's, 0 for a RST, -1 for no answer."""
        self._inflight -= 1
        res = self.result
        dev = ex.context
        if (
            dev is not None
        ):  # report mode: a 2.04 moves the device on, anything else sends the same report again
            if code == 0x44:
                dev.acked = dev.seq
                dev.seq += 1
            self._idle.append(dev)
        if self._win_start <= now <= self._win_end:
            self._last_done = now
            if code < 0:
                res.timeouts += 1
            elif 0x40 <= code < 0x60:
                res.ok += 1
                self._lat.append(int((now - ex.sent_at) * NS))
            else:
                res.errors += 1
                key = "RST" if code == 0 else dotted(code)
                res.codes[key] = res.codes.get(key, 0) + 1
        if ep is not self._current and not ep.client.in_flight and ep is not self._spare:
            ep.close()
        self._issue(now)

    def _on_datagram(self, ep: _Endpoint, data: bytes) -> None:
        now = _perf()
        ev = ep.client.receive(data, now)
        if type(ev) is Response:
            if ev.reply:
                ep.send(ev.reply)  # a separate CON response: acknowledged
            self._complete(ep, ev.exchange, ev.code, now)
        elif type(ev) is Reset:
            self._complete(ep, ev.exchange, 0, now)
        elif type(ev) is Unexpected:
            self.result.unmatched += 1
            if ev.reply:
                ep.send(ev.reply)

    def _tick(self) -> None:
        """Retransmit what is due, time out what has run out of retransmissions, check the window."""
        assert self._loop is not None
        now = _perf()
        if now >= self._win_end and not self._stopping:
            self._stop(now)
        for ep in list(self._endpoints):
            again, gone = ep.client.timeouts(now)
            for datagram in again:
                self.result.retransmits += 1
                ep.send(datagram)
            for ex in gone:
                self._complete(ep, ex, -1, now)
        self._endpoints = [e for e in self._endpoints if not e.closed]
        if self._stopping and now >= self._drain_until:
            self._finish()
            return
        self._maybe_finish()
        if self._done is not None and not self._done.done():
            self._loop.call_later(self._tick_s, self._tick)

    def _stop(self, now: float) -> None:
        """The window is over: send nothing new; let what is in flight land (uncounted) for a moment so the
        server is idle before the next measurement."""
        self._stopping = True
        self._drain_until = now + min(self.spec.ack_timeout, 0.5)

    def _maybe_finish(self) -> None:
        spec = self.spec
        if self._inflight == 0 and (
            self._stopping or (spec.count is not None and self._issued >= spec.count)
        ):
            self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def run(self) -> LoadResult:
        spec = self.spec
        self._loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._tick_s = max(0.002, min(spec.ack_timeout / 8, 0.05))
        cpu0 = time.process_time()
        self._current = await self._open_endpoint()
        self._spare = await self._open_endpoint()
        start = _perf()
        self._win_start = start + spec.warmup
        self._win_end = (self._win_start + (spec.duration or 0)) if spec.count is None else math.inf
        hard = loop.call_later(spec.hard_limit(), self._finish)
        loop.call_later(self._tick_s, self._tick)
        n = spec.concurrency if spec.count is None else min(spec.concurrency, spec.count)
        for _ in range(n):
            self._issue(_perf())
        try:
            await self._done
        finally:
            hard.cancel()
            self._stopping = True
            if self._spare_task is not None:
                await asyncio.gather(self._spare_task, return_exceptions=True)
            for ep in self._endpoints + ([self._spare] if self._spare else []):
                ep.close()
        end = _perf()
        res = self.result
        if spec.count is None:
            res.elapsed_s = min(end, self._win_end) - self._win_start
        else:
            res.elapsed_s = max(0.0, (self._last_done or end) - self._win_start)
        res.cpu_s = time.process_time() - cpu0
        res.acked = {d.ident: d.acked for d in self.devices}
        # still in flight at the end of a count-bounded run (hard stop): timeouts
        if spec.count is not None:
            res.timeouts += sum(ep.client.in_flight for ep in self._endpoints)
        return res


# -- several worker processes -----------------------------------------------------------------------------
def _worker(spec: LoadSpec, ready: Any, go: Any, out: Any) -> None:
    ready.put(os.getpid())
    if not go.wait(30):
        out.put(None)
        return
    out.put(asyncio.run(LoadGenerator(spec).run()).to_wire())


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(spec: LoadSpec, workers: int = 1) -> LoadResult:
    """Run ``spec`` to the end. With ``workers`` > 1 the concurrency (and count) is split over that many
    processes that start together; their results are merged."""
    if workers <= 1:
        return asyncio.run(LoadGenerator(spec).run())
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    conc = [c for c in _split(spec.concurrency, workers) if c > 0]
    counts = _split(spec.count, len(conc)) if spec.count is not None else [None] * len(conc)
    reports = _split(spec.reports, len(conc))  # report mode: each worker its own devices
    offsets = [spec.device_offset + sum(reports[:i]) for i in range(len(conc))]
    procs = [
        ctx.Process(
            target=_worker,
            args=(replace(spec, concurrency=c, count=n, reports=r, device_offset=o), ready, go, out),
            daemon=True,
        )
        for c, n, r, o in zip(conc, counts, reports, offsets, strict=True)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        go.set()
        parts = []
        deadline = time.monotonic() + spec.hard_limit() + 30
        for _ in procs:
            d = out.get(timeout=max(1.0, deadline - time.monotonic()))
            if d is None:
                raise RuntimeError("a load generator worker did not start")
            parts.append(LoadResult.from_wire(d))
    except queue.Empty:
        raise RuntimeError("a load generator worker did not report in time") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return LoadResult.merge(parts)
