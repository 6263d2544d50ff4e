"""The client side of the CoAP message layer (RFC 7252 sections 4 and 5.3), sans-I/O: one :class:`Client` per
source endpoint (one socket towards one server) keeps its Message IDs, tokens and the exchanges in flight.

The three verbs, as in h11 -- no socket, no clock (``now`` is a parameter, in seconds):

    ex = client.request(template, now, payload)      an exchange in -> ``ex.datagram`` to send
    ev = client.receive(datagram, now)               a datagram in -> one event out (``ev.reply``: bytes to send)
    again, gone = client.timeouts(now)               the clock: datagrams to send again, exchanges given up
    client.next_timeout()                            when ``timeouts`` has work next (None: nothing in flight)

Behaviour:

* the token is ``token_prefix`` + the 2-byte Message ID (one request per Message ID, so a token is unique for
  as long as its Message ID is, and an empty ACK or RST, which carries only the Message ID, finds its exchange
  by the same key);
* CON: sent again as ``timing`` says (:class:`proto.coap.numbers.Timing`: ACK_TIMEOUT x uniform(1, 1.5),
  doubling, at most MAX_RETRANSMIT times), the same datagram each time, then the exchange is given up. NON: never
  sent again, given up after the first timeout;
* every event has ``reply``: the bytes to send back (empty for none);
* a piggybacked answer (ACK with a code) matches by token and Message ID -> :class:`Response`; an empty ACK
  (matched by Message ID) stops the retransmissions -> :class:`Acknowledged`, and the separate answer (CON or
  NON, matched by token) is awaited for ``separate_timeout`` -> :class:`Response`, whose ``reply`` is the empty
  ACK of a CON answer; a RST -> :class:`Reset`;
* anything else -> :class:`Unexpected`: a late or unknown answer (a CON one is rejected: ``reply`` = RST), a
  ping or a request (CON: RST), a datagram that is not CoAP.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proto.coap.message import RequestTemplate, empty
from proto.coap.numbers import ACK, CON, MAX_TRANSMIT_WAIT, RST, TIMING, Timing

__all__ = ["Client", "Exchange", "Response", "Acknowledged", "Reset", "Unexpected", "Event"]


@dataclass(slots=True, eq=False)
class Exchange:
    """A request in flight. ``context`` is the caller's (what to do with the answer)."""

    token: bytes
    mid: int
    datagram: bytes
    confirmable: bool
    sent_at: float
    timeout: float  # the current one: doubles with each retransmission
    deadline: float  # the next retransmission, or giving up
    context: Any
    retransmissions: int = 0
    acknowledged: bool = False  # an empty ACK came: the answer comes separately

    def __repr__(self) -> str:
        return f"<Exchange mid={self.mid:#06x} token={self.token.hex()} sends={1 + self.retransmissions}>"


@dataclass(slots=True)
class Response:
    """The answer to ``exchange`` (``code`` its code byte, ``datagram`` all of it); send ``reply`` if not empty."""

    exchange: Exchange
    code: int
    datagram: bytes
    reply: bytes = b""


@dataclass(slots=True)
class Acknowledged:
    """An empty ACK: the server has the request; the answer comes separately. (``reply`` is always empty.)"""

    exchange: Exchange
    reply: bytes = b""


class Reset(Acknowledged):
    """The server rejected the request (RST). (``reply`` is always empty.)"""

    __slots__ = ()


@dataclass(slots=True)
class Unexpected:
    """A datagram that matches no exchange in flight; send ``reply`` if not empty."""

    datagram: bytes
    reply: bytes = b""


Event = Response | Acknowledged | Reset | Unexpected
_NOTHING: tuple[Sequence[bytes], Sequence[Exchange]] = ((), ())


