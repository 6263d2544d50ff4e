"""MQTT 3.1.1 and v5, client side, sans-I/O: bytes in, packets out; packets in, bytes out. No sockets, no asyncio,
no clock. The gateway's resolve link (v5), the bench's load generator and bare responder, and the fleet
simulator (3.1.1, as devices speak it) all frame and build their packets here and only move bytes.

numbers.py   protocol levels (MQTT311, MQTT5), packet types, the body-less packets, properties, reason codes
errors.py    MqttProtocolError: the one error for bytes that are not MQTT
reader.py    Reader: stream bytes in, whole packets out as (first byte, body), with a cap on the packet size
encode.py    connect, subscribe, unsubscribe, publish (+ publish_head, FixedHeaders for pre-encoded headers),
             puback, varlen
decode.py    parse_connack, parse_suback, parse_publish, parse_disconnect, parse_properties, read_varint

Use it as ``from proto import mqtt``: ``mqtt.Reader``, ``mqtt.publish(topic, payload, version=mqtt.MQTT311)``.
The firmware has its own MicroPython client (firmware/carrier/mqtt.py), checked against the same brokers.
"""

from __future__ import annotations

from proto.mqtt.decode import (
    Connack,
    Disconnect,
    Suback,
    parse_connack,
    parse_disconnect,
    parse_properties,
    parse_publish,
    parse_suback,
    read_varint,
)
from proto.mqtt.encode import (
    FixedHeaders,
    Will,
    connect,
    puback,
    publish,
    publish_head,
    publish_topic,
    subscribe,
    unsubscribe,
    varlen,
)
from proto.mqtt.errors import MqttProtocolError
from proto.mqtt.numbers import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    DISCONNECT_BYTES,
    MQTT5,
    MQTT311,
    PINGREQ,
    PINGREQ_BYTES,
    PINGRESP,
    PINGRESP_BYTES,
    PROP_ASSIGNED_CLIENT_ID,
    PROP_MAXIMUM_PACKET_SIZE,
    PROP_REASON_STRING,
    PROP_SERVER_KEEP_ALIVE,
    PUBACK,
    PUBLISH,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    reason,
)
from proto.mqtt.reader import DEFAULT_MAX_PACKET, Reader

__all__ = [
    "MQTT311",
    "MQTT5",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "PINGREQ_BYTES",
    "PINGRESP_BYTES",
    "DISCONNECT_BYTES",
    "PROP_ASSIGNED_CLIENT_ID",
    "PROP_MAXIMUM_PACKET_SIZE",
    "PROP_REASON_STRING",
    "PROP_SERVER_KEEP_ALIVE",
    "reason",
    "MqttProtocolError",
    "Reader",
    "DEFAULT_MAX_PACKET",
    "Will",
    "varlen",
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "publish_topic",
    "publish_head",
    "puback",
    "FixedHeaders",
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
