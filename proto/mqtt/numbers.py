"""MQTT numbers (OASIS MQTT 3.1.1 and 5.0): protocol levels, packet types, the few whole packets that never
change, property identifiers and reason codes. The only place these numbers are written on the CPython side."""

from __future__ import annotations

__all__ = [
    "MQTT311",
    "MQTT5",
    "VERSIONS",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "AUTH",
    "PINGREQ_BYTES",
    "PINGRESP_BYTES",
    "DISCONNECT_BYTES",
    "MAX_REMAINING_LENGTH",
    "PROP_SERVER_KEEP_ALIVE",
    "PROP_MAXIMUM_PACKET_SIZE",
    "PROP_REASON_STRING",
    "PROP_ASSIGNED_CLIENT_ID",
    "PROPERTY_KINDS",
    "REASONS",
    "CONNACK_311",
    "reason",
]

# protocol level byte of CONNECT (3.1.2.2)
MQTT311 = 4
MQTT5 = 5
VERSIONS = (MQTT311, MQTT5)

# control packet types: the high nibble of the first byte (2.1.2)
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT, AUTH = 12, 13, 14, 15

# whole packets without a body (a v5 DISCONNECT without a body is "normal disconnection, no properties")
PINGREQ_BYTES = b"\xc0\x00"
PINGRESP_BYTES = b"\xd0\x00"
DISCONNECT_BYTES = b"\xe0\x00"

MAX_REMAINING_LENGTH = 268_435_455  # four bytes of variable byte integer (1.5.5)

# v5 property identifiers (2.2.2.2) the CPython side names, and the kind of value of each identifier
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_REASON_STRING = 0x1F
PROP_MAXIMUM_PACKET_SIZE = 0x27
BYTE, INT2, INT4, VARINT, UTF8, BINARY, PAIR = range(7)
# fmt: off
PROPERTY_KINDS = {
    0x01: BYTE, 0x02: INT4, 0x03: UTF8, 0x08: UTF8, 0x09: BINARY, 0x0B: VARINT, 0x11: INT4, 0x12: UTF8,
    0x13: INT2, 0x15: UTF8, 0x16: BINARY, 0x17: BYTE, 0x18: INT4, 0x19: BYTE, 0x1A: UTF8, 0x1C: UTF8,
    0x1F: UTF8, 0x21: INT2, 0x22: INT2, 0x23: INT2, 0x24: BYTE, 0x25: BYTE, 0x26: PAIR, 0x27: INT4,
    0x28: BYTE, 0x29: BYTE, 0x2A: BYTE,
}

# The v5 reason codes worth naming in a log line (2.4); others print as hex.
REASONS = {
    0x00: "success", 0x01: "granted QoS 1", 0x02: "granted QoS 2", 0x04: "disconnect with will",
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error", 0x83: "implementation specific error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
    0x8D: "keep alive timeout", 0x8E: "session taken over", 0x8F: "topic filter invalid", 0x90: "topic name invalid",
    0x95: "packet too large", 0x97: "quota exceeded", 0x9C: "use another server", 0x9D: "server moved",
    0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded",
}

# 3.1.1 CONNACK return codes (3.2.2.3); a 3.1.1 SUBACK refuses with 0x80
CONNACK_311 = {
    0: "accepted", 1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized",
}
# fmt: on


def reason(code: int, version: int = MQTT5) -> str:
    """A reason code as words: ``version`` MQTT311 reads ``code`` as a CONNACK return code."""
    names = CONNACK_311 if version == MQTT311 else REASONS
    return names.get(code, f"0x{code:02x}")
