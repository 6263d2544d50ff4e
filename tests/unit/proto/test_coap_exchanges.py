"""proto/coap/client.py and server.py, h11 style: exact bytes in and out with a virtual clock, then an in-memory
client <-> server pair over a link that loses datagrams, and a fuzz of both ``receive``s (nothing escapes)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.coap import Client, Message, Server, request_template
from proto.coap.client import Acknowledged, Reset, Response, Unexpected
from proto.coap.message import empty, encode_body
from proto.coap.numbers import ACK, CHANGED, CON, CONTENT, NON, POST, RST, VALID, Option, Timing
from proto.coap.server import DELEGATED, PENDING, Duplicate, Other, Request
from proto.coap.server import Acknowledged as Acked

GET_R = request_template(("r", "88.123.99", "PUMP-0001"), token_len=4)
BODY = encode_body([(Option.CONTENT_FORMAT, b"\x3c"), (Option.MAX_AGE, b"\x3c")], b"\xa1\x03\x01")
PEER = ("127.0.0.1", 40000)
EXACT = Timing(random_factor=1.0)  # no random factor: the schedule is exact


def client(**kw: Any) -> Client:
    return Client(token_prefix=b"tk", mid=0x1000, timing=EXACT, **kw)


# -- the client ----------------------------------------------------------------------------------------------
def test_request_bytes_and_piggybacked_answer() -> None:
    c = client()
    ex = c.request(GET_R, 0.0, context="mine")
    assert ex.datagram == GET_R.datagram(0x1000, b"tk\x10\x00") and ex.token == b"tk\x10\x00"
    assert ex.datagram[:8] == b"\x44\x01\x10\x00tk\x10\x00" and c.in_flight == 1 and c.used == 1
    answer = Message(ACK, CONTENT, 0x1000, b"tk\x10\x00", payload=b"x").encode()
    ev = c.receive(answer, 0.01)
    assert ev == Response(ex, CONTENT, answer, b"") and ex.context == "mine"
    assert c.in_flight == 0 and c.next_timeout() is None
    assert c.request(GET_R, 0.0).token == b"tk\x10\x01"  # the next Message ID, the next token


def test_retransmissions_double_then_give_up() -> None:
    c = client()
    ex = c.request(GET_R, 0.0)
    assert not any(c.timeouts(1.99)) and c.next_timeout() == 2.0
    sent = [t for t in (2.0, 6.0, 14.0, 30.0) if c.timeouts(t)[0] == [ex.datagram]]
    assert sent == [2.0, 6.0, 14.0, 30.0] and ex.retransmissions == 4  # 2, 4, 8, 16 s apart
    assert not any(c.timeouts(61.9))
    again, gone = c.timeouts(62.0)
    assert again == [] and gone == [ex] and c.in_flight == 0


def test_random_factor_spreads_the_first_timeout() -> None:
    c = Client(rng=random.Random(7))
    firsts = [c.request(request_template(("r",)), 0.0).timeout for _ in range(200)]
    assert all(2.0 <= t <= 3.0 for t in firsts) and max(firsts) - min(firsts) > 0.5


def test_non_is_given_up_after_the_first_timeout() -> None:
    c = client()
    ex = c.request(request_template(("r",), confirmable=False, token_len=4), 0.0)
    assert ex.datagram[0] == 0x54
    assert c.timeouts(2.0) == ([], [ex])


def test_empty_ack_then_separate_con_response_like_a_device() -> None:
    """Two reports: the first gets an empty ACK, the second a piggybacked 2.04; no more retransmissions after;
    the first's separate CON response is acknowledged with an empty ACK of its Message ID."""
    c = Client(token_prefix=b"\x00\x01", mid=0x2000, timing=EXACT, separate_timeout=30.0)
    report = request_template(("d", "x", "rpt"), code=POST, token_len=4)
    first, second = c.request(report, 0.0, b"R1"), c.request(report, 0.0, b"R2")
    assert first.datagram.endswith(b"\xffR1") and not any(c.timeouts(1.9))
    assert c.timeouts(2.1)[0] == [first.datagram, second.datagram]
    assert c.receive(empty(ACK, 0x2000), 2.2) == Acknowledged(first) and first.acknowledged
    ack2 = Message(ACK, CHANGED, 0x2001, second.token).encode()
    assert type(c.receive(ack2, 2.3)) is Response and c.in_flight == 1
    assert not any(c.timeouts(29.0))  # acknowledged: not sent again, still awaited
    sep = Message(CON, CHANGED, 0x0777, first.token, payload=b"ok").encode()
    assert c.receive(sep, 29.5) == Response(first, CHANGED, sep, b"\x60\x00\x07\x77")
    assert c.receive(sep, 29.6) == Unexpected(sep, b"\x70\x00\x07\x77")  # again: nobody waits, RST


def test_separate_answer_that_never_comes() -> None:
    c = client(separate_timeout=30.0)
    ex = c.request(GET_R, 0.0)
    c.receive(empty(ACK, ex.mid), 0.5)
    assert not any(c.timeouts(30.4)) and c.timeouts(30.5) == ([], [ex])


