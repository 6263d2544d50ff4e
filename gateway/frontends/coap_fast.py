"""The CoAP fast path: cached resolutions answered straight from the UDP socket, everything else handed to aiocoap.

The gateway owns the UDP socket (not aiocoap). On every wake-up of the event loop it reads every datagram queued
on the (non-blocking) socket, at most ``DRAIN_MAX``, and for each one:

1. a **hit**: a GET (CON or NON, CoAP version 1, token of 0-8 bytes) whose option bytes -- everything after the
   token, taken raw -- are a key of the table (:class:`FastPath`). Only requests the slow path validated and
   answered with a 2.05 resolution were ever put in the table, so equal bytes mean an equal, valid request:
   ``/r/...`` with no options but Uri-Path, Uri-Query, Accept and Uri-Port. The answer is the entry's pre-encoded
   response: a piggybacked ACK (CON) or a NON (NON) with the request's token, the MID echoed (ACK) or a new one
   (NON), and the entry's options and payload. ``Max-Age`` counts down: the option is re-encoded when the
   whole-second value changes (at most once per second per entry), not per request.
2. a **revalidation**: the same with ETag options in front (ETag, option 4, is the smallest option number the
   fast path allows, so ETags come first): the key is the request without them. An ETag equal to the entry's
   gets 2.03 Valid with ETag and Max-Age; otherwise the full 2.05.
3. a **miss**: a GET the fast path could serve (case 1 or 2) with no fresh entry goes straight to the ``/r``
   resource (``miss``, block-wise included) without aiocoap's routing, pipes and message copies, and the
   answer goes out from here as aiocoap's message layer would send it (the same bytes): piggybacked on the ACK
   of a CON, a NON of our own Message ID for a NON; when it takes longer than EMPTY_ACK_DELAY, an empty ACK
   and then a separate CON response through aiocoap, which retransmits it. De-duplication is the fast path's
   table (below): a duplicate while the request is resolved is ignored, later ones get the same ACK. The request
   carries its key (``fast_key`` on the remote); when the answer is a fresh 2.05 resolution that fits in one
   datagram, :meth:`FastPath.learn` (called by the front end) stores the entry.
4. anything else goes to aiocoap (the slow path, ``gateway/frontends/coap.py``), fed to it through
   :class:`_Interface`, an aiocoap message interface over the same socket: POST/PUT, Observe, block-wise,
   ``/d/...``, ``/.well-known/core``, unknown or malformed options, payloads, other CoAP versions, empty
   messages, responses, RST.

RFC 7252 behaviour kept on the fast path: the token is echoed; CON gets a piggybacked ACK with the request's
Message ID, NON gets a NON; a CON whose (source, Message ID) was seen recently gets the very same bytes again
(de-duplication, section 4.5), and a duplicate of a CON the slow path took goes to the slow path again (aiocoap
de-duplicates its own). The de-duplication memory is two generations of at most ``DEDUP_GENERATION`` exchanges
each, the older dropped when the newer fills up or is ``EXCHANGE_LIFETIME`` / 2 old: under a flood it remembers
less than EXCHANGE_LIFETIME, which section 4.5 allows for idempotent requests (the fast path only answers GETs).

Staying equal to the resolver (the checks live in ``gateway/frontends/hotpath.py``, shared with the MQTT fast path):

* an entry expires with the resolver's answer (its absolute expiry); after that the miss path asks again;
* when the resolver is a :class:`gateway.resolver.Resolver`, an entry is only stored when the answer is the one
  its cache holds, and every time the entry's Max-Age ticks (once per second while in use) it checks that the
  cache still holds that same entry and that the local zone does not have the handle: a refreshed, evicted or
  zone-overridden answer drops the entry within a second;
* prefetch: the first hit in the last ``prefetch_fraction`` of the entry's lifetime takes the miss path once,
  so the resolver starts its background refresh exactly as for a hit of its own;
* zone answers (the zone can change at any time) and stale answers are never stored; neither are answers
  bigger than ``MAX_PAYLOAD`` (block-wise stays aiocoap's);
* while the front end stops (:attr:`FastPath.serving` false) every request goes to the slow path (5.03);
* a source-address rate limit (``[limits] source_rate``) is checked for fast answers too; a refused request
  goes to the slow path, which answers 4.29.

Counting: hits are integer counters (:attr:`FastPath.answered`, :attr:`FastPath.valid`), added to
``ida_requests_total{frontend="coap"}`` at scrape time by :meth:`FastPath.samples`, and added to the resolver
cache's hit counter once per wake-up -- never a per-request dict update. The status page's list of recent
resolutions (when the resolver is a ``gateway.status`` recording wrapper) gets a fast hit at most once per entry
per second: when the entry's Max-Age ticks.

Sockets: a specific bind address is served with ``recvfrom`` / ``sendto``. A wildcard bind (``::``,
``0.0.0.0``) is served with ``recvmsg`` / ``sendmsg`` and the packet-info ancillary data, so that an answer leaves
from the address the request was sent to (as aiocoap's udp6 transport does). ``SO_REUSEPORT`` is set, as aiocoap
did, so several gateway processes can share the port. ICMP errors are not read (no ``IP_RECVERR``): a CON
notification to a peer that went away times out by retransmission instead of failing at once.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import json
import logging
import math
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiocoap
from aiocoap import interfaces
from aiocoap.message import Direction
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers import COAP_PORT
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.tokenmanager import TokenManager
from aiocoap.util import hostportjoin

from gateway.frontends.common import json_etag
from gateway.frontends.hotpath import CacheGuard, HotEntry
from gateway.metrics import Sample
from gateway.resolution import Answer, AnswerCache, CachedAnswer, ResolutionNote, etag_of
from proto import devicemsg
from proto.records import TTL_ABSOLUTE

__all__ = ["FastPath", "MAX_PAYLOAD", "DRAIN_MAX", "classify"]

log = logging.getLogger(__name__)

DRAIN_MAX = 256  # datagrams read per wake-up before other callbacks get their turn
RECV_SIZE = 65535  # never truncate a datagram (a truncated CoAP message would be misread)
ANC_SIZE = 128  # room for one in6_pktinfo control message
MAX_PAYLOAD = 1024  # larger answers go block-wise: aiocoap's (RFC 7959)
MAX_ENTRIES = 20_000  # entries in the table; when full it is emptied (and refilled by the slow path)
DEDUP_GENERATION = 8192  # CON exchanges remembered per generation (two generations)
EXCHANGE_LIFETIME = 247.0  # RFC 7252 section 4.8.2
RCVBUF = 1 << 20  # absorb bursts from many devices

# CoAP header bits (RFC 7252 section 3)
CON, NON, ACK = 0, 1, 2
GET = 0x01
CONTENT = 0x45  # 2.05
VALID = 0x43  # 2.03
OPT_ETAG, OPT_URI_PORT, OPT_URI_PATH, OPT_CONTENT_FORMAT, OPT_MAX_AGE, OPT_URI_QUERY, OPT_ACCEPT = (
    4,
    7,
    11,
    12,
    14,
    15,
    17,
)
FAST_OPTIONS = frozenset((OPT_ETAG, OPT_URI_PORT, OPT_URI_PATH, OPT_URI_QUERY, OPT_ACCEPT))
CF_CBOR, CF_JSON = 60, 50

# First two header bytes by token length: version 1, type, TKL; code.
_ACK_CONTENT = tuple(bytes((0x40 | ACK << 4 | tkl, CONTENT)) for tkl in range(9))
_ACK_VALID = tuple(bytes((0x40 | ACK << 4 | tkl, VALID)) for tkl in range(9))
_NON_CONTENT = tuple(bytes((0x40 | NON << 4 | tkl, CONTENT)) for tkl in range(9))
_NON_VALID = tuple(bytes((0x40 | NON << 4 | tkl, VALID)) for tkl in range(9))
_SLOW = b""  # de-duplication marker: this CON went to the slow path
_PENDING = (
    b"\x00"  # de-duplication marker: this CON is on the miss path, no answer yet (a duplicate is ignored)
)
_EMPTY_ACK_HEAD = bytes((0x40 | ACK << 4, 0))  # an empty ACK: version 1, ACK, no token, code 0.00

_URI_PATH = OptionNumber.URI_PATH
_WILDCARDS = ("", "::", "0.0.0.0", "::ffff:0.0.0.0")


# -- encoding ----------------------------------------------------------------------------------------------
def _uint(v: int) -> bytes:
    return v.to_bytes((v.bit_length() + 7) // 8, "big")


def _option(delta: int, value: bytes) -> bytes:
    """One option with a delta below 13 (every delta the fast path encodes)."""
    n = len(value)
    if n < 13:
        return bytes((delta << 4 | n,)) + value
    if n < 269:
        return bytes((delta << 4 | 13, n - 13)) + value
    return bytes((delta << 4 | 14,)) + (n - 269).to_bytes(2, "big") + value


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
    pos = start = 4 + tkl
    number = 0
    etags: list[bytes] = []
    first_other = -1  # offset of the first option that is not an ETag
    first_number = 0
    path = False  # the first Uri-Path was seen (and is "r")
    while pos < n:
        head = data[pos]
        if head == 0xFF:
            return None  # a GET with a payload: not ours
        delta, length = head >> 4, head & 0x0F
        here = pos
        pos += 1
        if delta == 13:
            if pos >= n:
                return None
            delta = data[pos] + 13
            pos += 1
        elif delta == 14:
            if pos + 1 >= n:
                return None
            delta = int.from_bytes(data[pos : pos + 2], "big") + 269
            pos += 2
        elif delta == 15:
            return None
        if length == 13:
            if pos >= n:
                return None
            length = data[pos] + 13
            pos += 1
        elif length == 14:
            if pos + 1 >= n:
                return None
            length = int.from_bytes(data[pos : pos + 2], "big") + 269
            pos += 2
        elif length == 15:
            return None
        number += delta
        if number not in FAST_OPTIONS or pos + length > n:
            return None
        if number == OPT_ETAG:
            if not 1 <= length <= 8:
                return None
            etags.append(data[pos : pos + length])
        else:
            if first_other < 0:
                if here != pos - 1:
                    return None  # Uri-Port or Uri-Path "r" comes first: a one-byte option header
                first_other, first_number = here, number
            if number == OPT_URI_PATH and not path:
                if data[pos : pos + length] != b"r":
                    return None  # the path must start with the "r" segment
                path = True
            elif (number == OPT_ACCEPT or number == OPT_URI_PORT) and length > 2:
                return None
        pos += length
    if not path:
        return None
    if not etags:
        return data[start:], ()
    # Re-encode the first option after the ETags with its delta from 0 instead of from ETag (4).
    return bytes((first_number << 4 | data[first_other] & 0x0F,)) + data[first_other + 1 :], tuple(etags)


def render_payload(answer: Answer, as_json: bool, now: float) -> bytes:
    """The payload of a 2.05 resolution as the slow path renders it, with ``source`` = cache."""
    assert answer.record is not None
    if as_json:
        return json.dumps(answer.record.to_rest(), ensure_ascii=False, separators=(",", ":")).encode()
    return devicemsg.encode_resolve_response(
        {
            "code": devicemsg.OK,
            "id": answer.handle,
            "values": answer.record.to_device_values(now),
            "source": devicemsg.SOURCE_CACHE,
        }
    )


# -- the table ---------------------------------------------------------------------------------------------
class _Entry(HotEntry):
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
        self._etag_opt = _option(OPT_ETAG, etag)
        self._cf_opt = _option(OPT_CONTENT_FORMAT - OPT_ETAG, _uint(CF_JSON if as_json else CF_CBOR))
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
            self._payload = render_payload(self.answer, self.as_json, now)
            if len(self._payload) > MAX_PAYLOAD:
                return False
        if age != self.age or self.dynamic:
            self.age = age
            value = _uint(age)
            self.tail = (
                self._etag_opt
                + self._cf_opt
                + _option(OPT_MAX_AGE - OPT_CONTENT_FORMAT, value)
                + b"\xff"
                + self._payload
            )
            self.vtail = self._etag_opt + _option(OPT_MAX_AGE - OPT_ETAG, value)
        until = self.hold_until(age, now, self.dynamic)
        self.until = until
        return True


# -- aiocoap glue ------------------------------------------------------------------------------------------
class _Remote(interfaces.EndpointAddress):
    """The peer of a datagram, as aiocoap sees it (the part of udp6's UDP6EndpointAddress the gateway uses).

    ``sockaddr`` is what ``recvfrom`` returned; ``pktinfo`` the request's destination (wildcard binds);
    ``fast_key`` the table key when the request is one the fast path may learn the answer of."""

    scheme = "coap"
    maximum_block_size_exp = 6  # 1024-byte blocks, as udp6

    def __init__(
        self,
        sockaddr: Any,
        interface: _Interface,
        pktinfo: bytes | None = None,
        fast_key: bytes | None = None,
    ) -> None:
        self.sockaddr = sockaddr
        self.pktinfo = pktinfo
        self.fast_key = fast_key
        self._interface = interface

    def __hash__(self) -> int:
        return hash(self.sockaddr[:2])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Remote) and self.sockaddr[:2] == other.sockaddr[:2]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.hostinfo}>"

    @property
    def interface(self) -> _Interface:
        return self._interface

    @property
    def hostinfo(self) -> str:
        host, port = self.sockaddr[0], self.sockaddr[1]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return str(hostportjoin(host, None if port == COAP_PORT else port))

    @property
    def hostinfo_local(self) -> str:
        host, port = self._interface.fast.address
        return str(hostportjoin(host, None if port == COAP_PORT else port))

    @property
    def uri_base(self) -> str:
        return "coap://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coap://" + self.hostinfo_local

    @property
    def is_multicast(self) -> bool:
        return False  # the socket joins no group: a datagram always came from a unicast peer

    @property
    def is_multicast_locally(self) -> bool:
        return False

    @property
    def blockwise_key(self) -> Any:
        return self.sockaddr[:2]


class _Interface(interfaces.MessageInterface):
    """aiocoap's message interface over the fast path's socket: aiocoap sends through it, and the fast path
    feeds it the datagrams it does not answer itself."""

    def __init__(self, fast: FastPath, mman: MessageManager) -> None:
        self.fast = fast
        self.mman = mman

    def send(self, message: aiocoap.Message) -> None:
        remote = message.remote
        self.fast.send(message.encode(), remote.sockaddr, remote.pktinfo)

    async def shutdown(self) -> None:
        self.fast.close()

    async def determine_remote(self, message: aiocoap.Message) -> None:
        return None  # server only: the gateway sends no requests of its own over CoAP

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, _Remote) and remote.interface is self


# -- the fast path -----------------------------------------------------------------------------------------
class _Miss:
    """A request on the miss path: where its answer goes and whether the empty ACK went out already."""

    __slots__ = ("dk", "addr", "pktinfo", "mid", "timer", "acked")

    def __init__(self, dk: Any, addr: Any, pktinfo: bytes | None, mid: int) -> None:
        self.dk = dk  # the de-duplication key of a CON; None for a NON
        self.addr = addr
        self.pktinfo = pktinfo
        self.mid = mid
        self.timer: asyncio.TimerHandle | None = None
        self.acked = False


class FastPath:
    """Owns the CoAP UDP socket, answers hits, hands the rest to aiocoap (module doc).

    ``resolver`` is the front end's; ``answers`` the resolver's :class:`gateway.resolution.AnswerCache` (enables
    the cache checks, see hotpath.py) and ``note`` the status page's hook; ``clock`` the front end's wall clock; ``limiter`` returns the front end's rate limiter (read once
    per wake-up: the service sets it after start). ``learning`` false keeps the table empty (every request
    goes to aiocoap, e.g. when OSCORE wraps the site). ``miss`` renders ``GET /r/...`` (the request's
    ``uri_path`` = the identifier's segments) as the ``/r`` resource does: with it, misses skip aiocoap's
    routing (the miss path)."""

    def __init__(
        self,
        resolver: Any,
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
        self.resolver = resolver
        self.clock = clock
        self._limiter = limiter or (lambda: None)
        self.learning = learning
        self._miss = miss if learning else None
        self._tasks: set[asyncio.Task[None]] = set()
        self.max_entries = max_entries
        self.serving = True
        self.table: dict[bytes, _Entry] = {}
        self._seen: dict[tuple[Any, int], bytes] = {}
        self._seen_old: dict[tuple[Any, int], bytes] = {}
        self._seen_since = time.monotonic()
        self._mid = random.randrange(0x10000)
        self._sock: socket.socket | None = None
        self._pktinfo = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._iface: _Interface | None = None
        self._backlog: collections.deque[tuple[bytes, Any, list[Any]]] = collections.deque()
        self.address: tuple[str, int] = ("", 0)
        self.guard = CacheGuard(answers, frontend="coap", note=note, prefetch_fraction=prefetch_fraction)
        # counters (read by samples() and the tests)
        self.answered = 0  # 2.05 from the table
        self.valid = 0  # 2.03 from the table
        self.replayed = 0  # CON duplicates answered with the same bytes again
        self.slow = 0  # datagrams handed to aiocoap
        self.misses = 0  # requests that took the miss path
        self.learned = 0  # entries stored
        self.dropped = 0  # answers the socket would not take
        self.unparsable = 0  # datagrams aiocoap could not decode either

    @property
    def prefetch_fraction(self) -> float:
        return self.guard.prefetch_fraction

    @prefetch_fraction.setter
    def prefetch_fraction(self, value: float) -> None:
        self.guard.prefetch_fraction = value

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(
        self, site: Any, host: str, port: int, *, reuse_port: bool = True, loggername: str = "coap-server"
    ) -> aiocoap.Context:
        """Bind ``host:port`` (port 0 = any) and return the aiocoap context serving ``site`` behind the fast
        path."""
        loop = asyncio.get_running_loop()
        sock, self._pktinfo = await _bind(loop, host, port, reuse_port)
        self._sock = sock
        self._loop = loop
        bound = sock.getsockname()
        self.address = (host, int(bound[1]))
        ctx = aiocoap.Context(loop=loop, serversite=site, loggername=loggername)
        tman = TokenManager(ctx)
        mman = MessageManager(tman)
        self._iface = _Interface(self, mman)
        mman.message_interface = self._iface
        tman.token_interface = mman
        ctx.request_interfaces.append(tman)
        loop.add_reader(sock.fileno(), self._readable)
        return ctx

    def close(self) -> None:
        self.serving = False
        for task in self._tasks:
            task.cancel()
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
                self._loop.remove_writer(sock.fileno())
            sock.close()
        self._backlog.clear()

    # -- sending -------------------------------------------------------------------------------------------
    def send(self, data: bytes, addr: Any, pktinfo: bytes | None = None) -> None:
        """Send one datagram; when the socket buffer is full, queue it until the socket is writable."""
        sock = self._sock
        if sock is None:
            return
        anc = _anc(pktinfo) if self._pktinfo and pktinfo else []
        if self._backlog:
            self._queue(data, addr, anc)
            return
        try:
            if anc:
                sock.sendmsg((data,), anc, 0, addr)
            else:
                sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._queue(data, addr, anc)
        except OSError as e:  # e.g. an unreachable peer address
            self.dropped += 1
            log.debug("coap send to %s failed: %s", addr, e)

    def _queue(self, data: bytes, addr: Any, anc: list[Any]) -> None:
        if len(self._backlog) >= 4096:
            self.dropped += 1
            return
        self._backlog.append((data, addr, anc))
        if len(self._backlog) == 1 and self._loop is not None and self._sock is not None:
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        sock = self._sock
        while self._backlog and sock is not None:
            data, addr, anc = self._backlog[0]
            try:
                if anc:
                    sock.sendmsg((data,), anc, 0, addr)
                else:
                    sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped += 1
            self._backlog.popleft()
        if sock is not None and self._loop is not None:
            self._loop.remove_writer(sock.fileno())

    # -- receiving -----------------------------------------------------------------------------------------
    def _readable(self) -> None:
        """Read every queued datagram (at most DRAIN_MAX): answer hits, hand the rest to aiocoap."""
        sock = self._sock
        if sock is None:
            return
        pk = self._pktinfo
        recvfrom = sock.recvfrom
        recvmsg = sock.recvmsg
        sendto = sock.sendto
        table = self.table
        seen = self._seen
        seen_old = self._seen_old
        now = self.clock()
        serving = self.serving and not self._backlog
        limiter = self._limiter()
        limited = (
            None if limiter is None or getattr(limiter, "source", None) is None else self._source_limited
        )
        answered = valid = replayed = 0
        anc: list[Any] = []
        pktinfo: bytes | None = None
        try:
            for _ in range(DRAIN_MAX):
                try:
                    if pk:
                        data, cmsgs, _flags, addr = recvmsg(RECV_SIZE, ANC_SIZE)
                        pktinfo = cmsgs[0][2] if cmsgs else None
                        anc = _anc(pktinfo) if pktinfo else []
                    else:
                        data, addr = recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.EBADF, errno.ENOTSOCK):
                        return
                    continue  # an error queued on the socket: the next read gets the next datagram
                if serving and len(data) > 4 and data[1] == GET:
                    b0 = data[0]
                    tkl = b0 & 0x0F
                    entry = table.get(data[4 + tkl :])
                    if entry is not None:
                        if tkl > 8 or not 0x40 <= b0 < 0x60:  # version 1, CON or NON
                            entry = None
                        elif now > entry.until and not self._refresh(entry, now):
                            entry = None
                        elif limited is not None and limited(addr):
                            entry = None
                    if entry is not None:
                        if b0 >> 4 == 4:  # CON: de-duplicate, piggyback on the ACK
                            dk = (addr, data[2] << 8 | data[3])
                            out = seen.get(dk)
                            if out is None:
                                out = seen_old.get(dk)
                            if out is None:
                                out = _ACK_CONTENT[tkl] + data[2 : 4 + tkl] + entry.tail
                                seen[dk] = out
                                answered += 1
                            elif not out:  # _SLOW: aiocoap took the original, it de-duplicates its own
                                self._to_slow(data, addr, pktinfo)
                                continue
                            elif out is _PENDING:  # the original is on the miss path: its answer comes
                                replayed += 1
                                continue
                            else:
                                replayed += 1
                        else:  # NON: answered with a NON of our own Message ID
                            mid = self._mid = (self._mid + 1) & 0xFFFF
                            out = _NON_CONTENT[tkl] + mid.to_bytes(2, "big") + data[4 : 4 + tkl] + entry.tail
                            answered += 1
                        try:
                            if pk:
                                sock.sendmsg((out,), anc, 0, addr)
                            else:
                                sendto(out, addr)
                        except (BlockingIOError, InterruptedError):
                            self._queue(out, addr, anc)
                            serving = False  # the socket is full: the rest of this batch waits in order
                        except OSError:
                            self.dropped += 1
                        continue
                res = self._other(data, addr, pktinfo, anc, now, serving, limited)
                if res == 1:
                    answered += 1
                elif res == 2:
                    valid += 1
                elif res == 3:
                    replayed += 1
        finally:  # counted once per wake-up, also when a datagram's handling raised
            if answered or valid:
                self.answered += answered
                self.valid += valid
                self.guard.count_hits(answered + valid)
            self.replayed += replayed
            if len(seen) >= DEDUP_GENERATION or time.monotonic() - self._seen_since >= EXCHANGE_LIFETIME / 2:
                self._seen_old = seen
                self._seen = {}
                self._seen_since = time.monotonic()

    def _source_limited(self, addr: Any) -> bool:
        limiter = self._limiter()
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return bool(limiter is not None and limiter.check(source=host).limited)

    def _other(
        self,
        data: bytes,
        addr: Any,
        pktinfo: bytes | None,
        anc: list[Any],
        now: float,
        serving: bool,
        limited: Callable[[Any], bool] | None,
    ) -> int:
        """A datagram that is not a plain hit: a revalidation hit (answered here), a CON duplicate, or one for
        aiocoap. Returns 1 (2.05 answered), 2 (2.03 answered), 3 (duplicate replayed) or 0 (handed on)."""
        fast = classify(data) if self.learning else None
        con = len(data) >= 4 and data[0] >> 4 == 4  # version 1, CON
        dk = (addr, data[2] << 8 | data[3]) if con else None
        if dk is not None:
            prev = self._seen.get(dk)
            if prev is None:
                prev = self._seen_old.get(dk)
            if prev is not None:
                if not prev:  # _SLOW: aiocoap answered the original, it de-duplicates its own
                    self._to_slow(data, addr, pktinfo)
                    return 0
                if prev is _PENDING:  # the original is on the miss path: ignored, as aiocoap ignores one
                    return 3
                self.send(prev, addr, pktinfo)
                return 3
        if fast is not None and serving:
            key, etags = fast
            entry = self.table.get(key)
            if (
                entry is not None
                and etags
                and (now <= entry.until or self._refresh(entry, now))
                and (limited is None or not limited(addr))
            ):
                tkl = data[0] & 0x0F
                hit = entry.etag in etags
                if con:
                    head = (_ACK_VALID if hit else _ACK_CONTENT)[tkl] + data[2:4]
                else:
                    self._mid = (self._mid + 1) & 0xFFFF
                    head = (_NON_VALID if hit else _NON_CONTENT)[tkl] + self._mid.to_bytes(2, "big")
                out = head + data[4 : 4 + tkl] + (entry.vtail if hit else entry.tail)
                if dk is not None:
                    self._seen[dk] = out
                self.send(out, addr, pktinfo)
                return 2 if hit else 1
        if fast is not None and serving and self._miss is not None:
            if not con:  # a NON on the miss path: a duplicate of it is ignored (as aiocoap ignores one)
                ndk = (addr, data[2] << 8 | data[3])
                if self._seen.get(ndk) is _PENDING or self._seen_old.get(ndk) is _PENDING:
                    return 3
                self._seen[ndk] = _PENDING
            self._start_miss(data, addr, pktinfo, fast[0], dk)
        else:
            if dk is not None:
                self._seen[dk] = _SLOW  # a duplicate goes to aiocoap, which de-duplicates its own
            self._to_slow(data, addr, pktinfo, None if fast is None else fast[0])
        return 0

    def _start_miss(self, data: bytes, addr: Any, pktinfo: bytes | None, key: bytes, dk: Any) -> None:
        """The miss path: a GET the fast path could serve but has no fresh entry for goes straight to the ``/r``
        resource (``miss``), without aiocoap's routing, pipes and copies, and its answer goes out from here as
        aiocoap's message layer would send it: piggybacked on the ACK (CON) or as a NON of our own Message ID
        (NON); when the answer takes longer than EMPTY_ACK_DELAY, an empty ACK now and the answer later as a
        separate CON response through aiocoap (which retransmits it until acknowledged). A duplicate of the
        CON while it is being resolved is ignored (as aiocoap ignores one); afterwards it gets the same ACK
        again (``dk``, the de-duplication key, holds the bytes sent)."""
        iface = self._iface
        loop = self._loop
        if iface is None or loop is None:
            return
        self.misses += 1
        remote = _Remote(addr, iface, pktinfo, key)
        try:
            request = aiocoap.Message.decode(data, remote)
        except Exception:  # classify() accepted it, so this would be a decoder difference: let aiocoap judge
            if dk is not None:
                self._seen[dk] = _SLOW
            self._to_slow(data, addr, pktinfo)
            return
        request.direction = Direction.INCOMING
        miss = _Miss(dk, addr, pktinfo, request.mid)
        if dk is not None:
            self._seen[dk] = _PENDING
            miss.timer = loop.call_later(request.transport_tuning.EMPTY_ACK_DELAY, self._empty_ack, miss)
        options = request.opt._options  # what aiocoap's Site hands the /r resource: the path after "r"
        path = options[_URI_PATH]
        del path[0]
        if not path:
            del options[_URI_PATH]
        task = loop.create_task(self._answer_miss(request, miss))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _empty_ack(self, miss: _Miss) -> None:
        if miss.acked or self._sock is None:
            return
        miss.acked = True
        out = _EMPTY_ACK_HEAD + miss.mid.to_bytes(2, "big")
        self._seen[miss.dk] = out  # a duplicate gets the empty ACK again
        self.send(out, miss.addr, miss.pktinfo)

    async def _answer_miss(self, request: aiocoap.Message, miss: _Miss) -> None:
        assert self._miss is not None
        try:
            response = await self._miss(request)
        except Exception:
            log.exception("coap: answering a resolution failed")
            response = aiocoap.Message(code=aiocoap.INTERNAL_SERVER_ERROR)
        iface = self._iface
        if iface is None or self._sock is None:
            return
        response.token = request.token
        try:
            if miss.dk is None or not miss.acked:
                if miss.dk is None:  # NON: answered with a NON of our own Message ID
                    self._mid = (self._mid + 1) & 0xFFFF
                    response.mtype, response.mid = aiocoap.NON, self._mid
                else:  # piggybacked on the ACK
                    if miss.timer is not None:
                        miss.timer.cancel()
                    miss.acked = True
                    response.mtype, response.mid = aiocoap.ACK, miss.mid
                out = response.encode()
                if miss.dk is not None:
                    self._seen[miss.dk] = out  # a duplicate gets the same bytes
                self.send(out, miss.addr, miss.pktinfo)
                return
            # the empty ACK went out: a separate CON response, retransmitted by aiocoap until acknowledged
            response.remote = request.remote.as_response_address()
            response.request = request
            iface.mman.send_message(response, _no_monitor)
        except Exception:
            log.exception("coap: sending a resolution answer failed")

    def _to_slow(self, data: bytes, addr: Any, pktinfo: bytes | None, fast_key: bytes | None = None) -> None:
        iface = self._iface
        if iface is None:
            return
        self.slow += 1
        remote = _Remote(addr, iface, pktinfo, fast_key)
        try:
            message = aiocoap.Message.decode(data, remote)
        except Exception:  # UnparsableMessage, and whatever else junk makes the decoder raise
            self.unparsable += 1
            log.debug("coap: ignoring an unparsable datagram from %s", remote.hostinfo)
            return
        message.direction = Direction.INCOMING
        try:
            iface.mman.dispatch_message(message)
        except Exception:  # never let one datagram stop the reader
            log.exception("coap: dispatching a datagram from %s failed", remote.hostinfo)

    def _refresh(self, entry: _Entry, now: float) -> bool:
        """Bring ``entry`` up to ``now`` (Max-Age, payload); False when the slow path must answer instead."""
        return self.guard.refresh(entry, now, self._forget)

    def _forget(self, entry: _Entry) -> None:
        if self.table.get(entry.key) is entry:
            del self.table[entry.key]

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
        entry = _Entry(key, answer, as_json, etag, payload, refresh_at, ref, dynamic)
        if key not in self.table and len(self.table) >= self.max_entries:
            self.table.clear()  # rare (more hot keys than entries); the slow path refills what is asked
        self.table[key] = entry
        self.learned += 1
        return True

    # -- metrics -------------------------------------------------------------------------------------------
    def samples(self) -> Iterable[Sample]:
        """Counts to add to the front end's (a ``Metrics`` collector with ``add=True``)."""
        yield "ida_requests_total", {"frontend": "coap", "code": str(devicemsg.OK)}, float(self.answered)
        yield (
            "ida_requests_total",
            {"frontend": "coap", "code": str(devicemsg.NOT_MODIFIED)},
            float(self.valid),
        )

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.table),
            "answered": self.answered,
            "valid": self.valid,
            "replayed": self.replayed,
            "slow": self.slow,
            "misses": self.misses,
            "learned": self.learned,
            "dropped": self.dropped,
            "unparsable": self.unparsable,
        }


def _no_monitor() -> None:
    """aiocoap's message-error callback for a separate CON answer the peer never acknowledged: nothing to stop."""


def _anc(pktinfo: bytes) -> list[tuple[int, int, bytes]]:
    return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]


async def _bind(
    loop: asyncio.AbstractEventLoop, host: str, port: int, reuse_port: bool
) -> tuple[socket.socket, bool]:
    """A non-blocking UDP socket bound to ``host:port``; True when it is a wildcard bind served with pktinfo."""
    wildcard = host in _WILDCARDS
    if wildcard:
        family = socket.AF_INET6
        addr: Any = ("::" if host in ("", "::") else "::ffff:0.0.0.0", port, 0, 0)
    else:
        try:
            ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            infos = await loop.getaddrinfo(host.strip("[]"), port, family=family, type=socket.SOCK_DGRAM)
        except ValueError:  # a name
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
        family, addr = infos[0][0], infos[0][4]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if wildcard:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        sock.setblocking(False)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, wildcard
