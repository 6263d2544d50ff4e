"""Reading the bodies of the MQTT packets a client receives, 3.1.1 or v5 (``version`` as in
:mod:`proto.mqtt.encode`): CONNACK, SUBACK/UNSUBACK, PUBLISH, DISCONNECT and v5 properties. A body comes from
:class:`proto.mqtt.reader.Reader`; whatever is wrong with it raises :class:`MqttProtocolError`, nothing else.

>>> parse_publish(0x30, b"\\x00\\x03a/b\\x00x", version=MQTT5)
(b'a/b', b'x', 0)
>>> parse_connack(b"\\x00\\x05", version=MQTT311)
Connack(session_present=False, code=5, properties={})
"""

from __future__ import annotations

from typing import NamedTuple

from proto.mqtt.errors import MqttProtocolError
from proto.mqtt.numbers import (
    BYTE,
    INT2,
    INT4,
    MQTT5,
    MQTT311,
    PAIR,
    PROP_REASON_STRING,
    PROPERTY_KINDS,
    VARINT,
)

__all__ = [
    "Connack",
    "Suback",
    "Disconnect",
    "read_varint",
    "parse_properties",
    "parse_connack",
    "parse_suback",
    "parse_publish",
    "parse_disconnect",
]


class Connack(NamedTuple):
    session_present: bool
    code: int  # 0 = accepted (3.1.1 return code or v5 reason code)
    properties: dict[int, object]  # v5 only


class Suback(NamedTuple):
    """A SUBACK (one code per filter: the granted QoS, or >= 0x80 refused) or an UNSUBACK (v5 codes; none in
    3.1.1)."""

    packet_id: int
    codes: list[int]


class Disconnect(NamedTuple):
    code: int  # v5 reason code
    reason: str  # the Reason String property, or ""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The variable byte integer at ``pos`` and where it ends."""
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
    """The v5 properties at ``pos`` as {identifier: value} (a repeated identifier keeps the last; strings and
    binary data as bytes, a string pair as its name) and where they end."""
    length, pos = read_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise MqttProtocolError("properties run past the packet")
    props: dict[int, object] = {}
    while pos < end:
        ident = data[pos]
        pos += 1
        kind = PROPERTY_KINDS.get(ident)
        value: object
        if kind is None:
            raise MqttProtocolError(f"unknown property 0x{ident:02x}")
        if pos >= end:
            raise MqttProtocolError(f"property 0x{ident:02x} has no value")
        if kind == BYTE:
            value, pos = data[pos], pos + 1
        elif kind == INT2:
            value, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif kind == INT4:
            value, pos = int.from_bytes(data[pos : pos + 4], "big"), pos + 4
        elif kind == VARINT:
            value, pos = read_varint(data, pos)
        else:  # UTF8, BINARY, PAIR: two length bytes first
            n = int.from_bytes(data[pos : pos + 2], "big")
            value, pos = bytes(data[pos + 2 : pos + 2 + n]), pos + 2 + n
            if kind == PAIR:
                pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
        if pos > end:
            raise MqttProtocolError(f"property 0x{ident:02x} runs past the properties")
        props[ident] = value
    return props, end


def parse_connack(body: bytes, *, version: int) -> Connack:
    if version == MQTT311:
        if len(body) != 2:
            raise MqttProtocolError(f"CONNACK of {len(body)} bytes")
        return Connack(bool(body[0] & 1), body[1], {})
    if len(body) < 3:
        raise MqttProtocolError(f"CONNACK of {len(body)} bytes")
    props, _ = parse_properties(body, 2)
    return Connack(bool(body[0] & 1), body[1], props)


def parse_suback(body: bytes, *, version: int) -> Suback:
    """A SUBACK or UNSUBACK (the same layout; a 3.1.1 UNSUBACK has no codes)."""
    if len(body) < (3 if version == MQTT5 else 2):
        raise MqttProtocolError(f"SUBACK of {len(body)} bytes")
    pos = parse_properties(body, 2)[1] if version == MQTT5 else 2
    return Suback((body[0] << 8) | body[1], list(body[pos:]))


def parse_publish(first: int, body: bytes, *, version: int) -> tuple[bytes, bytes, int]:
    """(topic, payload, packet identifier; 0 at QoS 0) of a PUBLISH whose first byte is ``first``; v5
    properties are skipped. QoS is ``first >> 1 & 3``, retain ``first & 1``. A plain tuple: it is on every
    message's path."""
    n = len(body)
    if n < 2:
        raise MqttProtocolError("truncated PUBLISH")
    pos = 2 + ((body[0] << 8) | body[1])
    topic = body[2:pos]
    pid = 0
    if first & 0x06:
        if first & 0x06 == 0x06:
            raise MqttProtocolError("PUBLISH with QoS 3")
        if pos + 2 > n:
            raise MqttProtocolError("truncated PUBLISH")
        pid = (body[pos] << 8) | body[pos + 1]
        if not pid:
            raise MqttProtocolError("PUBLISH at QoS > 0 with packet identifier 0")
        pos += 2
    if version == MQTT5:
        if pos >= n:
            raise MqttProtocolError("truncated PUBLISH")
        if body[pos]:  # properties (brokers rarely add any to a plain message)
            plen, pos = read_varint(body, pos)
            pos += plen
        else:
            pos += 1
    if pos > n:
        raise MqttProtocolError("PUBLISH runs past its packet")
    return topic, body[pos:], pid


def parse_disconnect(body: bytes) -> Disconnect:
    """A DISCONNECT from a v5 broker (an empty body is a normal disconnection)."""
    if not body:
        return Disconnect(0, "")
    text = ""
    if len(body) > 1:
        props, _ = parse_properties(body, 1)
        raw = props.get(PROP_REASON_STRING)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    return Disconnect(body[0], text)