def test_reset_ping_request_late_and_junk() -> None:
    c = client()
    ex = c.request(GET_R, 0.0)
    assert c.receive(empty(RST, ex.mid), 0.1) == Reset(ex) and c.in_flight == 0
    assert c.receive(empty(CON, 0x55), 0.2) == Unexpected(empty(CON, 0x55), b"\x70\x00\x00\x55")  # ping
    req = Message(CON, 0x01, 0x66, b"x").encode()
    assert c.receive(req, 0.3) == Unexpected(req, b"\x70\x00\x00\x66")
    late = Message(ACK, CONTENT, ex.mid, ex.token).encode()
    assert c.receive(late, 0.4) == Unexpected(late, b"")
    ex2 = c.request(GET_R, 1.0)
    wrong_mid = Message(ACK, CONTENT, ex2.mid ^ 1, ex2.token).encode()
    assert type(c.receive(wrong_mid, 1.1)) is Unexpected and c.in_flight == 1
    for junk in (b"", b"\x40", b"\x80\x45\x00\x00", b"\x6f\x45\x00\x00"):
        assert type(c.receive(junk, 1.2)) is Unexpected
    with pytest.raises(ValueError):
        c.request(request_template(("r",), token_len=2), 1.3)  # the client's tokens are 4 bytes


# -- the server ----------------------------------------------------------------------------------------------
def server(**kw: Any) -> Server:
    return Server(mid=0x7000, timing=EXACT, **kw)


def test_answer_piggybacked_and_duplicates_get_the_same_bytes() -> None:
    s = server()
    req = Message(CON, 0x01, 0x1234, b"ab", ((11, b"r"),)).encode()
    ev = s.receive(req, PEER, 0.0)
    assert ev == Request(req, PEER, CON, 0x1234, b"ab")
    out = s.answer(ev, CONTENT, BODY)
    assert out == b"\x62\x45\x12\x34ab" + BODY
    assert s.receive(req, PEER, 1.0) == Duplicate(req, PEER, out)
    assert type(s.receive(req, ("127.0.0.1", 40001), 1.0)) is Request  # another source: a new exchange
    non = Message(NON, 0x01, 0x1234, b"n").encode()
    nev = s.receive(non, PEER, 1.0)
    assert type(nev) is Request and s.answer(nev, VALID, b"") == b"\x51\x43\x70\x01n"  # our Message ID


def test_deferred_answer_in_time_is_piggybacked() -> None:
    s = server()
    req = Message(CON, 0x01, 0x10, b"t").encode()
    ev = s.receive(req, PEER, 0.0)
    assert type(ev) is Request
    d = s.defer(ev, 0.0)
    assert s.receive(req, PEER, 0.05) == Duplicate(req, PEER, PENDING)
    out = s.respond(d, CONTENT, BODY, 0.08)
    assert out == b"\x61\x45\x00\x10t" + BODY and s.timeouts(0.2) == []
    assert s.receive(req, PEER, 1.0) == Duplicate(req, PEER, out)


def test_empty_ack_then_separate_response_sent_until_acknowledged() -> None:
    s = server()
    req = Message(CON, 0x01, 0x10, b"t").encode()
    d = s.defer(s.receive(req, PEER, 0.0), 0.0, route="via")  # type: ignore[arg-type]
    assert s.next_timeout() == 0.1 and s.timeouts(0.09) == []
    assert s.timeouts(0.1) == [(b"\x60\x00\x00\x10", "via")]
    assert s.receive(req, PEER, 0.2) == Duplicate(req, PEER, b"\x60\x00\x00\x10")  # the empty ACK again
    sep = s.respond(d, CONTENT, BODY, 1.0)
    assert sep == b"\x41\x45\x70\x01t" + BODY
    assert s.timeouts(2.9) == [] and s.timeouts(3.0) == [(sep, "via")]
    assert s.timeouts(7.0) == [(sep, "via")]
    assert s.receive(empty(ACK, 0x7001), PEER, 7.5) == Acked(PEER, 0x7001, False)
    assert s.timeouts(100.0) == [] and s.next_timeout() is None
    assert type(s.receive(empty(ACK, 0x7001), PEER, 8.0)) is Other  # acknowledges nothing any more


def test_separate_response_given_up_and_reset() -> None:
    s = server()
    d = s.defer(s.receive(Message(CON, 0x01, 1, b"a").encode(), PEER, 0.0), 0.0)  # type: ignore[arg-type]
    s.timeouts(0.1)
    sep = s.respond(d, CONTENT, b"", 0.0)
    sends = [t for t in (2.0, 6.0, 14.0, 30.0, 62.0) if s.timeouts(t)]
    assert sends == [2.0, 6.0, 14.0, 30.0] and s.given_up == 1 and sep[:2] == b"\x41\x45"
    d2 = s.defer(s.receive(Message(CON, 0x01, 2, b"b").encode(), PEER, 100.0), 100.0)  # type: ignore[arg-type]
    s.timeouts(100.1)
    s.respond(d2, CONTENT, b"", 100.2)
    assert s.receive(empty(RST, 0x7002), PEER, 100.3) == Acked(PEER, 0x7002, True)


