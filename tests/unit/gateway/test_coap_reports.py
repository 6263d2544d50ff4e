"""Reports taken off the CoAP socket (gateway/frontends/coap_reports.py): answered after the durable commit, the
same bytes as the slow path, permanent and transient refusals, de-duplication, and what is left to aiocoap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.errors import Overloaded
from gateway.frontends.coap import CoapFrontEnd
from gateway.frontends.coap_reports import report_parts
from gateway.metrics import Metrics
from gateway.ratelimit import Limits, RateLimiter
from gateway.registry import Registry
from proto import devicemsg
from proto.coap.message import Message
from tests.support.coapraw import ACK, CON, NON, OPT_CF, POST, RawClient, path_opts
from tests.support.gwhelpers import PUMP, FakeResolver, report_fields

OPT_URI_PORT, OPT_OSCORE = 7, 9
CHANGED, BAD_REQUEST, FORBIDDEN, TOO_MANY, UNAVAILABLE = 0x44, 0x80, 0x83, 0x9D, 0xA3


def report_request(
    mid: int,
    token: bytes,
    payload: bytes,
    *,
    ident: str = PUMP,
    mtype: int = CON,
    extra: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    opts = sorted([*path_opts(ident, "d"), (11, b"rpt"), (OPT_CF, b"\x3c"), *extra], key=lambda o: o[0])
    return Message(mtype, POST, mid, token, tuple(opts), payload).encode()


def report(ident: str = PUMP, boot: int = 1, seq: int = 1, **extra: Any) -> bytes:
    return devicemsg.encode("report", report_fields(ident, boot, seq, **extra))


@dataclass
class Env:
    fe: CoapFrontEnd
    registry: Any
    metrics: Metrics
    raw: RawClient

    @property
    def taken(self) -> int:
        assert self.fe.fast is not None and self.fe.fast.reports is not None
        return self.fe.fast.reports.taken


async def _env(registry: Any, **kw: Any) -> AsyncIterator[Env]:
    metrics = Metrics()
    fe = CoapFrontEnd("127.0.0.1", 0, FakeResolver(), registry, metrics, **kw)
    _host, port = await fe.start()
    raw = RawClient(port)
    try:
        yield Env(fe, registry, metrics, raw)
    finally:
        raw.close()
        await fe.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        async for e in _env(registry):
            yield e
    finally:
        registry.close()


class HeldRegistry:
    """A registry whose commits the test releases (or fails, or refuses as overloaded)."""

    def __init__(self, overloaded: int | None = None) -> None:
        self.overloaded = overloaded
        self.pending: list[tuple[str, devicemsg.Report, Callable[[bool | BaseException], None]]] = []

    def submit_report_then(
        self,
        ident: str,
        rep: devicemsg.Report,
        transport: str,
        peer: str | None,
        done: Callable[[bool | BaseException], None],
    ) -> None:
        if self.overloaded is not None:
            raise Overloaded(f"gateway busy: retry in {self.overloaded} s", self.overloaded)
        self.pending.append((ident, rep, done))

    def desired_cfgver(self, identifier: str) -> int | None:
        return 7

    def on_config_change(self, callback: Any) -> None:
        pass


def test_report_parts_takes_only_what_the_firmware_sends() -> None:
    body = report()
    segments, start = report_parts(report_request(1, b"t", body)) or ([], 0)
    assert segments == [b"88.123.99", b"PUMP-0001"]
    assert report_request(1, b"t", body)[start:] == body
    with_port = report_request(1, b"t", body, extra=((OPT_URI_PORT, b"\x16\x33"),))
    assert report_parts(with_port) is not None  # libcoap's client sends Uri-Port
    for extra in (((OPT_OSCORE, b"\x09"),), ((27, b"\x06"),), ((15, b"a=b"),)):
        assert report_parts(report_request(1, b"t", body, extra=extra)) is None  # OSCORE, Block1, a query
    json_cf = Message(
        CON, POST, 1, b"t", (*path_opts(PUMP, "d"), (11, b"rpt"), (OPT_CF, b"\x32")), body
    ).encode()
    assert report_parts(json_cf) is None
    no_payload = Message(CON, POST, 1, b"t", (*path_opts(PUMP, "d"), (11, b"rpt")), b"").encode()
    assert report_parts(no_payload) is None
    cfg = Message(CON, POST, 1, b"t", (*path_opts(PUMP, "d"), (11, b"cfg")), body).encode()
    assert report_parts(cfg) is None


async def test_a_report_is_stored_and_acked_from_the_socket(env: Env) -> None:
    reply = await env.raw.ask(report_request(0x1234, b"tk", report(seq=5)))
    assert (reply.mtype, reply.code, reply.mid, reply.token) == (ACK, CHANGED, 0x1234, b"tk")
    assert reply.opt(OPT_CF) == b"\x3c"
    assert reply.payload == devicemsg.encode("report_ack", {"boot": 1, "seq": 5, "code": devicemsg.OK})
    assert env.taken == 1 and env.fe.fast is not None and env.fe.fast.slow == 0  # aiocoap never saw it
    dev = env.registry.device(PUMP)
    assert (
        dev["last_report"]["seq"] == 5 and dev["transport"] == "coap" and dev["peer"].startswith("127.0.0.1:")
    )
    assert env.metrics.value("ida_requests_total", {"frontend": "coap", "code": "1"}) == 1


async def test_the_fast_answer_is_the_slow_answer(tmp_path: Path) -> None:
    """The same report through the socket path and through aiocoap (fast path off): the same bytes after the
    header, and a desired config's version in both."""
    answers = []
    for fast_path in (True, False):
        registry = Registry(tmp_path / f"r{fast_path}.sqlite3")
        registry.set_desired_config(PUMP, interval=60)
        try:
            async for e in _env(registry, fast_path=fast_path):
                for i, body in enumerate(
                    (report(seq=1), report(seq=1), b"\xa1\x02\x41x", report(PUMP + "X"))
                ):
                    answers.append(
                        (fast_path, i, (await e.raw.ask(report_request(10 + i, b"k", body))).raw[4:])
                    )
        finally:
            registry.close()
    fast = [a for f, _, a in answers if f]
    slow = [a for f, _, a in answers if not f]
    assert fast == slow
    assert cbor2.loads(fast[0].split(b"\xff", 1)[1]) == {3: 1, 10: 1, 11: 1, 20: 1}


