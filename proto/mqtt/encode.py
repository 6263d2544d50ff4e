"""Building the client side's MQTT packets, 3.1.1 or v5 (``version`` = :data:`~proto.mqtt.numbers.MQTT311` or
:data:`~proto.mqtt.numbers.MQTT5`): bytes out, nothing else. Section numbers are OASIS MQTT 5.0's.

What the CPython side sends: CONNECT (clean start, optional last will, user name/password, and in v5 a Maximum
Packet Size), SUBSCRIBE/UNSUBSCRIBE (no subscription options beyond the QoS), PUBLISH at QoS 0-1 with retain, and
PUBACK. A v5 packet this module builds carries no properties except CONNECT's Maximum Packet Size.

Answers of a request/answer link come in few sizes: :class:`FixedHeaders` keeps the fixed header of each size
encoded once, and :func:`publish_head` uses one for QoS 0 PUBLISH.

>>> publish("a/b", b"x", version=MQTT5).hex()
'30070003612f620078'
>>> publish("a/b", b"x", version=MQTT311, qos=1, retain=True, packet_id=7).hex()
'33080003612f62000778'
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from proto.mqtt.numbers import (
    CONNECT,
    MAX_REMAINING_LENGTH,
    MQTT5,
    MQTT311,
    PROP_MAXIMUM_PACKET_SIZE,
    PUBACK,
    PUBLISH,
    SUBSCRIBE,
    UNSUBSCRIBE,
)

__all__ = [
    "varlen",
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "publish_topic",
    "publish_head",
    "puback",
    "FixedHeaders",
    "Will",
]

Will = tuple[str, bytes, int, bool]  # last will: (topic, payload, qos, retain)
_NO_PROPERTIES = b"\x00"
_PROTOCOL_NAME = b"\x00\x04MQTT"


def varlen(n: int) -> bytes:
    """A variable byte integer (1.5.5), as the remaining length and property lengths are written."""
    if n < 0x80:
        if n < 0:
            raise ValueError("a variable byte integer cannot be negative")
        return bytes((n,))
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"{n} does not fit in a variable byte integer")
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    """A UTF-8 string or binary data field: two length bytes, then the bytes (1.5.4, 1.5.6)."""
    b = s.encode() if isinstance(s, str) else s
    if len(b) > 0xFFFF:
        raise ValueError("an MQTT string or binary field is at most 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varlen(len(body)) + body


def _version(version: int) -> bool:
    """True for v5; ValueError for a level this codec does not speak."""
    if version == MQTT5:
        return True
    if version == MQTT311:
        return False
    raise ValueError(f"MQTT protocol level {version} (this codec speaks 4 = 3.1.1 and 5)")


def _packet_id(packet_id: int) -> bytes:
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is not 1..65535")
    return struct.pack("!H", packet_id)


def connect(
    client_id: str,
    keepalive: int,
    *,
    version: int,
    clean: bool = True,
    will: Will | None = None,
    username: str | None = None,
    password: str | None = None,
    max_packet: int = 0,
) -> bytes:
    """CONNECT (3.1). ``will`` = (topic, payload, qos, retain); ``max_packet`` > 0 (v5 only) tells the broker
    not to send anything larger."""
    v5 = _version(version)
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError("keepalive must be 0..65535 s")
    if password is not None and username is None and not v5:
        raise ValueError("MQTT 3.1.1 sends a password only with a user name")
    if max_packet and not v5:
        raise ValueError("Maximum Packet Size is an MQTT v5 property")
    flags = 0x02 if clean else 0
    tail = _string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        if not 0 <= qos <= 2:
            raise ValueError(f"will QoS {qos}")
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        tail += (_NO_PROPERTIES if v5 else b"") + _string(topic) + _string(message)
    if username is not None:
        flags |= 0x80
        tail += _string(username)
    if password is not None:
        flags |= 0x40
        tail += _string(password)
    head = _PROTOCOL_NAME + bytes((version, flags)) + struct.pack("!H", keepalive)
    if v5:
        props = bytes((PROP_MAXIMUM_PACKET_SIZE,)) + struct.pack("!I", max_packet) if max_packet else b""
        head += varlen(len(props)) + props
    return _packet(CONNECT << 4, head + tail)


def subscribe(packet_id: int, filters: Iterable[tuple[str, int]], *, version: int) -> bytes:
    """SUBSCRIBE (3.8) ``(filter, qos)`` pairs; in v5 every other subscription option is 0 (no local off,
    retain as published off, retained messages sent)."""
    body = _packet_id(packet_id) + (_NO_PROPERTIES if _version(version) else b"")
    count = 0
    for topic, qos in filters:
        if not 0 <= qos <= 2:
            raise ValueError(f"subscription QoS {qos}")
        body += _string(topic) + bytes((qos,))
        count += 1
    if not count:
        raise ValueError("a SUBSCRIBE names at least one topic filter")
    return _packet(SUBSCRIBE << 4 | 0x02, body)


def unsubscribe(packet_id: int, filters: Iterable[str], *, version: int) -> bytes:
    """UNSUBSCRIBE (3.10)."""
    body = _packet_id(packet_id) + (_NO_PROPERTIES if _version(version) else b"")
    parts = [_string(topic) for topic in filters]
    if not parts:
        raise ValueError("an UNSUBSCRIBE names at least one topic filter")
    return _packet(UNSUBSCRIBE << 4 | 0x02, body + b"".join(parts))


def publish(
    topic: str | bytes,
    payload: bytes,
    *,
    version: int,
    qos: int = 0,
    retain: bool = False,
    packet_id: int = 0,
) -> bytes:
    """PUBLISH (3.3); ``packet_id`` (1..65535) is needed at QoS 1 and 2, and ignored at QoS 0."""
    if not qos:
        head = publish_topic(topic.encode() if isinstance(topic, str) else topic, version=version)
        return _packet(PUBLISH << 4 | (1 if retain else 0), head + payload)
    if not 0 < qos <= 2:
        raise ValueError(f"PUBLISH QoS {qos}")
    body = _string(topic) + _packet_id(packet_id) + (_NO_PROPERTIES if _version(version) else b"")
    return _packet(PUBLISH << 4 | qos << 1 | (1 if retain else 0), body + payload)


def publish_topic(topic: bytes, *, version: int) -> bytes:
    """The variable header of a QoS 0 PUBLISH: the topic and, in v5, no properties."""
    return _string(topic) + _NO_PROPERTIES if _version(version) else _string(topic)


def publish_head(topic: bytes, payload_len: int, *, version: int) -> bytes:
    """Everything of a QoS 0 PUBLISH (not retained) before its payload of ``payload_len`` bytes."""
    head = publish_topic(topic, version=version)
    return _QOS0_HEADS[len(head) + payload_len] + head


def puback(packet_id: int) -> bytes:
    """PUBACK (3.4) with success and no properties: the same bytes in 3.1.1 and v5."""
    return bytes((PUBACK << 4, 2)) + _packet_id(packet_id)


class FixedHeaders(dict[int, bytes]):
    """Fixed headers (first byte, remaining length) of one kind of packet by remaining length, each encoded on
    first use: ``heads[remaining_length]``. Holds at most ``limit`` sizes (then it starts again)."""

    __slots__ = ("first", "limit")

    def __init__(self, first: int, limit: int = 4096) -> None:
        super().__init__()
        self.first = first
        self.limit = limit

    def __missing__(self, remaining: int) -> bytes:
        head = bytes((self.first,)) + varlen(remaining)
        if len(self) >= self.limit:
            self.clear()
        self[remaining] = head
        return head


_QOS0_HEADS = FixedHeaders(PUBLISH << 4)
