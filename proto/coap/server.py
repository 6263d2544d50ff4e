"""The server side of the CoAP message layer (RFC 7252 sections 4 and 5.2), sans-I/O: one :class:`Server` per
socket answers requests from any number of peers, identified by an address the caller chooses (hashable).

The verbs, as in h11 -- no socket, no clock (``now`` is a parameter, in seconds):

    ev = server.receive(datagram, addr, now)         a datagram in -> one event out
    out = server.answer(request, code, tail)         answer now: a piggybacked ACK (CON) or a NON
    d = server.defer(request, now, route)            answer later (an empty ACK goes out after EMPTY_ACK_DELAY)
    out = server.respond(d, code, tail, now)         the later answer: piggybacked, or a separate CON response
    server.delegate(request)                         another layer answers it (and de-duplicates its own)
    for datagram, route in server.timeouts(now): ... empty ACKs due, separate responses sent again
    server.next_timeout()                            when ``timeouts`` has work next (None: nothing pending)

``tail`` is everything after the token: the options and the payload (:func:`proto.coap.message.encode_body`).
``route`` is handed back with the datagrams ``timeouts`` produces (the caller's way to reach the peer; the
address by default).

De-duplication (section 4.5) by (address, Message ID) of confirmable requests: a duplicate gets
:class:`Duplicate` with what was sent the first time (the same bytes again), :data:`PENDING` while its answer
is being prepared (it is ignored, as the first one will be answered), or :data:`DELEGATED` when another layer
took the original. A NON being answered later is remembered as :data:`PENDING` too, so that its duplicate is
not answered twice. The memory is two generations of at most ``generation`` exchanges each, the older dropped
when the newer fills up or is ``lifetime`` / 2 old (:meth:`rotate`): under a flood it remembers less than
EXCHANGE_LIFETIME, which section 4.5 allows for idempotent requests. Code that answers per datagram without
building events uses the same memory through :meth:`seen` and :meth:`remember`, or, where a method call per
datagram counts, through the two dicts themselves: look a key up in :attr:`Server.current`, then in
:attr:`Server.previous`, store in ``current`` (both are replaced by :meth:`rotate`, so hold them only between
two rotations).

A separate CON response is sent again as ``timing`` says (:class:`proto.coap.numbers.Timing`: ACK_TIMEOUT x
uniform(1, 1.5), doubling, at most MAX_RETRANSMIT times), until the peer's empty ACK or RST (:class:`Acknowledged`). Separate responses to one peer
are not serialised (NSTART limits clients).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from proto.coap.message import empty, heads
from proto.coap.numbers import ACK, CON, EMPTY_ACK_DELAY, EXCHANGE_LIFETIME, NON, RST, TIMING, Timing

__all__ = [
    "Server",
    "Received",
    "Request",
    "Duplicate",
    "Acknowledged",
    "Other",
    "Deferred",
    "PENDING",
    "DELEGATED",
    "DEDUP_GENERATION",
]

DEDUP_GENERATION = 8192  # exchanges remembered per generation (two generations)
PENDING = b"\x00"  # remembered for a request whose answer is being prepared
DELEGATED = b""  # remembered for a request another layer answers


@dataclass(slots=True)
class Received:
    """What an event about a datagram from a peer carries: the datagram and the peer's address."""

    datagram: bytes
    addr: Hashable


@dataclass(slots=True)
class Request(Received):
    """A request not seen before: answer, defer or delegate it."""

    mtype: int
    mid: int
    token: bytes

    @property
    def key(self) -> tuple[Hashable, int]:
        return (self.addr, self.mid)


@dataclass(slots=True)
class Duplicate(Received):
    """A request seen before; ``answer`` is what went out (send it again), :data:`PENDING` or :data:`DELEGATED`."""

    answer: bytes


@dataclass(slots=True)
class Other(Received):
    """Not for this layer: a response, an Empty message that acknowledges nothing of ours, a ping, a datagram
    that is not CoAP version 1."""


@dataclass(slots=True)
class Acknowledged:
    """The peer acknowledged (or, ``reset``, rejected) one of our separate responses."""

    addr: Hashable
    mid: int
    reset: bool


Event = Request | Duplicate | Acknowledged | Other


class Deferred:
    """A request whose answer comes later (:meth:`Server.defer`)."""

    __slots__ = ("key", "route", "mtype", "token", "due", "acked")

    def __init__(self, request: Request, route: Any, due: float) -> None:
        self.key = request.key
        self.route = route
        self.mtype = request.mtype
        self.token = request.token
        self.due = due  # when the empty ACK goes out (a CON not answered by then)
        self.acked = False  # the empty ACK went out: the answer is a separate response


class _Separate:
    __slots__ = ("datagram", "route", "timeout", "deadline", "retransmissions")

    def __init__(self, datagram: bytes, route: Any, timeout: float, now: float) -> None:
        self.datagram = datagram
        self.route = route
        self.timeout = timeout
        self.deadline = now + timeout
        self.retransmissions = 0