async def test_the_ack_leaves_only_after_the_commit() -> None:
    held = HeldRegistry()
    async for e in _env(held):
        await e.raw.send(report_request(0x0101, b"h", report(seq=9)))
        empty = await e.raw.recv(timeout=2.0)  # the commit takes long: an empty ACK, no answer yet
        assert (empty.mtype, empty.code, empty.mid, empty.token) == (ACK, 0, 0x0101, b"")
        assert await e.raw.nothing(0.3)
        assert len(held.pending) == 1
        ident, rep, done = held.pending[0]
        assert (ident, rep.boot, rep.seq) == (PUMP, 1, 9)
        done(True)  # durable now
        sep = await e.raw.recv()
        assert (sep.mtype, sep.code, sep.token) == (CON, CHANGED, b"h")
        assert cbor2.loads(sep.payload) == {3: 1, 10: 1, 11: 9, 20: 7}
        await e.raw.send(Message(ACK, 0, sep.mid, b"", (), b"").encode())
        # a commit that fails: 5.00, nothing acknowledged (the device sends it again)
        await e.raw.send(report_request(0x0102, b"f", report(seq=10), mtype=NON))
        await asyncio.sleep(0.05)
        held.pending[1][2](OSError("disk"))
        failed = await e.raw.recv()
        assert (failed.mtype, failed.code >> 5) == (NON, 5)


async def test_overload_is_5_03_with_max_age_and_nothing_stored() -> None:
    async for e in _env(HeldRegistry(overloaded=4)):
        reply = await e.raw.ask(report_request(0x0201, b"o", report()))
        assert (reply.mtype, reply.code, reply.max_age) == (ACK, UNAVAILABLE, 4)
        assert cbor2.loads(reply.payload)[3] == devicemsg.UPSTREAM_UNAVAILABLE
        assert e.fe.fast is not None and e.fe.fast.reports is not None and e.fe.fast.reports.overloaded == 1


