"""The light fleet's MQTT connections (tools/harness/sim/light.py), on :mod:`tools.harness.sim.mqtt`.

Trade-off, set by ``mqtt_connections``:

* 0 (default): one connection per device, exactly as a device connects -- client id = topic key, clean
  session, last will = ``status`` offline (retained, QoS 1), ``status`` online after CONNACK, subscriptions to
  ``res``/``ack``/``cfg``. Most faithful (the broker and the gateway see N clients and N statuses); costs one
  socket per device here and in the broker (10,000 devices need ``ulimit -n`` above 10,000 in both) and the
  connection set-up at start (``CONNECT_CONCURRENCY`` connections in flight at a time, in device order).
* K > 0: K shared connections, each carrying every K-th device's publishes and subscriptions (topic
  filters for its devices only, so no message is delivered twice). Cheap at any N, but a broker ACL per
  device cannot be applied, and there is no last will per device (a clean stop still publishes each device's
  offline status).

A lost connection is opened again after a backoff (RECONNECT_MIN doubling to RECONNECT_MAX); what its devices had
in flight is the fleet's to retry (:meth:`Host.connection_lost`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Protocol

from proto import devicemsg
from tools.harness.sim.config import SimConfig, parse_url
from tools.harness.sim.devices import Device
from tools.harness.sim.mqtt import MqttConn, MqttError
from tools.harness.sim.stats import Counters

__all__ = ["MqttLinks", "Host"]

MQTT_KEEPALIVE = 60
CONNECT_TIMEOUT = 10.0
CONNECT_CONCURRENCY = 64
RECONNECT_MIN = 1.0
RECONNECT_MAX = 30.0


class Host(Protocol):
    """The fleet, as its MQTT connections see it."""

    cfg: SimConfig
    counters: Counters
    rng: Any
    closed: bool
    log: Callable[[str], None]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def ready(self, d: Device) -> None: ...

    def message(self, d: Device, leaf: str, payload: bytes) -> None: ...

    def connection_lost(self, d: Device, why: str | None) -> None: ...


def status(d: Device, online: bool) -> bytes:
    return devicemsg.encode("status", {"id": d.ident, "online": online})


class MqttLinks:
    """The connections of the fleet's MQTT devices (module doc): ``start()``, ``online``, ``await close()``."""

    def __init__(self, host: Host, devices: list[Device]) -> None:
        self.host = host
        cfg = host.cfg
        self.shared = cfg.mqtt_connections > 0
        k = min(cfg.mqtt_connections, len(devices)) if self.shared else len(devices)
        self.devices: list[list[Device]] = [[] for _ in range(k)]
        for i, d in enumerate(devices):
            self.devices[i % k].append(d)
        self.by_key = {d.key: d for d in devices}
        self.conns: list[MqttConn | None] = [None] * k
        self._backoff = [RECONNECT_MIN] * k

    def start(self) -> None:
        self.host.spawn(self._connect_all())
        self.host.spawn(self._keepalive())

    @property
    def online(self) -> int:
        return sum(
            len(devs) for c, devs in zip(self.conns, self.devices, strict=True) if c is not None and c.ready
        )

    def _new_conn(self, j: int) -> MqttConn:
        devs = self.devices[j]
        subs = [
            (devicemsg.topic(d.ident, leaf), qos)
            for d in devs
            for leaf, qos in (("res", 0), ("ack", 1), ("cfg", 1))
        ]
        if self.shared:
            client_id, will = f"ida-sim-{os.getpid()}-{j}", None
        else:
            d = devs[0]
            client_id, will = d.key, (devicemsg.topic(d.ident, "status"), status(d, False), 1, True)
        return MqttConn(
            client_id,
            subs,
            keepalive=MQTT_KEEPALIVE,
            will=will,
            on_connack=partial(self._on_connack, j),
            on_ready=partial(self._on_ready, j),
            on_message=self._on_message,
            on_lost=partial(self._on_lost, j),
        )

    async def _connect_all(self) -> None:
        """Open the connections in device order, CONNECT_CONCURRENCY at a time."""
        it = iter(range(len(self.conns)))

        async def worker() -> None:
            for j in it:
                await self._connect(j)

        await asyncio.gather(*(worker() for _ in range(min(CONNECT_CONCURRENCY, len(self.conns)))))

    async def _connect(self, j: int) -> None:
        host = self.host
        if host.closed:
            return
        loop = asyncio.get_running_loop()
        broker_host, port = parse_url(host.cfg.broker, "mqtt")
        conn = self._new_conn(j)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, broker_host, port), CONNECT_TIMEOUT)
            self.conns[j] = conn
            await asyncio.wait_for(asyncio.shield(conn.connack), CONNECT_TIMEOUT)
            return
        except (OSError, TimeoutError, MqttError) as e:
            host.counters.errors += 1
            if host.counters.errors <= 3:
                host.log(f"mqtt: {host.cfg.broker}: {type(e).__name__}: {e}")
            if conn.transport is not None:
                conn.closing = True  # no on_lost reconnect: scheduled below
                conn.abort("connect failed")
            self.conns[j] = None
        self._reconnect_later(j)

    def _reconnect_later(self, j: int) -> None:
        host = self.host
        if host.closed:
            return
        delay = self._backoff[j] * host.rng.uniform(1.0, 1.5)
        self._backoff[j] = min(self._backoff[j] * 2, RECONNECT_MAX)
        asyncio.get_running_loop().call_later(
            delay, lambda: host.spawn(self._connect(j)) if not host.closed else None
        )

    def _on_connack(self, j: int, conn: MqttConn) -> None:
        self.host.counters.connects += 1
        for d in self.devices[j]:
            conn.publish(devicemsg.topic(d.ident, "status"), status(d, True), qos=1, retain=True)

    def _on_ready(self, j: int, conn: MqttConn) -> None:
        self._backoff[j] = RECONNECT_MIN
        for d in self.devices[j]:
            d.conn = conn
            self.host.ready(d)

    def _on_message(self, conn: MqttConn, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 5:
            return
        d = self.by_key.get(parts[3])
        if d is not None:
            self.host.message(d, parts[4], payload)

    def _on_lost(self, j: int, conn: MqttConn, why: str | None) -> None:
        host = self.host
        if self.conns[j] is conn:
            self.conns[j] = None
        if why is not None:
            host.counters.disconnects += 1
        for d in self.devices[j]:
            if d.conn is conn:
                d.conn = None
            host.connection_lost(d, why)
        if why is not None:
            host.counters.errors += 1
            if host.counters.disconnects <= 3:
                host.log(f"mqtt: connection {conn.client_id} lost: {why}")
            self._reconnect_later(j)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            now = time.monotonic()
            for c in self.conns:
                if c is not None:
                    c.ping_if_idle(now)

    async def close(self) -> None:
        """Publish each device's offline status, disconnect, wait up to 3 s for the connections to close."""
        conns = [(j, c) for j, c in enumerate(self.conns) if c is not None and c.transport is not None]
        for j, c in conns:
            if c.connected:
                for d in self.devices[j]:
                    c.publish(devicemsg.topic(d.ident, "status"), status(d, False), qos=1, retain=True)
            c.disconnect()
        deadline = time.monotonic() + 3.0
        while any(c.transport is not None for _j, c in conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for _j, c in conns:
            if c.transport is not None:
                c.transport.abort()
