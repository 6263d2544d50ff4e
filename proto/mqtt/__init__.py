"""MQTT 3.1.1 and v5, client side, sans-I/O: bytes in, packets out; packets in, bytes out. No sockets, no asyncio,
no clock. The gateway's device link (v5), the bench's load generators and bare responders, and the fleet
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

from proto.mqtt import decode, encode, errors, numbers, reader
from proto.mqtt.decode import *  # noqa: F403
from proto.mqtt.encode import *  # noqa: F403
from proto.mqtt.errors import *  # noqa: F403
from proto.mqtt.numbers import *  # noqa: F403
from proto.mqtt.reader import *  # noqa: F403

__all__ = [*numbers.__all__, *errors.__all__, *reader.__all__, *encode.__all__, *decode.__all__]
