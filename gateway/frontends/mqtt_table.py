"""The device link's table of pre-encoded answers (gateway/frontends/mqtt_link.py serves from it).

A request the table can serve is a deterministic-CBOR resolve request whose token (key 1) comes first
(:func:`request_key`); the bytes after the token are the table's key. Only requests the slow path decoded and
answered are put in (:meth:`AnswerTable.learn`), so equal bytes mean an equal, valid request. An entry holds the
answer's bytes before and after the token; its ``ttl`` counts down: the entry is re-rendered when the whole-second
value changes (at most once a second per entry), not per request.

The table stays equal to the resolver through :class:`gateway.frontends.hotpath.CacheGuard` (expiry, the cache
still holding the same entry, the local zone, the prefetch hand-over), exactly as the CoAP fast path's. The
answers are the slow path's own (:func:`gateway.frontends.mqtt_answers.answer_fields`), with ``source`` cache.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from gateway.frontends.hotpath import CacheGuard, HotEntry
from gateway.frontends.mqtt_answers import answer_fields, reply_name
from gateway.resolution import Answer, AnswerCache, CachedAnswer, ResolutionNote
from proto import devicemsg
from proto.records import TTL_ABSOLUTE

__all__ = ["AnswerTable", "request_key", "MAX_ENTRIES"]

MAX_ENTRIES = 20_000  # entries in the table; when full it is emptied (and refilled by the slow path)


def request_key(payload: bytes) -> tuple[bytes, bytes] | None:
    """(key, token item) of a request payload the table can serve: a CBOR map whose first item is the token (key 1,
    1-8 bytes), as deterministic CBOR puts it; the key is everything after the token, the token item its CBOR
    bytes. None for any other payload."""
    if (
        len(payload) < 4
        or not 0xA2 <= payload[0] <= 0xA5
        or payload[1] != 0x01
        or not 0x41 <= payload[2] <= 0x48
    ):
        return None
    end = 3 + (payload[2] & 0x1F)
    if len(payload) <= end:
        return None
    return payload[end:], payload[2:end]


class _Entry(HotEntry):
    """A cached answer: the bytes before and after the token, and until when they are right."""

    __slots__ = ("key", "req_head", "etag", "dynamic", "age", "until", "code", "head", "tail")

    def __init__(
        self,
        key: bytes,
        req_head: int,
        answer: Answer,
        etag: bytes | None,
        refresh_at: float,
        ref: CachedAnswer | None,
    ) -> None:
        super().__init__(answer, refresh_at, ref)
        self.key = key
        self.req_head = req_head  # the request's CBOR map header (its item count)
        self.etag = etag  # the request's ETag (None: it sent none)
        assert answer.record is not None
        self.dynamic = any(
            v.ttl_type == TTL_ABSOLUTE for v in answer.record.values
        )  # absolute TTLs count down
        self.age = -1
        self.until = -math.inf
        self.code = devicemsg.OK  # or devicemsg.NOT_MODIFIED (the request's ETag is the answer's)
        self.head = b""  # map header and the token's key
        self.tail = b""  # everything after the token

    def render(self, now: float) -> bool:
        """Encode the answer for ``now``; False when it no longer fits in one answer."""
        age = int(self.expires - now)
        if age != self.age or self.dynamic:
            fields = answer_fields(b"\x00", self.answer, self.etag, now)
            try:
                payload = devicemsg.encode(reply_name(fields["code"]), fields)
            except devicemsg.WireError:
                return False
            if len(payload) > devicemsg.MAX_PAYLOAD or payload[1:4] != b"\x01\x41\x00":
                return False
            self.head, self.tail, self.age, self.code = payload[:2], payload[4:], age, fields["code"]
        self.until = self.hold_until(age, now, self.dynamic)
        return True


class AnswerTable:
    """Pre-encoded answers by request key (module doc), kept equal to the resolver by a CacheGuard; ``clock``
    gives the time an answer is learned at; ``learning`` false leaves the table empty."""

    def __init__(
        self,
        answers: AnswerCache | None = None,
        *,
        note: ResolutionNote | None = None,
        clock: Callable[[], float] = time.time,
        learning: bool = True,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.guard = CacheGuard(answers, frontend="mqtt", note=note)
        self.entries: dict[bytes, _Entry] = {}
        self.clock = clock
        self.learning = learning
        self.max_entries = max_entries
        self.learned = 0

    def learn(
        self,
        payload: bytes,
        answer: Answer,
        types: tuple[str, ...],
        indexes: tuple[int, ...],
        etag: bytes | None,
    ) -> bool:
        """Remember the answer the slow path gave to the request ``payload`` when the table may serve it from now
        on (``etag``: the request's, None when it sent none)."""
        split = request_key(payload) if self.learning else None
        if split is None:
            return False
        key = split[0]
        now = self.clock()
        admitted = self.guard.admit(answer, types, indexes, now, self.entries.get(key))
        if admitted is None:
            return False
        ref, refresh_at = admitted
        cached = dataclasses.replace(
            answer, source=devicemsg.SOURCE_CACHE
        )  # what the resolver says for a hit
        entry = _Entry(key, payload[0], cached, etag, refresh_at, ref)
        if not entry.render(now):
            return False
        if key not in self.entries and len(self.entries) >= self.max_entries:
            self.entries.clear()  # rare (more hot keys than entries); the slow path refills what is asked
        self.entries[key] = entry
        self.learned += 1
        return True

    def refresh(self, entry: _Entry, now: float) -> bool:
        """Bring ``entry`` up to ``now``; False when the slow path must answer instead."""
        return self.guard.refresh(entry, now, self.forget)

    def forget(self, entry: _Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
