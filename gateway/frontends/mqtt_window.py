"""The device link's QoS 1 window (gateway/frontends/mqtt_session.py sends through it), sans-I/O: packet ids for
the QoS 1 PUBLISH packets the gateway sends (and for its SUBSCRIBE and UNSUBSCRIBE packets, which share them), at
most the broker's Receive Maximum of them unacknowledged, the others waiting in order for a PUBACK.
"""

from __future__ import annotations

import collections
import logging

from gateway.logfmt import kv
from proto import mqtt

__all__ = ["Qos1Window", "WAITING_MAX"]

log = logging.getLogger(__name__)

WAITING_MAX = 65_536  # QoS 1 messages waiting for room in the broker's window; more are dropped (and counted)


class Qos1Window:
    """QoS 1 PUBLISH packets to the broker (v5, no properties), sans-I/O: each gets a packet id; at most ``limit``
    (the broker's Receive Maximum) are unacknowledged at a time and the others wait in order. There is no re-sending:
    a session starts clean, so what was in flight when a connection ended is gone with it (:meth:`reset`)."""

    def __init__(self, limit: int = 0xFFFF, waiting_max: int = WAITING_MAX) -> None:
        self.limit = limit
        self.waiting_max = waiting_max
        self.inflight: set[int] = set()
        self.reserved: set[int] = set()  # ids of SUBSCRIBE / UNSUBSCRIBE packets waiting for their answer
        self.waiting: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._pid = 0
        self._heads = mqtt.FixedHeaders(mqtt.PUBLISH << 4 | 0x02)
        self.sent = 0
        self.refused = 0  # PUBACKs with a failure reason code (the broker did not take the message)
        self.dropped = 0  # never sent: the waiting queue was full, or the connection ended first

    def reset(self, limit: int) -> None:
        """A new connection whose broker takes ``limit`` unacknowledged messages."""
        self.dropped += len(self.waiting)
        self.waiting.clear()
        self.inflight.clear()
        self.limit = max(1, limit)

    def publish(self, topic: bytes, payload: bytes) -> bytes | None:
        """The packet to send now, or None when it waits for room (or was dropped: the queue is full)."""
        if len(self.inflight) < self.limit:
            return self._packet(topic, payload)
        if len(self.waiting) >= self.waiting_max:
            self.dropped += 1
        else:
            self.waiting.append((topic, payload))
        return None

    def acked(self, body: bytes) -> list[bytes]:
        """A PUBACK from the broker (its body); the packets that now have room."""
        if len(body) < 2:
            raise mqtt.MqttProtocolError("truncated PUBACK")
        pid = (body[0] << 8) | body[1]
        if pid not in self.inflight:
            return []  # of an earlier connection, or never sent: nothing to release
        self.inflight.discard(pid)
        if len(body) > 2 and body[2] >= 0x80:
            self.refused += 1
            log.warning("mqtt device link: the broker refused a message %s", kv(reason=mqtt.reason(body[2])))
        out = []
        while self.waiting and len(self.inflight) < self.limit:
            out.append(self._packet(*self.waiting.popleft()))
        return out

    def take_id(self) -> int:
        """A packet id for a SUBSCRIBE or UNSUBSCRIBE (they share the ids with PUBLISH); :meth:`release_id` it
        when its answer came (or did not)."""
        pid = self._free_id()
        self.reserved.add(pid)
        return pid

    def release_id(self, pid: int) -> None:
        self.reserved.discard(pid)

    def _free_id(self) -> int:
        pid = self._pid
        while True:
            pid = pid % 0xFFFF + 1
            if pid not in self.inflight and pid not in self.reserved:
                self._pid = pid
                return pid

    def _packet(self, topic: bytes, payload: bytes) -> bytes:
        pid = self._free_id()
        self.inflight.add(pid)
        self.sent += 1
        size = len(topic)
        return b"".join(
            (
                self._heads[size + 5 + len(payload)],
                size.to_bytes(2, "big"),
                topic,
                pid.to_bytes(2, "big"),
                b"\x00",  # no properties
                payload,
            )
        )
