"""MQTT v5 client packets, sans-I/O: what the gateway's asyncio resolve link (gateway/frontends/mqtt_fast.py) sends
and reads. Bytes in, packets out; no sockets, no clock.

Only the client side of what that link uses: CONNECT (clean start, username/password, Maximum Packet Size),
CONNACK, SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK, PUBLISH (sent at QoS 0; read at QoS 0 or 1), PUBACK,
PINGREQ/PINGRESP and DISCONNECT (OASIS MQTT 5.0, sections 2 and 3). Malformed input raises
:class:`MqttProtocolError`; the connection that carried it is then closed (MQTT has no way to skip a packet it
cannot frame).

>>> publish(b"a/b", b"x").hex()
'30070003612f620078'
>>> r = Reader(64)
>>> r.feed(bytes.fromhex("30070003612f62"))
[]
>>> [(first >> 4, body) for first, body in r.feed(bytes.fromhex("0078") + PINGRESP)]
[(3, b'\\x00\\x03a/b\\x00x'), (13, b'')]
>>> parse_publish(0x30, b"\\x00\\x03a/b\\x00x")
(b'a/b', b'x', 0)
"""

from __future__ import annotations

import struct

__all__ = [
    "MqttProtocolError",
    "Reader",
    "connect",
    "parse_connack",
    "subscribe",
    "parse_suback",
    "unsubscribe",
    "publish",
    "publish_head",
    "parse_publish",
    "puback",
    "read_varint",
    "parse_properties",
    "parse_disconnect",
    "varlen",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "SUBACK",
    "UNSUBACK",
    "PINGRESP_TYPE",
    "DISCONNECT_TYPE",
    "REASONS",
]

CONNECT_TYPE, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE_TYPE, SUBACK, UNSUBSCRIBE_TYPE, UNSUBACK = 8, 9, 10, 11
PINGREQ_TYPE, PINGRESP_TYPE, DISCONNECT_TYPE = 12, 13, 14

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"  # normal disconnection, no properties

# property identifier -> kind (section 2.2.2.2): 1 byte, 2/4-byte integer, variable byte integer, UTF-8 string,
# binary data, string pair
_BYTE, _INT2, _INT4, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
# fmt: off
_PROPERTY_KINDS = {
    0x01: _BYTE, 0x02: _INT4, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _INT4, 0x12: _UTF8,
    0x13: _INT2, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE, 0x18: _INT4, 0x19: _BYTE, 0x1A: _UTF8, 0x1C: _UTF8,
    0x1F: _UTF8, 0x21: _INT2, 0x22: _INT2, 0x23: _INT2, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _INT4,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}
# fmt: on
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_MAXIMUM_PACKET_SIZE = 0x27
PROP_REASON_STRING = 0x1F
PROP_ASSIGNED_CLIENT_ID = 0x12

# The reason codes worth naming in a log line (section 2.4); others print as hex.
# fmt: off
REASONS = {
    0x00: "success", 0x01: "granted QoS 1", 0x02: "granted QoS 2", 0x04: "disconnect with will",
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error", 0x83: "implementation specific error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
    0x8D: "keep alive timeout", 0x8E: "session taken over", 0x8F: "topic filter invalid", 0x90: "topic name invalid",
    0x95: "packet too large", 0x97: "quota exceeded", 0x9C: "use another server", 0x9D: "server moved",
    0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded",
}
# fmt: on


class MqttProtocolError(ValueError):
    """Bytes that are not the MQTT v5 the link expects (the connection is closed and opened again)."""


def reason(code: int) -> str:
    return REASONS.get(code, f"0x{code:02x}")


# -- encoding ------------------------------------------------------------------------------------------------
def varlen(n: int) -> bytes:
    """A variable byte integer (section 1.5.5)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("MQTT string longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varlen(len(body)) + body


def connect(
    client_id: str,
    keepalive: int,
    *,
    username: str | None = None,
    password: str | None = None,
    max_packet: int = 0,
) -> bytes:
    """CONNECT with clean start, no will; ``max_packet`` > 0 tells the broker not to send anything larger."""
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError("keepalive must be 0..65535 s")
    flags = 0x02  # clean start
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    props = bytes((PROP_MAXIMUM_PACKET_SIZE,)) + struct.pack("!I", max_packet) if max_packet else b""
    body = _str(b"MQTT") + bytes((5, flags)) + struct.pack("!H", keepalive) + varlen(len(props)) + props
    body += _str(client_id.encode())
    if username is not None:
        body += _str(username.encode())
    if password is not None:
        body += _str(password.encode())
    return _packet(CONNECT_TYPE << 4, body)


def subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE ``(filter, qos)`` pairs (no local off, retain as published off, retained messages sent)."""
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic, qos in filters:
        body += _str(topic.encode()) + bytes((qos & 3,))
    return _packet(SUBSCRIBE_TYPE << 4 | 0x02, body)


def unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic in filters:
        body += _str(topic.encode())
    return _packet(UNSUBSCRIBE_TYPE << 4 | 0x02, body)