class Server:
    """The message layer of one server socket (module doc)."""

    def __init__(
        self,
        *,
        mid: int | None = None,
        rng: random.Random | None = None,
        generation: int = DEDUP_GENERATION,
        lifetime: float = EXCHANGE_LIFETIME,
        empty_ack_delay: float = EMPTY_ACK_DELAY,
        timing: Timing = TIMING,
        now: float = 0.0,
    ) -> None:
        self.rng = rng or random.Random()
        self._mid = self.rng.randrange(0x10000) if mid is None else mid & 0xFFFF
        self.generation = generation
        self.lifetime = lifetime
        self.empty_ack_delay = empty_ack_delay
        self.timing = timing
        self.current: dict[Any, bytes] = {}
        self.previous: dict[Any, bytes] = {}
        self._since = now
        self._waiting: dict[Any, Deferred] = {}  # deferred CONs whose empty ACK has not gone yet
        # separate CON responses not acknowledged yet, by (addr, their Message ID)
        self._separate: dict[Any, _Separate] = {}
        self._due = math.inf
        self.given_up = 0  # separate responses never acknowledged

    # -- de-duplication -------------------------------------------------------------------------------------
    def seen(self, key: Any) -> bytes | None:
        """What was remembered for ``key`` = (address, Message ID), None when it is new."""
        out = self.current.get(key)
        return self.previous.get(key) if out is None else out

    def remember(self, key: Any, answer: bytes) -> None:
        self.current[key] = answer

    def rotate(self, now: float) -> None:
        """Start a new generation when the current one is full or half an EXCHANGE_LIFETIME old."""
        if len(self.current) >= self.generation or now - self._since >= self.lifetime / 2:
            self.previous = self.current
            self.current = {}
            self._since = now

    def next_mid(self) -> int:
        """A Message ID of our own (NON answers, separate responses)."""
        self._mid = mid = (self._mid + 1) & 0xFFFF
        return mid

    # -- datagrams in ---------------------------------------------------------------------------------------
    def receive(self, datagram: bytes, addr: Hashable, now: float) -> Event:
        if len(datagram) < 4 or datagram[0] >> 6 != 1:
            return Other(datagram, addr)
        first = datagram[0]
        mtype = (first >> 4) & 3
        code = datagram[1]
        mid = datagram[2] << 8 | datagram[3]
        key = (addr, mid)
        if mtype >= ACK:
            if code == 0 and self._separate.pop(key, None) is not None:
                return Acknowledged(addr, mid, mtype == RST)
            return Other(datagram, addr)
        prev = self.seen(key)
        if prev is not None and (mtype == CON or prev is PENDING):
            return Duplicate(datagram, addr, prev)
        tkl = first & 0x0F
        if not 0x01 <= code < 0x20 or tkl > 8 or len(datagram) < 4 + tkl:
            return Other(datagram, addr)
        return Request(datagram, addr, mtype, mid, datagram[4 : 4 + tkl])

    # -- answers out ----------------------------------------------------------------------------------------
    def answer(self, request: Request, code: int, tail: bytes) -> bytes:
        """The answer to ``request`` now: piggybacked on the ACK of a CON (remembered for its duplicates), a NON
        of our own Message ID for a NON."""
        token = request.token
        if request.mtype == CON:
            out = heads(ACK, code)[len(token)] + request.datagram[2:4] + token + tail
            self.current[request.key] = out
            return out
        return heads(NON, code)[len(token)] + self.next_mid().to_bytes(2, "big") + token + tail

    def defer(self, request: Request, now: float, route: Any = None) -> Deferred:
        """``request`` is answered later (:meth:`respond`); meanwhile a duplicate is ignored, and a CON gets an
        empty ACK once ``empty_ack_delay`` has passed (:meth:`timeouts`)."""
        d = Deferred(request, request.addr if route is None else route, now + self.empty_ack_delay)
        self.current[d.key] = PENDING
        if request.mtype == CON:
            self._waiting[d.key] = d
            self._due = min(self._due, d.due)
        return d

    def respond(self, d: Deferred, code: int, tail: bytes, now: float) -> bytes:
        """The answer to a deferred request: piggybacked on the ACK while the empty ACK has not gone out (and
        remembered for duplicates), else a separate CON response sent again until acknowledged; a NON to a
        NON."""
        token = d.token
        if d.mtype != CON:
            return heads(NON, code)[len(token)] + self.next_mid().to_bytes(2, "big") + token + tail
        if not d.acked:
            self._waiting.pop(d.key, None)
            d.acked = True
            out = heads(ACK, code)[len(token)] + d.key[1].to_bytes(2, "big") + token + tail
            self.current[d.key] = out
            return out
        mid = self.next_mid()
        out = heads(CON, code)[len(token)] + mid.to_bytes(2, "big") + token + tail
        sep = _Separate(out, d.route, self.timing.first_timeout(self.rng), now)
        self._separate[(d.key[0], mid)] = sep
        self._due = min(self._due, sep.deadline)
        return out

    def delegate(self, request: Request) -> None:
        """Another layer answers ``request``: a duplicate of a CON is a :class:`Duplicate` of :data:`DELEGATED`."""
        if request.mtype == CON:
            self.current[request.key] = DELEGATED

    # -- the clock ------------------------------------------------------------------------------------------
    def timeouts(self, now: float) -> list[tuple[bytes, Any]]:
        """Datagrams due at ``now``: empty ACKs of deferred CONs, separate responses sent again."""
        out: list[tuple[bytes, Any]] = []
        if now < self._due:
            return out
        due = math.inf
        for key, d in list(self._waiting.items()):
            if d.due <= now:
                del self._waiting[key]
                d.acked = True
                ack = empty(ACK, key[1])
                self.current[key] = ack  # a duplicate gets the empty ACK again
                out.append((ack, d.route))
            else:
                due = min(due, d.due)
        for key, sep in list(self._separate.items()):
            if sep.deadline > now:
                due = min(due, sep.deadline)
            elif sep.retransmissions >= self.timing.max_retransmit:
                del self._separate[key]
                self.given_up += 1
            else:
                sep.retransmissions += 1
                sep.timeout *= 2
                sep.deadline = now + sep.timeout
                due = min(due, sep.deadline)
                out.append((sep.datagram, sep.route))
        self._due = due
        return out

    def next_timeout(self) -> float | None:
        """No deadline falls before this (None: nothing waits)."""
        return self._due if self._waiting or self._separate else None
