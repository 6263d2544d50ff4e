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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from proto import mqtt
from tools.harness.bench.loadresult import NS, LoadResult
from tools.harness.bench.mqttclient import V311, BenchConnection, ClosedLoop, MqttRunSpec, perf_ns

__all__ = ["MqttLoadSpec", "run_mqtt_load", "request_template", "TOKEN_LEN"]

TOKEN_LEN = 4
_PLACEHOLDER = b"\xfe\xed\xfa\xce"


def request_template(ident: str) -> tuple[bytes, bytes]:
    """``resolve_request`` {1: token, 2: id} as (bytes before the token, bytes after it)."""
    enc = cbor2.dumps({1: _PLACEHOLDER, 2: ident})
    pre, post = enc.split(_PLACEHOLDER)
    return pre, post


@dataclass(frozen=True)
class MqttLoadSpec(MqttRunSpec):
    ident: str = "88.123.99/PUMP-0001"  # what every request resolves
    connections: int = 4
    concurrency: int = 32  # requests in flight
    timeout: float = 2.0  # seconds before a request counts as lost
    connect_timeout: float = 10.0


class _Device(BenchConnection):
    def __init__(self, gen: MqttLoadGenerator, key: str) -> None:
        super().__init__(key)
        self.gen = gen
        self.key = key
        size = len(gen.pre) + TOKEN_LEN + len(gen.post)
        self.req_head = mqtt.publish_head(f"{gen.spec.root}/{key}/req".encode(), size, version=V311)
        self.pending: dict[bytes, int] = {}
        self.counter = int.from_bytes(os.urandom(3), "big")

    def filters(self) -> list[tuple[str, int]]:
        return [(f"{self.gen.spec.root}/{self.key}/res", 0)]

    def on_publish(self, topic: bytes, payload: bytes, now: int, out: list[bytes]) -> None:
        self.gen._on_answer(self, payload, now)

    def send_request(self, now: int) -> None:
        self.counter = (self.counter + 1) & 0xFFFFFFFF
        token = self.counter.to_bytes(TOKEN_LEN, "big")
        self.pending[token] = now
        assert self.transport is not None
        self.transport.write(self.req_head + self.gen.pre + token + self.gen.post)


class MqttLoadGenerator(ClosedLoop):
    tick = 0.02

    def __init__(self, spec: MqttLoadSpec) -> None:
        super().__init__(spec.warmup, spec.duration)
        self.spec = spec
        self.grace = min(spec.timeout, 0.5)
        self.pre, self.post = request_template(spec.ident)
        self.devices: list[_Device] = []
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
        if not self.in_window(now):
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
        if not self.going_on(now, dev.lost):
            return
        self._inflight += 1
        self.result.sent += 1
        dev.send_request(now)

    def _overdue(self, now: int) -> None:
        limit = int(self.spec.timeout * NS)
        for dev in self.devices:
            for token, t0 in [(t, s) for t, s in dev.pending.items() if now - s >= limit]:
                del dev.pending[token]
                self._inflight -= 1
                self._count(False, now, t0, None)
                self._next(dev, now)

    async def _open(self) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        tag = os.urandom(3).hex()
        for i in range(spec.connections):
            dev = _Device(self, f"bench-{tag}-{i}")
            self.conns.append(dev)
            await loop.create_connection(lambda d=dev: d, spec.host, spec.port)  # type: ignore[misc]
            self.devices.append(dev)
        await asyncio.wait_for(asyncio.gather(*(d.subscribed for d in self.devices)), spec.connect_timeout)

    def _begin(self, start: int) -> None:
        spec = self.spec
        per = [
            spec.concurrency // spec.connections + (1 if i < spec.concurrency % spec.connections else 0)
            for i in range(spec.connections)
        ]
        for dev, n in zip(self.devices, per, strict=True):
            for _ in range(n):
                self._next(dev, start)


def run_mqtt_load(spec: MqttLoadSpec) -> LoadResult:
    return asyncio.run(MqttLoadGenerator(spec).run())


async def mqtt_request(
    host: str, port: int, ident: str, root: str = "ida/v1/d", timeout: float = 2.0
) -> bytes:
    """One resolve request as a device sends it; the answer payload (TimeoutError when none comes)."""
    gen = MqttLoadGenerator(MqttLoadSpec(host, port, root, ident=ident, connections=1, concurrency=1))
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
        dev.send_request(perf_ns())
        return await asyncio.wait_for(got, timeout)
    finally:
        transport.close()
