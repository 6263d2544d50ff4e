"""Every wire format of the CPython side, written once and sans-I/O: bytes in, values or events out, values in,
bytes out. No sockets, no asyncio, no clock (time is a parameter), and nothing else of ours is imported
(tests/unit/test_import_rules.py). The gateway, the node simulator, the fleet simulator and the benchmarks drive
these modules and only move bytes; the firmware keeps its MicroPython twins (``firmware/carrier``), pinned to the
same vectors (``tests/vectors``).

identifier.py   Handle identifiers ``<prefix>/<suffix>``: parse, normalise, the stable reason codes
records.py      Handle records and values: the Handle REST JSON form, the device CBOR form, HS_ADMIN
devicemsg.py    device <-> gateway messages (CBOR maps with small integer keys, docs/protocol.md), reports
                checked for storage
coap/           CoAP (RFC 7252): messages, numbers, the client and server message layers
mqtt/           MQTT 3.1.1 and v5 packets and the one incremental reader
handle/         the Handle native protocol (RFC 3652): envelope, framing, requests and answers, values,
                administration, challenge and session, credentials, key files
"""
