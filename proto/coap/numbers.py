"""CoAP numbers (RFC 7252 section 12, RFC 7959, RFC 7641, RFC 7967, RFC 8613, RFC 9175): message types, codes
(with their dotted form), option numbers, content formats, and the transmission parameters of section 4.8.

The enums are ``IntEnum``: a value read off the wire compares equal to its member, and the module-level aliases
(``CON``, ``GET``, ``CONTENT``...) are plain ints for code that runs per datagram.

>>> Code.CONTENT.dotted, dotted(0x84), Code(0x01).is_request(), Code.NOT_FOUND.is_successful()
('2.05', '4.04', True, False)
>>> Option.URI_PATH, ContentFormat.CBOR
(<Option.URI_PATH: 11>, <ContentFormat.CBOR: 60>)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "Type",
    "Code",
    "Option",
    "ContentFormat",
    "dotted",
    "CON",
    "NON",
    "ACK",
    "RST",
    "EMPTY",
    "GET",
    "POST",
    "PUT",
    "CREATED",
    "CHANGED",
    "VALID",
    "CONTENT",
    "PAYLOAD_MARKER",
    "ACK_TIMEOUT",
    "ACK_RANDOM_FACTOR",
    "MAX_RETRANSMIT",
    "MAX_TRANSMIT_WAIT",
    "EXCHANGE_LIFETIME",
    "EMPTY_ACK_DELAY",
    "Timing",
    "TIMING",
]

VERSION = 1
PAYLOAD_MARKER = 0xFF


class Type(IntEnum):
    """Message types (section 3)."""

    CON = 0
    NON = 1
    ACK = 2
    RST = 3


def dotted(code: int) -> str:
    """Any code byte in the ``c.dd`` form of section 12.1: ``0x45`` -> ``"2.05"``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


class Code(IntEnum):
    """Method and response codes (section 12.1, RFC 7959, RFC 8132, RFC 8516)."""

    EMPTY = 0x00
    GET = 0x01
    POST = 0x02
    PUT = 0x03
    DELETE = 0x04
    FETCH = 0x05
    PATCH = 0x06
    IPATCH = 0x07
    CREATED = 0x41
    DELETED = 0x42
    VALID = 0x43
    CHANGED = 0x44
    CONTENT = 0x45
    CONTINUE = 0x5F
    BAD_REQUEST = 0x80
    UNAUTHORIZED = 0x81
    BAD_OPTION = 0x82
    FORBIDDEN = 0x83
    NOT_FOUND = 0x84
    METHOD_NOT_ALLOWED = 0x85
    NOT_ACCEPTABLE = 0x86
    REQUEST_ENTITY_INCOMPLETE = 0x88
    CONFLICT = 0x89
    PRECONDITION_FAILED = 0x8C
    REQUEST_ENTITY_TOO_LARGE = 0x8D
    UNSUPPORTED_CONTENT_FORMAT = 0x8F
    TOO_MANY_REQUESTS = 0x9D
    INTERNAL_SERVER_ERROR = 0xA0
    NOT_IMPLEMENTED = 0xA1
    BAD_GATEWAY = 0xA2
    SERVICE_UNAVAILABLE = 0xA3
    GATEWAY_TIMEOUT = 0xA4
    PROXYING_NOT_SUPPORTED = 0xA5

    @property
    def dotted(self) -> str:
        return dotted(self)

    def is_request(self) -> bool:
        return is_request(self)

    def is_response(self) -> bool:
        return is_response(self)

    def is_successful(self) -> bool:
        return 0x40 <= self < 0x60


def is_request(code: int) -> bool:
    """Class 0 and not Empty: a method."""
    return 0x01 <= code < 0x20


def is_response(code: int) -> bool:
    """Classes 2, 4 and 5."""
    return 0x40 <= code < 0xC0


class Option(IntEnum):
    """Option numbers (section 12.2 and the RFCs that registered them)."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    OSCORE = 9
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    ECHO = 252
    NO_RESPONSE = 258


class ContentFormat(IntEnum):
    """The content formats this project speaks (section 12.3, RFC 7049)."""

    TEXT = 0
    LINK_FORMAT = 40
    OCTET_STREAM = 42
    JSON = 50
    CBOR = 60


CON, NON, ACK, RST = 0, 1, 2, 3
EMPTY, GET, POST, PUT = 0x00, 0x01, 0x02, 0x03
CREATED, CHANGED, VALID, CONTENT = 0x41, 0x44, 0x43, 0x45

# Transmission parameters (section 4.8 and 4.8.2).
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
MAX_TRANSMIT_WAIT = ACK_TIMEOUT * (2 ** (MAX_RETRANSMIT + 1) - 1) * ACK_RANDOM_FACTOR  # 93 s
EXCHANGE_LIFETIME = 247.0
# How long a server waits for an answer before it sends an empty ACK and answers separately (section 5.2.2
# leaves it to the implementation; aiocoap's value, so that both paths of the gateway behave alike).
EMPTY_ACK_DELAY = 0.1


@dataclass(frozen=True)
class Timing:
    """How a confirmable message is sent again (section 4.2): after ``ack_timeout`` x uniform(1, ``random_factor``),
    the timeout doubling each time, at most ``max_retransmit`` times. ``random_factor`` 1 makes it exact."""

    ack_timeout: float = ACK_TIMEOUT
    random_factor: float = ACK_RANDOM_FACTOR
    max_retransmit: int = MAX_RETRANSMIT

    def first_timeout(self, rng: random.Random) -> float:
        if self.random_factor > 1.0:
            return self.ack_timeout * rng.uniform(1.0, self.random_factor)
        return self.ack_timeout


TIMING = Timing()  # RFC 7252's
