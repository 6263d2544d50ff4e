"""The few MQTT 3.1.1 packets the bench needs (CONNECT, SUBSCRIBE, PUBLISH QoS 0, PINGREQ, DISCONNECT) and an
incremental reader, without paho: the MQTT load generator must cost less than what it measures.

>>> encode_publish("a/b", b"x").hex()
'30060003612f6278'
>>> r = PacketReader()
>>> r.feed(bytes.fromhex("300600"))
[]
>>> r.feed(bytes.fromhex("03612f6278") + bytes.fromhex("20020000"))
[(3, 0, b'\\x00\\x03a/bx'), (2, 0, b'\\x00\\x00')]
>>> parse_publish(0, b"\\x00\\x03a/bx")
('a/b', b'x')
"""

from __future__ import annotations

import struct

from proto.mqtt.packets import varlen

__all__ = [
    "CONNACK",
    "PUBLISH",
    "SUBACK",
    "PINGRESP",
    "PacketReader",
    "encode_connect",
    "encode_subscribe",
    "encode_publish",
    "publish_header",
    "parse_publish",
    "PINGREQ_BYTES",
    "DISCONNECT_BYTES",
]

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
MAX_PACKET = 1 << 20


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varlen(len(body)) + body


def encode_connect(client_id: str, keepalive: int = 60, clean: bool = True) -> bytes:
    return _packet(
        CONNECT << 4,
        _str("MQTT") + bytes((4, 0x02 if clean else 0)) + struct.pack("!H", keepalive) + _str(client_id),
    )


def encode_subscribe(packet_id: int, topic: str, qos: int = 0) -> bytes:
    return _packet(SUBSCRIBE << 4 | 0x02, struct.pack("!H", packet_id) + _str(topic) + bytes((qos,)))


def publish_header(topic: str, payload_len: int) -> bytes:
    """Fixed header + topic of a QoS 0 PUBLISH whose payload is ``payload_len`` bytes (append the payload)."""
    t = _str(topic)
    return bytes((PUBLISH << 4,)) + varlen(len(t) + payload_len) + t


def encode_publish(topic: str, payload: bytes) -> bytes:
    return publish_header(topic, len(payload)) + payload


def parse_publish(flags: int, body: bytes) -> tuple[str, bytes]:
    """(topic, payload) of a PUBLISH body (QoS 1/2 packet identifiers skipped)."""
    n = (body[0] << 8) | body[1]
    topic = body[2 : 2 + n].decode("utf-8", "replace")
    pos = 2 + n + (2 if (flags >> 1) & 3 else 0)
    return topic, body[pos:]


class PacketReader:
    """Feed stream bytes, get whole packets as (type, flags, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            first = buf[pos]
            length = shift = 0
            i = pos + 1
            complete = False
            while i < n:
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("malformed remaining length")
            if not complete:
                break
            if length > MAX_PACKET:
                raise ValueError(f"packet of {length} bytes")
            if n - i < length:
                break
            out.append((first >> 4, first & 0x0F, bytes(buf[i : i + length])))
            pos = i + length
        if pos:
            del buf[:pos]
        return out