def test_deferred_non_ignores_its_duplicate_and_answers_non() -> None:
    s = server()
    req = Message(NON, 0x01, 0x20, b"n").encode()
    d = s.defer(s.receive(req, PEER, 0.0), 0.0)  # type: ignore[arg-type]
    assert s.next_timeout() is None  # no empty ACK for a NON
    assert s.receive(req, PEER, 0.5) == Duplicate(req, PEER, PENDING)
    assert s.respond(d, CONTENT, b"", 1.0) == b"\x51\x45\x70\x01n"


def test_delegate_other_and_rotation() -> None:
    s = server(generation=2, lifetime=10.0)
    a = Message(CON, 0x02, 1, b"").encode()
    ev = s.receive(a, PEER, 0.0)
    assert type(ev) is Request
    s.delegate(ev)
    assert s.receive(a, PEER, 0.0) == Duplicate(a, PEER, DELEGATED)
    for other in (
        empty(CON, 5),  # a ping
        Message(CON, CONTENT, 6, b"x").encode(),  # a response
        empty(ACK, 7),  # acknowledges nothing of ours
        b"\x80\x01\x00\x09",  # version 2
        b"\x49\x01\x00\x09",  # token length 9
        b"\x40",
    ):
        assert type(s.receive(other, PEER, 0.0)) is Other, other
    s.remember((PEER, 2), b"two")
    s.rotate(1.0)  # the generation is full (2): a new one starts, the old one is still read
    assert s.seen((PEER, 1)) == DELEGATED and s.seen((PEER, 2)) == b"two"
    s.rotate(2.0)
    s.rotate(7.0)  # half a lifetime old
    assert s.seen((PEER, 1)) is None


# -- an in-memory pair ---------------------------------------------------------------------------------------
@dataclass
class Link:
    """Client <-> server over a virtual clock; ``drop(direction, datagram)`` loses a datagram."""

    client: Client
    server: Server
    handler: Callable[[Server, Request, float], bytes | None]
    drop: Callable[[str, bytes], bool] = lambda _d, _b: False
    now: float = 0.0
    events: list[Any] = field(default_factory=list)
    to_server: int = 0

    def up(self, datagram: bytes) -> None:
        self.to_server += 1
        if self.drop("up", datagram):
            return
        ev = self.server.receive(datagram, PEER, self.now)
        if type(ev) is Request:
            out = self.handler(self.server, ev, self.now)
        elif type(ev) is Duplicate:
            out = None if ev.answer in (PENDING, DELEGATED) else ev.answer
        else:
            out = None
        if out:
            self.down(out)

    def down(self, datagram: bytes) -> None:
        if self.drop("down", datagram):
            return
        ev = self.client.receive(datagram, self.now)
        self.events.append(ev)
        if ev.reply:
            self.up(ev.reply)

    def run_until(self, end: float, step: float = 0.05) -> None:
        while self.now < end:
            self.now = round(self.now + step, 6)
            for datagram in self.client.timeouts(self.now)[0]:
                self.up(datagram)
            for datagram, _route in self.server.timeouts(self.now):
                self.down(datagram)


def test_pair_lossy_link_retransmission_meets_deduplication() -> None:
    answered: list[int] = []

    def handler(s: Server, req: Request, now: float) -> bytes:
        answered.append(req.mid)
        return s.answer(req, CONTENT, BODY)

    lost = {"up": 1, "down": 1}  # the first request and the first answer are lost

    def drop(direction: str, _d: bytes) -> bool:
        lost[direction] -= 1
        return lost[direction] >= 0

    link = Link(client(), server(), handler, drop)
    ex = link.client.request(GET_R, 0.0)
    link.up(ex.datagram)
    link.run_until(10.0)
    assert answered == [ex.mid], "the server answered once; the retransmission got the same bytes"
    (ev,) = link.events
    assert type(ev) is Response and ev.exchange is ex and link.to_server == 3


def test_pair_slow_answer_separate_response_acknowledged() -> None:
    pending: list[Any] = []

    def handler(s: Server, req: Request, now: float) -> None:
        pending.append(s.defer(req, now))

    link = Link(client(separate_timeout=60.0), server(), handler)
    ex = link.client.request(GET_R, 0.0)
    link.up(ex.datagram)
    link.run_until(1.0)
    assert link.events == [Acknowledged(ex)] and not any(link.client.timeouts(5.0))
    link.down(link.server.respond(pending[0], CONTENT, BODY, link.now))
    assert type(link.events[-1]) is Response and link.client.in_flight == 0
    assert link.server.next_timeout() is None, "the client's empty ACK stopped the retransmissions"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_fuzz_receive_never_raises(data: bytes) -> None:
    c = client()
    c.request(GET_R, 0.0)
    c.receive(data, 0.1)
    c.timeouts(100.0)
    s = server()
    ev = s.receive(data, PEER, 0.0)
    if type(ev) is Request:
        s.defer(ev, 0.0)
        s.timeouts(1.0)