def publish_head(topic: bytes, payload_len: int) -> bytes:
    """Fixed header, topic and (empty) properties of a QoS 0 PUBLISH: append the payload."""
    n = len(topic)
    rest = 3 + n + payload_len
    return bytes((PUBLISH << 4,)) + varlen(rest) + bytes((n >> 8, n & 0xFF)) + topic + b"\x00"


def publish(topic: bytes, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH, not retained."""
    return publish_head(topic, len(payload)) + payload


def puback(packet_id: int) -> bytes:
    return bytes((PUBACK << 4, 2, packet_id >> 8, packet_id & 0xFF))


# -- decoding ------------------------------------------------------------------------------------------------
def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(4):
        if pos >= len(data):
            raise MqttProtocolError("truncated variable byte integer")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise MqttProtocolError("variable byte integer longer than 4 bytes")


def parse_properties(data: bytes, pos: int) -> tuple[dict[int, object], int]:
    """The properties at ``pos`` as {identifier: value} (a repeated identifier keeps the last) and where they end."""
    length, pos = read_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise MqttProtocolError("properties run past the packet")
    props: dict[int, object] = {}
    while pos < end:
        ident = data[pos]
        pos += 1
        kind = _PROPERTY_KINDS.get(ident)
        value: object
        if kind is None:
            raise MqttProtocolError(f"unknown property 0x{ident:02x}")
        if pos >= end:
            raise MqttProtocolError(f"property 0x{ident:02x} has no value")
        if kind == _BYTE:
            value, pos = data[pos], pos + 1
        elif kind == _INT2:
            value, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif kind == _INT4:
            value, pos = int.from_bytes(data[pos : pos + 4], "big"), pos + 4
        elif kind == _VARINT:
            value, pos = read_varint(data, pos)
        else:
            n = int.from_bytes(data[pos : pos + 2], "big")
            value, pos = bytes(data[pos + 2 : pos + 2 + n]), pos + 2 + n
            if kind == _PAIR:
                m = int.from_bytes(data[pos : pos + 2], "big")
                pos += 2 + m
        if pos > end:
            raise MqttProtocolError(f"property 0x{ident:02x} runs past the properties")
        props[ident] = value
    return props, end


def parse_connack(body: bytes) -> tuple[bool, int, dict[int, object]]:
    """(session present, reason code, properties)."""
    if len(body) < 3:
        raise MqttProtocolError(f"CONNACK of {len(body)} bytes")
    props, _ = parse_properties(body, 2)
    return bool(body[0] & 1), body[1], props


def parse_suback(body: bytes) -> tuple[int, list[int]]:
    """(packet identifier, one reason code per filter) of a SUBACK or UNSUBACK."""
    if len(body) < 3:
        raise MqttProtocolError(f"SUBACK of {len(body)} bytes")
    _, pos = parse_properties(body, 2)
    return (body[0] << 8) | body[1], list(body[pos:])


def parse_publish(first: int, body: bytes) -> tuple[bytes, bytes, int]:
    """(topic, payload, packet identifier or 0 for QoS 0) of a PUBLISH; properties are skipped."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise MqttProtocolError("PUBLISH with QoS 3")
    if len(body) < 3:
        raise MqttProtocolError("truncated PUBLISH")
    n = (body[0] << 8) | body[1]
    pos = 2 + n
    topic = body[2:pos]
    pid = 0
    if qos:
        pid = (body[pos] << 8) | body[pos + 1] if pos + 1 < len(body) else -1
        pos += 2
    if pos >= len(body) or pid < 0:
        raise MqttProtocolError("truncated PUBLISH")
    plen = body[pos]
    if plen:
        plen, pos = read_varint(body, pos)
        pos += plen
    else:
        pos += 1
    if pos > len(body):
        raise MqttProtocolError("PUBLISH properties run past the packet")
    return topic, body[pos:], pid


def parse_disconnect(body: bytes) -> tuple[int, str]:
    """(reason code, reason string) of a DISCONNECT from the broker."""
    if not body:
        return 0, ""
    text = ""
    if len(body) > 1:
        props, _ = parse_properties(body, 1)
        raw = props.get(PROP_REASON_STRING)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    return body[0], text


class Reader:
    """Feed stream bytes, get whole packets as ``(first byte, body)``; a packet larger than ``max_packet`` (which
    the link announced in CONNECT, so the broker must not send one) is a protocol error."""

    __slots__ = ("max_packet", "_buf")

    def __init__(self, max_packet: int) -> None:
        self.max_packet = max_packet
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1]
            i = pos + 2
            if length & 0x80:  # a multi-byte remaining length
                length &= 0x7F
                shift = 7
                while True:
                    if i >= n:
                        self._buf = buf[pos:]
                        return out
                    b = buf[i]
                    i += 1
                    length |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttProtocolError("remaining length longer than 4 bytes")
            if length > self.max_packet:
                raise MqttProtocolError(f"packet of {length} bytes (announced maximum {self.max_packet})")
            end = i + length
            if end > n:
                break
            out.append((first, buf[i:end]))
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return out
