"""A small asyncio MQTT 3.1.1 client: what a simulated device needs, for thousands of connections in one process.

paho runs a thread and a socket loop per client, far too heavy for 10,000 simulated devices. One
:class:`MqttConn` is an ``asyncio.Protocol`` (no task, no thread): CONNECT (clean session, keepalive, optional
last will), SUBSCRIBE (many filters per packet), PUBLISH QoS 0/1 both ways (incoming QoS 1 is acknowledged with
PUBACK; outgoing QoS 1 PUBACKs are read and ignored: the simulator's report timeout does the retrying, as the
firmware's reporter does), PINGREQ when idle, DISCONNECT. QoS 2 is never used by the protocol (docs/protocol.md).
Packets are built and framed by proto/mqtt; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from proto import mqtt

__all__ = ["MqttConn", "MqttError", "SUBSCRIBE_BATCH"]

V311 = mqtt.MQTT311
SUBSCRIBE_BATCH = 64  # topic filters per SUBSCRIBE packet


class MqttError(Exception):
    pass


class MqttConn(asyncio.Protocol):
    """One client connection. The owner passes callbacks:

    ``on_connack(conn)`` right after a successful CONNACK (publish status here), ``on_ready(conn)`` once every
    subscription is acknowledged, ``on_message(conn, topic, payload)`` for each PUBLISH received, and
    ``on_lost(conn, error)`` when the connection ends (``error`` None for a close asked by the owner)."""

    def __init__(
        self,
        client_id: str,
        subscriptions: list[tuple[str, int]],
        *,
        keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None,
        on_connack: Callable[[MqttConn], None],
        on_ready: Callable[[MqttConn], None],
        on_message: Callable[[MqttConn, str, bytes], None],
        on_lost: Callable[[MqttConn, str | None], None],
    ) -> None:
        self.client_id, self.subscriptions = client_id, subscriptions
        self.keepalive, self.will = keepalive, will
        self.on_connack, self.on_ready = on_connack, on_ready  # callbacks: class doc
        self.on_message, self.on_lost = on_message, on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = mqtt.Reader()
        self.connected = False  # CONNACK accepted
        self.ready = False  # subscriptions acknowledged
        self.closing = False
        self.last_tx = time.monotonic()
        self._pid = 0
        self._suback_wait: set[int] = set()
        self._why: str | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.write(mqtt.connect(self.client_id, self.keepalive, version=V311, will=self.will))

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.transport is not None
        self.transport = None
        self.connected = self.ready = False
        if not self.connack.done():
            self.connack.set_exception(MqttError(f"connection closed before CONNACK: {exc or 'eof'}"))
        if was:
            why = self._why or (f"{type(exc).__name__}: {exc}" if exc else "closed by the broker")
            self.on_lost(self, None if self.closing else why)

    def data_received(self, data: bytes) -> None:
        try:
            for first, body in self.reader.feed(data):
                if not self._packet(first, body):
                    return
        except mqtt.MqttProtocolError as e:
            self.abort(f"bad packet: {e}")

    def _packet(self, first: int, body: bytes) -> bool:
        """Handle one packet; False when the connection is being aborted."""
        kind = first >> 4
        if kind == mqtt.PUBLISH:
            topic, payload, pid = mqtt.parse_publish(first, body, version=V311)
            if pid:  # QoS 1
                self.write(mqtt.puback(pid))
            self.on_message(self, topic.decode("utf-8", "replace"), payload)
        elif kind == mqtt.CONNACK:
            rc = mqtt.parse_connack(body, version=V311).code
            if not self.connack.done():
                self.connack.set_result(rc)
            if rc != 0:
                self.abort(f"CONNACK refused with code {rc} ({mqtt.reason(rc, V311)})")
                return False
            self.connected = True
            self.on_connack(self)
            self._subscribe()
        elif kind == mqtt.SUBACK:
            suback = mqtt.parse_suback(body, version=V311)
            if any(code >= 0x80 for code in suback.codes):
                self.abort("broker refused a subscription")
                return False
            self._suback_wait.discard(suback.packet_id)
            if not self._suback_wait and not self.ready and self.connected:
                self.ready = True
                self.on_ready(self)
        # PUBACK (of our QoS 1 publishes) and PINGRESP need nothing
        return True

    # -- sending
    def next_pid(self) -> int:
        self._pid = self._pid % 0xFFFF + 1
        return self._pid

    def write(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(data)
        self.last_tx = time.monotonic()
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        packet_id = self.next_pid() if qos else 0
        return self.write(
            mqtt.publish(topic, payload, version=V311, qos=qos, retain=retain, packet_id=packet_id)
        )

    def _subscribe(self) -> None:
        subs = self.subscriptions
        if not subs:
            self.ready = True
            self.on_ready(self)
            return
        for i in range(0, len(subs), SUBSCRIBE_BATCH):
            pid = self.next_pid()
            self._suback_wait.add(pid)
            self.write(mqtt.subscribe(pid, subs[i : i + SUBSCRIBE_BATCH], version=V311))

    def ping_if_idle(self, now: float) -> None:
        if self.connected and now - self.last_tx >= self.keepalive * 0.75:
            self.write(mqtt.PINGREQ_BYTES)

    def disconnect(self) -> None:
        """Clean close: DISCONNECT (the broker drops the last will), then close once the buffer is written."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.write(mqtt.DISCONNECT_BYTES)
            self.transport.close()

    def abort(self, why: str) -> None:
        self._why = why
        if self.transport is not None:
            self.transport.abort()
