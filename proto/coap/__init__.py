"""CoAP (RFC 7252) for the CPython side, sans-I/O: no sockets, no asyncio, no clock (time is a parameter).

numbers.py   message types, codes (dotted form), option numbers, content formats, transmission parameters
message.py   one datagram <-> Message (MessageError for one that does not parse), option encoding, the header
             and option spans for code that runs per datagram, request templates
client.py    the client side of the message layer: Message IDs and tokens, CON retransmission, matching
             piggybacked, empty-ACK-then-separate and reset answers (Client, one per source endpoint)
server.py    the server side: de-duplication by (source, Message ID), piggybacked ACK or NON, empty ACK after a
             delay then a separate CON response sent until acknowledged (Server, one per socket)

Users: the gateway's fast path (gateway/frontends/coap_fast.py), the bench's load generator, anchors and P5,
the light simulator (tools/harness/sim/coap.py). The firmware has its own MicroPython twin
(firmware/carrier/coap.py).
"""

from proto.coap.client import Client
from proto.coap.message import (
    Message,
    MessageError,
    RequestTemplate,
    encode_body,
    encode_options,
    parse_header,
    request_template,
    uint_of,
    uint_value,
)
from proto.coap.numbers import Code, ContentFormat, Option, Type, dotted
from proto.coap.server import Server

__all__ = [
    "Client",
    "Server",
    "Message",
    "MessageError",
    "RequestTemplate",
    "request_template",
    "encode_body",
    "encode_options",
    "parse_header",
    "uint_of",
    "uint_value",
    "Code",
    "ContentFormat",
    "Option",
    "Type",
    "dotted",
]
