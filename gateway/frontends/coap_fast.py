"""The CoAP fast path: cached resolutions answered from a table of pre-encoded responses, everything else handed to
aiocoap.

The socket (gateway/frontends/coap_socket.py) hands every datagram to the function :meth:`FastPath.begin` gives
for each wake-up, and:

1. a **hit**: a GET (CON or NON, CoAP version 1, token of 0-8 bytes) whose option bytes -- everything after the
   token, taken raw -- are a key of the table. Only requests the slow path validated and answered with a 2.05
   resolution were ever put in the table, so equal bytes mean an equal, valid request: ``/r/...`` with no options
   but Uri-Path, Uri-Query, Accept and Uri-Port. The answer is the entry's pre-encoded response: a piggybacked ACK
   (CON) or a NON (NON) with the request's token, the MID echoed (ACK) or a new one (NON), and the entry's options
   and payload. ``Max-Age`` counts down: the option is re-encoded when the whole-second value changes (at most
   once per second per entry), not per request.
2. a **revalidation**: the same with ETag options in front (ETag, option 4, is the smallest option number the
   fast path allows, so ETags come first): the key is the request without them (:func:`classify`). An ETag equal
   to the entry's gets 2.03 Valid with ETag and Max-Age; otherwise the full 2.05. The keys and the entries' bytes
   are gateway/frontends/coap_table.py's.
3. a **miss**: a GET the fast path could serve (case 1 or 2) with no fresh entry goes straight to the ``/r``
   resource (``miss``, block-wise included) without aiocoap's routing, pipes and message copies, and the answer
   goes out from here (the same bytes as aiocoap's message layer would send): piggybacked on the ACK of a CON, a
   NON of our own Message ID for a NON; when it takes longer than EMPTY_ACK_DELAY, an empty ACK and then a
   separate CON response, sent again until acknowledged. The request carries its key (``fast_key`` on the
   remote); when the answer is a fresh 2.05 resolution that fits in one datagram, :meth:`FastPath.learn` (called
   by the front end) stores the entry.
4. a **report** (``POST /d/<id>/rpt``, plain CBOR, what the firmware sends) goes straight to the registry's group
   commit and is answered after it (``gateway/frontends/coap_reports.py``), when the front end set
   :attr:`FastPath.reports` (not when OSCORE wraps the site).
5. anything else goes to aiocoap (the slow path, ``gateway/frontends/coap.py``) through the bridge
   (``gateway/frontends/coap_aiocoap.py``): POST/PUT, Observe, block-wise, ``/d/...``, ``/.well-known/core``,
   unknown or malformed options, payloads, other CoAP versions, empty messages, responses, RST.

The message layer of cases 1-3 is :class:`proto.coap.Server`: a CON whose (source, Message ID) was seen recently
gets the very same bytes again (RFC 7252 section 4.5), a duplicate of a request still being resolved is ignored,
and a duplicate of a CON aiocoap took goes to aiocoap again (it de-duplicates its own).

Staying equal to the resolver is :class:`gateway.frontends.hotpath.CacheGuard`'s job (shared with the MQTT fast
path): an entry expires with the resolver's answer, is checked against the resolver's cache and local zone every
time its Max-Age ticks (dropped within a second when refreshed, evicted or taken over by the zone), hands the first
hit of its prefetch window to the slow path, and never holds zone, stale or block-wise answers (bigger than
``MAX_PAYLOAD``). While the front end stops (:attr:`FastPath.serving` false) or the socket holds answers back,
every request goes to the slow path (5.03); a source-address rate limit (``[limits] source_rate``) is checked for
fast answers too, and a refused request goes to the slow path, which answers 4.29.

Counting: hits are integer counters (:attr:`FastPath.answered`, :attr:`FastPath.valid`), added to
``ida_requests_total{frontend="coap"}`` at scrape time by :meth:`FastPath.samples`, and added to the resolver
cache's hit counter once per wake-up -- never a per-request dict update. The status page's list of recent
resolutions (the front end's ``note`` hook) gets a fast hit at most once per entry
per second: when the entry's Max-Age ticks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiocoap

from gateway.frontends.coap_aiocoap import Bridge, body
from gateway.frontends.coap_reports import NOT_MINE, ReportPath
from gateway.frontends.coap_socket import CoapSocket
from gateway.frontends.coap_table import MAX_PAYLOAD, TableEntry, classify
from gateway.frontends.common import json_etag
from gateway.frontends.hotpath import CacheGuard, HotEntry
from gateway.metrics import Sample
from gateway.resolution import Answer, AnswerCache, ResolutionNote, etag_of
from proto import devicemsg
from proto.coap.message import heads
from proto.coap.numbers import ACK, CONTENT, GET, NON, POST, VALID
from proto.coap.server import DELEGATED, PENDING, Acknowledged, Deferred, Duplicate, Request, Server
from proto.records import TTL_ABSOLUTE

__all__ = ["FastPath", "MAX_ENTRIES"]

log = logging.getLogger(__name__)

MAX_ENTRIES = 20_000  # entries in the table; when full it is emptied (and refilled by the slow path)
_ACK_CONTENT = heads(ACK, CONTENT)  # first two header bytes by token length
_NON_CONTENT = heads(NON, CONTENT)


# -- the fast path -----------------------------------------------------------------------------------------
class FastPath:
    """Answers hits from the table and hands the rest to aiocoap (module doc); the socket's datagram handler.

    ``resolver`` is the front end's; ``answers`` the resolver's :class:`gateway.resolution.AnswerCache` (enables
    the cache checks, see hotpath.py) and ``note`` the status page's hook; ``bridge`` feeds aiocoap; ``sock``
    sends. ``clock`` is the front end's wall clock; ``limiter`` returns the front end's rate limiter (read once
    per wake-up: the service sets it after start). ``learning`` false keeps the table empty (every request goes
    to aiocoap, e.g. when OSCORE wraps the site). ``miss`` renders ``GET /r/...`` as the ``/r`` resource does:
    with it, misses skip aiocoap's routing (the miss path)."""

    def __init__(
        self,
        resolver: Any,
        bridge: Bridge,
        sock: CoapSocket,
        *,
        clock: Callable[[], float] = time.time,
        limiter: Callable[[], Any] | None = None,
        learning: bool = True,
        miss: Callable[[aiocoap.Message], Awaitable[aiocoap.Message]] | None = None,
        max_entries: int = MAX_ENTRIES,
        prefetch_fraction: float | None = None,
        answers: AnswerCache | None = None,
        note: ResolutionNote | None = None,
    ) -> None:
        self.bridge = bridge
        self.sock = sock
        self.clock = clock
        self._limiter = limiter or (lambda: None)
        self.learning = learning
        self._miss = miss if learning else None
        self.max_entries = max_entries
        self.serving = True
        self.table: dict[bytes, TableEntry] = {}
        self.reports: ReportPath | None = None  # set by the front end: reports straight to the registry
        self._loop = asyncio.get_running_loop()
        self.server = Server(now=self._loop.time())
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._backlog = sock.backlog
        self.guard = CacheGuard(answers, frontend="coap", note=note, prefetch_fraction=prefetch_fraction)
        # per wake-up (begin)
        self._now = 0.0
        self._mono = 0.0
        self._serving = False
        self._limited: Callable[[Any], bool] | None = None
        self._hits_before = 0
        # counters (read by samples() and the tests)
        self.answered = 0  # 2.05 from the table
        self.valid = 0  # 2.03 from the table
        self.replayed = 0  # CON duplicates answered with the same bytes again (or ignored while pending)
        self.slow = 0  # datagrams handed to aiocoap
        self.misses = 0  # requests that took the miss path (reports: ReportPath's counters)
        self.learned = 0  # entries stored

    def close(self) -> None:
        self.serving = False
        for task in self._tasks:
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    # -- the socket's handler ------------------------------------------------------------------------------
    def begin(self) -> Callable[[bytes, Any, bytes | None], bytes | None]:
        """A wake-up starts: the function for each of its datagrams -- the answer to a hit, or None (the datagram
        went elsewhere: a duplicate, the miss path, aiocoap). What it reads is bound once per wake-up."""
        now = self._now = self.clock()
        self._mono = self._loop.time()
        serving = self._serving = self.serving
        limiter = self._limiter()
        limited = self._limited = (
            None if limiter is None or getattr(limiter, "source", None) is None else self._source_limited
        )
        self._hits_before = self.answered + self.valid
        table, backlog, refresh, other, next_mid = (
            self.table,
            self._backlog,
            self._refresh,
            self._other,
            self.server.next_mid,
        )
        seen_now, seen_old = self.server.current, self.server.previous  # until end() rotates them

        def datagram(data: bytes, addr: Any, pktinfo: bytes | None) -> bytes | None:
            if serving and not backlog and len(data) > 4 and data[1] == GET:
                b0 = data[0]
                tkl = b0 & 0x0F
                entry = table.get(data[4 + tkl :])
                if (
                    entry is not None
                    and tkl <= 8
                    and 0x40 <= b0 < 0x60  # version 1, CON or NON
                    and (now <= entry.until or refresh(entry, now))
                    and (limited is None or not limited(addr))
                ):
                    if b0 >> 4 == 5:  # NON: answered with a NON of our own Message ID
                        self.answered += 1
                        return (
                            _NON_CONTENT[tkl] + next_mid().to_bytes(2, "big") + data[4 : 4 + tkl] + entry.tail
                        )
                    key = (addr, data[2] << 8 | data[3])  # CON: de-duplicated, piggybacked on the ACK
                    out = seen_now.get(key)
                    if out is None:
                        out = seen_old.get(key)
                    if out is None:
                        out = seen_now[key] = _ACK_CONTENT[tkl] + data[2 : 4 + tkl] + entry.tail
                        self.answered += 1
                        return out
                    if out is DELEGATED:  # aiocoap took the original, it de-duplicates its own
                        self._to_slow(data, addr, pktinfo)
                        return None
                    self.replayed += 1
                    return None if out is PENDING else out  # pending: the original is on the miss path
            return other(data, addr, pktinfo)

        return datagram

    def end(self) -> None:
        """Once per wake-up: the hits into the cache's counter, the de-duplication memory's generations."""
        hits = self.answered + self.valid - self._hits_before
        if hits:
            self.guard.count_hits(hits)
        self.server.rotate(self._mono)

    def _other(self, data: bytes, addr: Any, pktinfo: bytes | None) -> bytes | None:
        """A datagram that is not a plain hit: a revalidation hit (answered here), a duplicate, a miss, or one for
        aiocoap."""
        ev = self.server.receive(data, addr, self._mono)
        if type(ev) is Duplicate:
            if ev.answer is DELEGATED:
                self._to_slow(data, addr, pktinfo)
                return None
            self.replayed += 1
            return None if ev.answer is PENDING else ev.answer
        if type(ev) is Acknowledged:  # one of our separate responses
            return None
        if type(ev) is not Request:
            self._to_slow(data, addr, pktinfo)
            return None
        if data[1] == POST and self.reports is not None and self._serving and not self._backlog:
            out = self.reports.take(ev, pktinfo, self._mono)
            if out is not NOT_MINE:
                if out is None:  # answered after the commit: the message layer may need an empty ACK first
                    self.arm()
                return out
        fast = classify(data) if self.learning else None
        if fast is not None and self._serving and not self._backlog:
            key, etags = fast
            entry = self.table.get(key)
            if (
                entry is not None
                and etags
                and (self._now <= entry.until or self._refresh(entry, self._now))
                and (self._limited is None or not self._limited(addr))
            ):
                if entry.etag in etags:
                    self.valid += 1
                    return self.server.answer(ev, VALID, entry.vtail)
                self.answered += 1
                return self.server.answer(ev, CONTENT, entry.tail)
            if self._miss is not None:
                self._start_miss(ev, pktinfo, key)
                return None
        self.server.delegate(ev)  # a duplicate goes to aiocoap, which de-duplicates its own
        self._to_slow(data, addr, pktinfo, None if fast is None else fast[0])
        return None

    def _source_limited(self, addr: Any) -> bool:
        limiter = self._limiter()
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return bool(limiter is not None and limiter.check(source=host).limited)

    def _to_slow(self, data: bytes, addr: Any, pktinfo: bytes | None, fast_key: bytes | None = None) -> None:
        self.slow += 1
        self.bridge.feed(data, addr, pktinfo, fast_key)

    def _refresh(self, entry: TableEntry, now: float) -> bool:
        """Bring ``entry`` up to ``now`` (Max-Age, payload); False when the slow path must answer instead."""
        return self.guard.refresh(entry, now, self._forget)

    def _forget(self, entry: HotEntry) -> None:
        assert isinstance(entry, TableEntry)
        if self.table.get(entry.key) is entry:
            del self.table[entry.key]

    # -- the miss path -------------------------------------------------------------------------------------
    def _start_miss(self, ev: Request, pktinfo: bytes | None, key: bytes) -> None:
        """A GET the fast path could serve but has no fresh entry for goes straight to the ``/r`` resource
        (``miss``), without aiocoap's routing; its answer goes out from here (module doc, case 3)."""
        self.misses += 1
        try:
            request = self.bridge.decode(ev.datagram, ev.addr, pktinfo, key)
        except Exception:  # classify() accepted it, so this would be a decoder difference: let aiocoap judge
            self.server.delegate(ev)
            self._to_slow(ev.datagram, ev.addr, pktinfo)
            return
        pending = self.server.defer(ev, self._mono, (ev.addr, pktinfo))
        self.arm()
        task = self._loop.create_task(self._answer_miss(request, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_miss(self, request: aiocoap.Message, pending: Deferred) -> None:
        assert self._miss is not None
        try:
            response = await self._miss(request)
        except Exception:
            log.exception("coap: answering a resolution failed")
            response = aiocoap.Message(code=aiocoap.INTERNAL_SERVER_ERROR)
        try:
            code, tail = body(response)
            out = self.server.respond(pending, code, tail, self._loop.time())
            addr, pktinfo = pending.route
            self.sock.send(out, addr, pktinfo)
            self.arm()
        except Exception:
            log.exception("coap: sending a resolution answer failed")

    def arm(self) -> None:
        """Wake up for the message layer's next deadline (an empty ACK, a separate response sent again); no
        wake-up when nothing waits (a miss answered in time)."""
        due = self.server.next_timeout()
        if due is not None and due >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if due is not None:
            self._timer_at = due
            self._timer = self._loop.call_at(due, self._timeouts)

    def _timeouts(self) -> None:
        self._timer, self._timer_at = None, math.inf
        for out, (addr, pktinfo) in self.server.timeouts(self._loop.time()):
            self.sock.send(out, addr, pktinfo)
        self.arm()

    # -- learning ------------------------------------------------------------------------------------------
    def learn(
        self,
        request: aiocoap.Message,
        answer: Answer,
        types: tuple[str, ...],
        indexes: tuple[int, ...],
        as_json: bool,
        response: aiocoap.Message | None = None,
    ) -> bool:
        """Remember the slow path's answer to ``request`` when the fast path may serve it from now on.

        ``response`` is what the slow path answers: a 2.05's payload is taken over (with ``source`` = cache)
        instead of being rendered again. The entry's options are encoded on its first hit, so a miss that is
        never asked again costs little here."""
        key = getattr(request.remote, "fast_key", None)
        if key is None or not self.learning:
            return False
        admitted = self.guard.admit(answer, types, indexes, self.clock(), self.table.get(key))
        if admitted is None:
            return False
        ref, refresh_at = admitted
        assert answer.record is not None
        etag = answer.etag or etag_of(answer.record, answer.code)
        if as_json:
            etag = json_etag(etag)
        dynamic = not as_json and any(v.ttl_type == TTL_ABSOLUTE for v in answer.record.values)
        payload: bytes | None = None
        if response is not None and response.code == aiocoap.CONTENT and not dynamic:
            payload = bytes(response.payload)
            if len(payload) > MAX_PAYLOAD:
                return False  # block-wise: aiocoap's
            if not as_json:  # the CBOR map ends with key 23 (source): say "cache", as the resolver would now
                source = bytes((0x17, answer.source))
                payload = (
                    payload[:-1] + bytes((devicemsg.SOURCE_CACHE,)) if payload.endswith(source) else None
                )
        entry = TableEntry(key, answer, as_json, etag, payload, refresh_at, ref, dynamic)
        if key not in self.table and len(self.table) >= self.max_entries:
            self.table.clear()  # rare (more hot keys than entries); the slow path refills what is asked
        self.table[key] = entry
        self.learned += 1
        return True

    # -- metrics -------------------------------------------------------------------------------------------
    def samples(self) -> Iterable[Sample]:
        """Counts to add to the front end's (a ``Metrics`` collector with ``add=True``)."""
        for code, n in ((devicemsg.OK, self.answered), (devicemsg.NOT_MODIFIED, self.valid)):
            yield "ida_requests_total", {"frontend": "coap", "code": str(code)}, float(n)
        if self.reports is not None:
            yield from self.reports.samples()

    def stats(self) -> dict[str, int]:
        counts = {k: getattr(self, k) for k in ("answered", "valid", "replayed", "slow", "misses", "learned")}
        return {
            "entries": len(self.table),
            **counts,
            "dropped": self.sock.dropped,
            "unparsable": self.bridge.unparsable,
            **(self.reports.stats() if self.reports is not None else {}),
        }
