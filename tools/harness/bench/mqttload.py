"""A closed-loop MQTT resolve load generator (MQTT 3.1.1 from proto/mqtt, no paho), as devices use the gateway.

    spec = MqttLoadSpec("127.0.0.1", 1883, connections=4, concurrency=32, duration=2.0)
    result = run_mqtt_load(spec)         # LoadResult, as the CoAP generator's

Each of ``connections`` clients plays one device: it subscribes to ``<root>/<key>/res`` and keeps its share of
``concurrency`` ``resolve_request`` messages (QoS 0, docs/protocol.md) in flight on ``<root>/<key>/req``, each
with a fresh 4-byte token; an answer (matched by token) immediately sends the next request. QoS 0 has no
retransmission: a request unanswered after ``timeout`` counts as a timeout and is replaced, as a device
retries with a new token. Only answers in the measurement window (after ``warmup``) count; an answer whose
code (key 3) is not 1 counts as an error.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import cbor2

from proto import mqtt
from tools.harness.bench.loadgen import NS, LoadResult

__all__ = ["MqttLoadSpec", "run_mqtt_load", "request_template", "TOKEN_LEN"]

_perf_ns = time.perf_counter_ns
TOKEN_LEN = 4
V311 = mqtt.MQTT311
_PLACEHOLDER = b"\xfe\xed\xfa\xce"


def request_template(ident: str) -> tuple[bytes, bytes]:
    """``resolve_request`` {1: token, 2: id} as (bytes before the token, bytes after it)."""
    enc = cbor2.dumps({1: _PLACEHOLDER, 2: ident})
    pre, post = enc.split(_PLACEHOLDER)
    return pre, post


@dataclass(frozen=True)
class MqttLoadSpec:
    host: str
    port: int
    ident: str = "88.123.99/PUMP-0001"
    root: str = "ida/v1/d"
    connections: int = 4
    concurrency: int = 32
    duration: float = 2.0
    warmup: float = 0.0
    timeout: float = 2.0
    connect_timeout: float = 10.0


class _Device(asyncio.Protocol):
    def __init__(self, gen: MqttLoadGenerator, key: str) -> None:
        self.gen = gen
        self.key = key
        size = len(gen.pre) + TOKEN_LEN + len(gen.post)
        self.req_head = mqtt.publish_head(f"{gen.spec.root}/{key}/req".encode(), size, version=V311)
        self.reader = mqtt.Reader()
        self.transport: asyncio.Transport | None = None
        self.pending: dict[bytes, int] = {}
        self.counter = int.from_bytes(os.urandom(3), "big")
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            mqtt.connect(self.key, 120, version=V311)
            + mqtt.subscribe(1, [(f"{self.gen.spec.root}/{self.key}/res", 0)], version=V311)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"broker closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = _perf_ns()
        gen = self.gen
        try:
            for first, body in self.reader.feed(data):
                kind = first >> 4
                if kind == mqtt.PUBLISH:
                    gen._on_answer(self, mqtt.parse_publish(first, body, version=V311)[1], now)
                elif kind == mqtt.SUBACK and not self.subscribed.done():
                    if any(code >= 0x80 for code in mqtt.parse_suback(body, version=V311).codes):
                        self.subscribed.set_exception(ConnectionError("subscription refused"))
                    else:
                        self.subscribed.set_result(None)
                elif kind == mqtt.CONNACK and (code := mqtt.parse_connack(body, version=V311).code):
                    self._fail(f"CONNACK return code {code} ({mqtt.reason(code, V311)})")
        except mqtt.MqttProtocolError as e:
            self._fail(f"bad data from the broker: {e}")

    def _fail(self, why: str) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def send_request(self, now: int) -> None:
        self.counter = (self.counter + 1) & 0xFFFFFFFF
        token = self.counter.to_bytes(TOKEN_LEN, "big")
        self.pending[token] = now
        assert self.transport is not None
        self.transport.write(self.req_head + self.gen.pre + token + self.gen.post)


class MqttLoadGenerator:
    def __init__(self, spec: MqttLoadSpec) -> None:
        self.spec = spec
        self.pre, self.post = request_template(spec.ident)
        self.result = LoadResult()
        self.devices: list[_Device] = []
        self._stopping = False
        self._win_start = self._win_end = 0
        self._inflight = 0
        self._done: asyncio.Future[None] | None = None
        self.answer_hook: Callable[[bytes], None] | None = None  # takes every answer instead (probes)

    def _on_answer(self, dev: _Device, payload: bytes, now: int) -> None:
        if self.answer_hook is not None:
            self.answer_hook(payload)
            return
        try:
            obj = cbor2.loads(payload)
            token, code = obj.get(1), obj.get(3)
        except Exception:
            self.result.unmatched += 1
            return
        t0 = dev.pending.pop(token, None) if isinstance(token, bytes) else None
        if t0 is None:
            self.result.unmatched += 1
            return
        self._inflight -= 1
        self._count(code == 1, now, t0, code)
        self._next(dev, now)

    def _count(self, ok: bool, now: int, t0: int, code: Any) -> None:
        res = self.result
        if not self._win_start <= now <= self._win_end:
            return
        if code is None:
            res.timeouts += 1
        elif ok:
            res.ok += 1
            res.latencies_ns.append(now - t0)
        else:
            res.errors += 1
            res.codes[str(code)] = res.codes.get(str(code), 0) + 1

    def _next(self, dev: _Device, now: int) -> None:
        if now >= self._win_end:
            self._stopping = True
        if self._stopping or dev.lost:
            if self._inflight == 0 and self._done is not None and not self._done.done():
                self._done.set_result(None)
            return
        self._inflight += 1
        self.result.sent += 1
        dev.send_request(now)

    def _tick(self) -> None:
        assert self._done is not None
        now = _perf_ns()
        limit = int(self.spec.timeout * NS)
        for dev in self.devices:
            for token, t0 in [(t, s) for t, s in dev.pending.items() if now - s >= limit]:
                del dev.pending[token]
                self._inflight -= 1
                self._count(False, now, t0, None)
                self._next(dev, now)
        if now >= self._win_end:
            self._stopping = True
        if self._stopping and (self._inflight == 0 or now >= self._win_end + min(limit, NS // 2)):
            if not self._done.done():
                self._done.set_result(None)
            return
        asyncio.get_running_loop().call_later(0.02, self._tick)

    async def run(self) -> LoadResult:
        spec = self.spec
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        cpu0 = time.process_time()
        tag = os.urandom(3).hex()
        try:
            for i in range(spec.connections):
                dev = _Device(self, f"bench-{tag}-{i}")
                await loop.create_connection(lambda d=dev: d, spec.host, spec.port)  # type: ignore[misc]
                self.devices.append(dev)
            await asyncio.wait_for(
                asyncio.gather(*(d.subscribed for d in self.devices)), spec.connect_timeout
            )
            start = _perf_ns()
            self._win_start = start + int(spec.warmup * NS)
            self._win_end = self._win_start + int(spec.duration * NS)
            per = [
                spec.concurrency // spec.connections + (1 if i < spec.concurrency % spec.connections else 0)
                for i in range(spec.connections)
            ]
            for dev, n in zip(self.devices, per, strict=True):
                for _ in range(n):
                    self._next(dev, start)
            loop.call_later(0.02, self._tick)
            hard = loop.call_later(spec.warmup + spec.duration + spec.timeout + 5, self._done.cancel)
            try:
                await self._done
            finally:
                hard.cancel()
        finally:
            for d in self.devices:
                if d.transport is not None:
                    d.transport.write(mqtt.DISCONNECT_BYTES)
                    d.transport.close()
        self.result.elapsed_s = (min(_perf_ns(), self._win_end) - self._win_start) / NS
        self.result.cpu_s = time.process_time() - cpu0
        self.result.endpoints = len(self.devices)
        return self.result


def run_mqtt_load(spec: MqttLoadSpec) -> LoadResult:
    return asyncio.run(MqttLoadGenerator(spec).run())


async def mqtt_request(
    host: str, port: int, ident: str, root: str = "ida/v1/d", timeout: float = 2.0
) -> bytes:
    """One resolve request as a device sends it; the answer payload (TimeoutError when none comes)."""
    gen = MqttLoadGenerator(MqttLoadSpec(host, port, ident, root, connections=1, concurrency=1))
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()
    dev = _Device(gen, f"bench-probe-{os.urandom(3).hex()}")

    def hook(payload: bytes) -> None:
        if not got.done():
            got.set_result(payload)

    gen.answer_hook = hook
    transport, _ = await loop.create_connection(lambda: dev, host, port)
    try:
        await asyncio.wait_for(dev.subscribed, timeout)
        dev.send_request(_perf_ns())
        return await asyncio.wait_for(got, timeout)
    finally:
        transport.close()
