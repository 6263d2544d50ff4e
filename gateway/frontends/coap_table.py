"""The CoAP fast path's table (gateway/frontends/coap_fast.py serves from it): which request bytes key it, and the
pre-encoded answer each entry holds.

A request the table can serve is a GET whose option bytes -- everything after the token, taken raw -- are a key
(:func:`classify`; ETag options in front are taken out: a revalidation). Only requests the slow path validated and
answered with a 2.05 resolution are put in, so equal bytes mean an equal, valid request. An entry
(:class:`TableEntry`) holds the options and payload of its 2.05 and of its 2.03; its ``Max-Age`` counts down: the
options are re-encoded when the whole-second value changes (at most once a second per entry), not per request. It
stays equal to the resolver through :class:`gateway.frontends.hotpath.CacheGuard`, as the MQTT table's
(mqtt_table.py) does.
"""

from __future__ import annotations

import math

from gateway.frontends.common import resolution_payload
from gateway.frontends.hotpath import HotEntry
from gateway.resolution import Answer, CachedAnswer
from proto import devicemsg
from proto.coap.message import MessageError, encode_option, option_spans, uint_value
from proto.coap.numbers import GET, NON, ContentFormat, Option

__all__ = ["FAST_OPTIONS", "MAX_PAYLOAD", "TableEntry", "classify"]

MAX_PAYLOAD = 1024  # larger answers go block-wise: aiocoap's (RFC 7959)

ETAG, URI_PORT, URI_PATH, URI_QUERY, ACCEPT = (
    Option.ETAG,
    Option.URI_PORT,
    Option.URI_PATH,
    Option.URI_QUERY,
    Option.ACCEPT,
)
CONTENT_FORMAT, MAX_AGE = Option.CONTENT_FORMAT, Option.MAX_AGE
FAST_OPTIONS = frozenset((ETAG, URI_PORT, URI_PATH, URI_QUERY, ACCEPT))


def classify(data: bytes) -> tuple[bytes, tuple[bytes, ...]] | None:
    """(key, ETags) of a request the fast path could answer, None for anything else.

    Eligible: CoAP version 1, CON or NON, a token of at most 8 bytes, code GET, options only ETag (1-8 bytes),
    Uri-Port (0-2 bytes; libcoap's client sends it), Uri-Path (the first one ``r``), Uri-Query and Accept (0-2
    bytes), well formed, no payload. The key is the option bytes after the token with the ETags taken out (the
    first option after them re-encoded with its delta from 0)."""
    n = len(data)
    if n < 4:
        return None
    b0 = data[0]
    tkl = b0 & 0x0F
    if b0 >> 6 != 1 or (b0 >> 4) & 3 > NON or tkl > 8 or data[1] != GET or n < 4 + tkl:
        return None
    start = 4 + tkl
    try:
        spans, payload = option_spans(data, start)
    except MessageError:
        return None
    if payload != n:
        return None  # a GET with a payload: not ours
    etags: list[bytes] = []
    first = -1  # offset of the first option that is not an ETag
    first_number = 0
    path = False  # the first Uri-Path was seen (and is "r")
    for number, head, a, b in spans:
        if number not in FAST_OPTIONS:
            return None
        if number == ETAG:
            if not 1 <= b - a <= 8:
                return None
            etags.append(data[a:b])
            continue
        if first < 0:
            if a != head + 1:
                return None  # Uri-Port or Uri-Path "r" comes first: a one-byte option header
            first, first_number = head, number
        if number == URI_PATH and not path:
            if data[a:b] != b"r":
                return None  # the path must start with the "r" segment
            path = True
        elif (number == ACCEPT or number == URI_PORT) and b - a > 2:
            return None
    if not path:
        return None
    if not etags:
        return data[start:], ()
    # Re-encode the first option after the ETags with its delta from 0 instead of from ETag (4).
    return bytes((first_number << 4 | data[first] & 0x0F,)) + data[first + 1 :], tuple(etags)


class TableEntry(HotEntry):
    """A cached answer: its encoded options and payload, and until when they are right."""

    __slots__ = (
        "key",
        "as_json",
        "etag",
        "dynamic",
        "age",
        "until",
        "tail",
        "vtail",
        "_etag_opt",
        "_cf_opt",
        "_payload",
    )

    def __init__(
        self,
        key: bytes,
        answer: Answer,
        as_json: bool,
        etag: bytes,
        payload: bytes | None,
        refresh_at: float,
        ref: CachedAnswer | None,
        dynamic: bool,
    ) -> None:
        super().__init__(answer, refresh_at, ref)
        self.key = key
        self.as_json = as_json
        self.etag = etag
        self.dynamic = dynamic  # value TTLs in the payload count down (absolute TTLs): re-render every second
        cf = ContentFormat.JSON if as_json else ContentFormat.CBOR
        self._etag_opt = encode_option(ETAG, etag)
        self._cf_opt = encode_option(CONTENT_FORMAT - ETAG, uint_value(cf))
        self._payload = payload  # None: rendered on first use
        self.age = -1
        self.until = -math.inf
        self.tail = b""  # 2.05: options and payload after the token
        self.vtail = b""  # 2.03: options after the token

    def render(self, now: float) -> bool:
        """Encode the tails for the Max-Age at ``now`` and compute until when they hold (``until``); False when
        the answer does not fit in one datagram after all."""
        age = int(self.expires - now)
        if self._payload is None or (self.dynamic and now > self.until):
            self._payload = resolution_payload(self.answer, self.as_json, now, devicemsg.SOURCE_CACHE)
            if len(self._payload) > MAX_PAYLOAD:
                return False
        if age != self.age or self.dynamic:
            self.age = age
            value = uint_value(age)
            self.tail = (
                self._etag_opt
                + self._cf_opt
                + encode_option(MAX_AGE - CONTENT_FORMAT, value)
                + b"\xff"
                + self._payload
            )
            self.vtail = self._etag_opt + encode_option(MAX_AGE - ETAG, value)
        self.until = self.hold_until(age, now, self.dynamic)
        return True