async def test_bad_reports_are_refused_alone_and_good_ones_stored(env: Env) -> None:
    """Issue 19's reproduction over CoAP: rounds of 20 valid reports and one with a byte string under a text key
    (16, board): every valid one is stored and acknowledged, the bad one gets a permanent 4.00."""
    mid = 0
    fields = report_fields("88.123.99/R020", 9, 1)
    bad = cbor2.dumps({**{devicemsg.KEYS[k]: v for k, v in fields.items()}, 16: b"\x00"})
    for rnd in range(5):
        for i in range(21):
            mid += 1
            ident = f"88.123.99/R{i:03d}"
            body = bad if i == 20 else report(ident, boot=1, seq=rnd + 1)
            await env.raw.send(report_request(mid, mid.to_bytes(2, "big"), body, ident=ident))
        replies = [await env.raw.recv() for _ in range(21)]
        codes = sorted(r.code for r in replies)
        assert codes == [CHANGED] * 20 + [BAD_REQUEST]
    stored = {d["id"]: d["reports_total"] for d in env.registry.devices()}
    assert all(stored[f"88.123.99/R{i:03d}"] == 5 for i in range(20))


async def test_duplicates_are_acked_and_stored_once(env: Env) -> None:
    first = await env.raw.ask(report_request(1, b"a", report(seq=3)))
    again = await env.raw.ask(report_request(2, b"b", report(seq=3)))  # the device lost the first ack
    assert first.code == again.code == CHANGED and first.payload == again.payload
    replay = await env.raw.ask(report_request(2, b"b", report(seq=3)))  # a retransmission: the same bytes
    assert replay.raw == again.raw
    dev = env.registry.device(PUMP)
    assert (dev["reports_total"], dev["duplicates_total"]) == (1, 1)


async def test_a_report_naming_another_device_is_forbidden(env: Env) -> None:
    reply = await env.raw.ask(report_request(1, b"x", report("88.123.99/OTHER")))
    assert reply.code == FORBIDDEN and env.registry.device(PUMP) is None


async def test_a_rate_limited_device_gets_4_29(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        async for e in _env(registry, limiter=RateLimiter(Limits(device_rate=1.0, device_burst=1))):
            assert (await e.raw.ask(report_request(1, b"a", report(seq=1)))).code == CHANGED
            limited = await e.raw.ask(report_request(2, b"b", report(seq=2)))
            assert limited.code == TOO_MANY and limited.max_age == 1
            assert e.metrics.value("ida_ratelimited_total", {"frontend": "coap", "limit": "device"}) == 1
    finally:
        registry.close()


async def test_what_the_path_does_not_take_goes_to_aiocoap(env: Env) -> None:
    cfg_ack = devicemsg.encode("config_ack", {"id": PUMP, "cfgver": 1, "code": devicemsg.OK})
    post_cfg = Message(CON, POST, 7, b"c", (*path_opts(PUMP, "d"), (11, b"cfg"), (OPT_CF, b"\x3c")), cfg_ack)
    reply = await env.raw.ask(post_cfg.encode())
    assert reply.code == CHANGED and env.taken == 0 and env.fe.fast is not None and env.fe.fast.slow == 1
    query = report_request(8, b"q", report(), extra=((15, b"x=1"),))  # a Uri-Query: aiocoap's site answers it
    assert (await env.raw.ask(query)).code == CHANGED and env.taken == 0 and env.fe.fast.slow == 2


async def test_stopping_front_end_waits_for_reports_in_commit() -> None:
    held = HeldRegistry()
    async for e in _env(held):
        await e.raw.send(report_request(0x0301, b"s", report()))
        await e.raw.recv()  # the empty ACK
        stopping = asyncio.ensure_future(e.fe.stop(timeout=5.0))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # the report in commit is still being answered
        held.pending[0][2](True)
        sep = await e.raw.recv()
        assert sep.code == CHANGED
        await e.raw.send(Message(ACK, 0, sep.mid, b"", (), b"").encode())
        await asyncio.wait_for(stopping, 5.0)
