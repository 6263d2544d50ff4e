"""A small asyncio MQTT 3.1.1 client: what a simulated device needs, for thousands of connections in one process.

paho runs a thread and a socket loop per client, far too heavy for 10,000 simulated devices. One
:class:`MqttConn` is an ``asyncio.Protocol`` (no task, no thread): CONNECT (clean session, keepalive, optional
last will), SUBSCRIBE (many filters per packet), PUBLISH QoS 0/1 both ways (incoming QoS 1 is acknowledged with
PUBACK; outgoing QoS 1 PUBACKs are read and ignored: the simulator's report timeout does the retrying, as the
firmware's reporter does), PINGREQ when idle, DISCONNECT. QoS 2 is never used by the protocol (docs/protocol.md).
Packet framing comes from ``tools.harness.bench.mqttmsg.PacketReader``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import cast

from proto.mqtt.packets import varlen
from tools.harness.bench.mqttmsg import PacketReader

__all__ = ["MqttConn", "encode_connect", "encode_publish", "encode_subscribe", "parse_publish", "MqttError"]

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    1,
    2,
    3,
    4,
    8,
    9,
    12,
    13,
    14,
)
PINGREQ_BYTES = b"\xc0\x00"
DISCONNECT_BYTES = b"\xe0\x00"
SUBSCRIBE_BATCH = 64  # topic filters per SUBSCRIBE packet


class MqttError(Exception):
    pass


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varlen(len(body)) + body


def encode_connect(
    client_id: str,
    keepalive: int = 60,
    *,
    clean: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """CONNECT; ``will`` = (topic, payload, qos, retain)."""
    flags = 0x02 if clean else 0
    tail = _str(client_id)
    if will is not None:
        topic, payload, qos, retain = will
        flags |= 0x04 | (qos & 3) << 3 | (0x20 if retain else 0)
        tail += _str(topic) + _str(payload)
    return _packet(CONNECT << 4, _str("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + tail)


def encode_publish(
    topic: str, payload: bytes, qos: int = 0, retain: bool = False, packet_id: int = 0
) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _packet(PUBLISH << 4 | (qos & 3) << 1 | (1 if retain else 0), body)


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    return _packet(
        SUBSCRIBE << 4 | 0x02,
        struct.pack("!H", packet_id) + b"".join(_str(t) + bytes((q,)) for t, q in filters),
    )


def parse_publish(flags: int, body: bytes) -> tuple[str, bytes, int, int]:
    """(topic, payload, qos, packet id) of a PUBLISH body."""
    n = (body[0] << 8) | body[1]
    topic = body[2 : 2 + n].decode("utf-8", "replace")
    pos = 2 + n
    qos = (flags >> 1) & 3
    pid = 0
    if qos:
        pid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    return topic, body[pos:], qos, pid


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
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.keepalive = keepalive
        self.will = will
        self.on_connack = on_connack
        self.on_ready = on_ready
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = PacketReader()
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
        self.write(encode_connect(self.client_id, self.keepalive, will=self.will))

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
            packets = self.reader.feed(data)
        except ValueError as e:
            self.abort(f"bad packet: {e}")
            return
        for ptype, flags, body in packets:
            if ptype == PUBLISH:
                topic, payload, qos, pid = parse_publish(flags, body)
                if qos == 1:
                    self.write(bytes((PUBACK << 4, 2)) + struct.pack("!H", pid))
                self.on_message(self, topic, payload)
            elif ptype == CONNACK:
                rc = body[1] if len(body) >= 2 else 255
                if not self.connack.done():
                    self.connack.set_result(rc)
                if rc != 0:
                    self.abort(f"CONNACK refused with code {rc}")
                    return
                self.connected = True
                self.on_connack(self)
                self._subscribe()
            elif ptype == SUBACK:
                pid = (body[0] << 8) | body[1]
                if any(b == 0x80 for b in body[2:]):
                    self.abort("broker refused a subscription")
                    return
                self._suback_wait.discard(pid)
                if not self._suback_wait and not self.ready and self.connected:
                    self.ready = True
                    self.on_ready(self)
            # PUBACK (of our QoS 1 publishes) and PINGRESP need nothing

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
        return self.write(encode_publish(topic, payload, qos, retain, self.next_pid() if qos else 0))

    def _subscribe(self) -> None:
        subs = self.subscriptions
        if not subs:
            self.ready = True
            self.on_ready(self)
            return
        for i in range(0, len(subs), SUBSCRIBE_BATCH):
            pid = self.next_pid()
            self._suback_wait.add(pid)
            self.write(encode_subscribe(pid, subs[i : i + SUBSCRIBE_BATCH]))

    def ping_if_idle(self, now: float) -> None:
        if self.connected and now - self.last_tx >= self.keepalive * 0.75:
            self.write(PINGREQ_BYTES)

    def disconnect(self) -> None:
        """Clean close: DISCONNECT (the broker drops the last will), then close once the buffer is written."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.write(DISCONNECT_BYTES)
            self.transport.close()

    def abort(self, why: str) -> None:
        self._why = why
        if self.transport is not None:
            self.transport.abort()