class Client:
    """The exchanges of one source endpoint (module doc)."""

    def __init__(
        self,
        *,
        token_prefix: bytes = b"",
        mid: int | None = None,
        rng: random.Random | None = None,
        timing: Timing = TIMING,
        separate_timeout: float = MAX_TRANSMIT_WAIT,
    ) -> None:
        if len(token_prefix) > 6:
            raise ValueError("the token prefix is 0-6 bytes (the Message ID makes the last two)")
        self.rng = rng or random.Random()
        self.prefix = token_prefix
        self.token_len = len(token_prefix) + 2
        self.mid = self.rng.randrange(0x10000) if mid is None else mid & 0xFFFF  # the next one used
        self.used = 0  # Message IDs used so far
        self.timing = timing
        self.separate_timeout = separate_timeout
        self.exchanges: dict[bytes, Exchange] = {}  # by token (prefix + Message ID): every exchange in flight
        self._due = math.inf  # no deadline before this (a lower bound)
        # the first timeout when it is exact (no random factor), else 0: drawn per request
        self._fixed = timing.ack_timeout if timing.random_factor <= 1.0 else 0.0

    @property
    def in_flight(self) -> int:
        return len(self.exchanges)

    def request(
        self, template: RequestTemplate, now: float, payload: bytes = b"", context: Any = None
    ) -> Exchange:
        """Start an exchange; send ``exchange.datagram``."""
        if template.first & 0x0F != self.token_len:
            raise ValueError(f"the template's token length is not {self.token_len}")
        mid = self.mid
        self.mid = (mid + 1) & 0xFFFF
        self.used += 1
        token = self.prefix + mid.to_bytes(2, "big")
        datagram = template.datagram(mid, token, payload)
        timeout = self._fixed or self.timing.first_timeout(self.rng)
        deadline = now + timeout
        ex = Exchange(token, mid, datagram, template.first & 0x30 == 0, now, timeout, deadline, context)
        self.exchanges[token] = ex
        if deadline < self._due:
            self._due = deadline
        return ex

    def receive(self, datagram: bytes, now: float) -> Event:
        """What ``datagram`` means for the exchanges in flight (module doc)."""
        if len(datagram) < 4 or datagram[0] >> 6 != 1:
            return Unexpected(datagram)
        first = datagram[0]
        mtype = (first >> 4) & 3
        code = datagram[1]
        if code == 0:  # Empty: ACK or RST matched by Message ID (the token ends with it), or a ping
            if mtype == CON:
                return Unexpected(datagram, empty(RST, datagram[2] << 8 | datagram[3]))
            ex = self.exchanges.get(self.prefix + datagram[2:4])
            if ex is None or ex.acknowledged or mtype < ACK:
                return Unexpected(datagram)
            if mtype == RST:
                del self.exchanges[ex.token]
                return Reset(ex)
            ex.acknowledged = True
            ex.deadline = now + self.separate_timeout
            return Acknowledged(ex)
        tkl = first & 0x0F
        if code < 0x40 or tkl > 8:  # a request (or a reserved class), or no token to match
            return Unexpected(datagram, empty(RST, datagram[2] << 8 | datagram[3]) if mtype == CON else b"")
        ex = self.exchanges.get(datagram[4 : 4 + tkl])
        reply = b""
        if mtype == CON:
            reply = empty(ACK if ex is not None else RST, datagram[2] << 8 | datagram[3])
        if ex is None or mtype == RST or (mtype == ACK and datagram[2] << 8 | datagram[3] != ex.mid):
            return Unexpected(datagram, reply)
        del self.exchanges[ex.token]
        return Response(ex, code, datagram, reply)

    def timeouts(self, now: float) -> tuple[Sequence[bytes], Sequence[Exchange]]:
        """Datagrams to send again and exchanges given up at ``now``."""
        if now < self._due:
            return _NOTHING
        again: list[bytes] = []
        gone: list[Exchange] = []
        due = math.inf
        for ex in list(self.exchanges.values()):
            if ex.deadline > now:
                due = min(due, ex.deadline)
            elif ex.acknowledged or not ex.confirmable or ex.retransmissions >= self.timing.max_retransmit:
                del self.exchanges[ex.token]
                gone.append(ex)
            else:
                ex.retransmissions += 1
                ex.timeout *= 2
                ex.deadline = now + ex.timeout
                due = min(due, ex.deadline)
                again.append(ex.datagram)
        self._due = due
        return again, gone

    def next_timeout(self) -> float | None:
        """No deadline falls before this (None: nothing in flight)."""
        return self._due if self.exchanges else None

    def cancel(self, ex: Exchange) -> None:
        """Forget ``ex`` (no event will name it)."""
        if self.exchanges.get(ex.token) is ex:
            del self.exchanges[ex.token]
