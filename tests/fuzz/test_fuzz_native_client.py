"""Fuzzing the Handle native-protocol client (gateway/upstream/native.py) through real sockets.

A fake node (UDP and TCP on one loopback port) answers every request of the real HandleClient with a *mutation
of real HANDLE.NET 7.3.1 traffic* (tests/vectors/handle-native/): the captured answer is re-addressed to the
request's id, then structured edits are applied -- envelope fields (version, flags CP/EC/TC, session, sequence,
message length), header fields (opcode, response code, op flags, body length), value-level edits (counts and
lengths of values, types, data and references, blown up or cut), bit flips, truncation and extension; the
3-datagram answer is cut, reordered, duplicated, mixed with pieces of other answers or with garbage; TCP gets
framed mutations, garbage, half messages and early closes. One client lives through a sequence of such answers
(stateful), then must still resolve a clean answer.

Properties: ``resolve`` returns a Result or raises an ``UpstreamError`` subclass, nothing else; a result's
values are well-formed; no request stays pending; nothing unhandled is logged or reaches the loop's exception
handler. The sans-I/O codec's own garbage tests are in tests/unit/proto/test_handle_codec.py.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.errors import UpstreamError
from gateway.upstream.base import Result
from gateway.upstream.native import HandleClient
from proto.handle import (
    HandleFormatError,
    Reassembler,
    ResolutionResponse,
    decode_message,
    decode_response,
)
from proto.records import HandleValue
from tests.support.captures import load_capture
from tests.support.fuzzing import fuzz_settings, watch_logs

PUMP = "88.123.99/PUMP-0001"
MANY = "88.123.99/MANY-0001"


FOUND = load_capture("capture_found.hex")[1][0]
NOTFOUND = load_capture("capture_notfound.hex")[1][0]
TTL = load_capture("capture_ttl.hex")[1][0]
MANY_PIECES = load_capture("capture_many.hex")[1]
ANSWERS = {
    PUMP: [FOUND],
    "88.123.99/DOES-NOT-EXIST": [NOTFOUND],
    "88.123.99/TTL-0001": [TTL],
    MANY: MANY_PIECES,
}


def _readdress(datagram: bytes, rid: int) -> bytes:
    return datagram[:8] + struct.pack(">I", rid) + datagram[12:]


# -- mutations ------------------------------------------------------------------------------------------------
def _layout(spec: str) -> dict[str, tuple[int, str]]:
    """``name:fmt`` fields laid end to end from offset 0 -> {name: (offset, ">fmt")}; ``-`` skips a field."""
    out, off = {}, 0
    for item in spec.split():
        name, fmt = item.split(":")
        if name != "-":
            out[name] = (off, ">" + fmt)
        off += struct.calcsize(">" + fmt)
    return out


# The envelope (20 bytes) and the header (24) as RFC 3652 lays them out; "-" is the header's reserved byte.
FIELDS = _layout(
    "major:B minor:B flags:H session:I rid:I seq:I length:I "
    "opcode:I code:I opflags:I serial:H recursion:B -:B expiration:I body_length:I"
)
INTERESTING = {
    ">B": [0, 1, 2, 5, 0x7F, 0xFF],
    ">H": [0, 0x8000, 0x4000, 0x2000, 0xE000, 0x0205, 0xFFFF],
    ">I": [0, 1, 2, 3, 100, 200, 301, 302, 303, 402, 0x7FFFFFFF, 0xFFFFFFFF, 20, 44, 217, 1194, 0x10000],
}


@st.composite
def edits(draw: st.DrawFn, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 9))
        if op <= 2:  # a field of the envelope or header
            name, (off, fmt) = draw(st.sampled_from(sorted(FIELDS.items())))
            if name == "rid" and draw(st.integers(0, 3)):
                continue  # mostly keep the request id: the answer has to get past the matching
            if off + struct.calcsize(fmt) <= len(b):
                v = draw(st.sampled_from(INTERESTING[fmt]) | st.integers(0, 256 ** struct.calcsize(fmt) - 1))
                struct.pack_into(fmt, b, off, v)
        elif op <= 4 and len(b) >= 48:
            # a u32 length or count somewhere in the body (values, types, data, refs)
            off = 44 + draw(st.integers(0, (len(b) - 48) // 4)) * 4 + draw(st.integers(0, 3))
            if off + 4 <= len(b):
                struct.pack_into(
                    ">I", b, off, draw(st.sampled_from(INTERESTING[">I"]) | st.integers(0, 2**32 - 1))
                )
        elif op == 5 and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 6:
            del b[draw(st.integers(0, len(b))) :]
        elif op == 7:
            b += draw(st.binary(min_size=1, max_size=16))
        elif op == 8 and len(b) > 20:  # keep the envelope's length honest after cutting or extending
            struct.pack_into(">I", b, 16, len(b) - 20)
        elif op == 9 and b:
            i = draw(st.integers(0, len(b)))
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


@dataclass
class Script:
    """What the node sends for each request, drawn up front by hypothesis (so it shrinks)."""

    udp: list[Callable[[int], list[bytes]]] = field(default_factory=list)
    tcp: list[Callable[[int], bytes | None]] = field(default_factory=list)


@st.composite
def udp_answers(draw: st.DrawFn, handle: str) -> Callable[[int], list[bytes]]:
    pieces = ANSWERS[handle]
    kind = draw(st.integers(0, 5))
    if kind == 0:  # silence
        return lambda rid: []
    if kind == 1:  # raw garbage
        junk = draw(st.lists(st.binary(max_size=600), min_size=1, max_size=3))
        return lambda rid: junk
    if len(pieces) > 1 and kind >= 4:  # the multi-datagram answer: cut, reorder, duplicate, mutate some
        order = draw(st.lists(st.integers(0, len(pieces) - 1), min_size=1, max_size=6))
        muts = {i: draw(edits(pieces[i])) for i in set(order) if draw(st.booleans())}
        stray = draw(st.sampled_from([b"", FOUND, NOTFOUND]))
        return lambda rid: (
            [_readdress(muts.get(i, pieces[i]), rid) for i in order]
            + ([_readdress(stray, rid)] if stray else [])
        )
    base = pieces[0] if len(pieces) == 1 else draw(st.sampled_from([FOUND, TTL, NOTFOUND]))
    mutated = draw(edits(base))
    return lambda rid: [_readdress(mutated, rid) if len(mutated) >= 12 else mutated]


@st.composite
def tcp_answers(draw: st.DrawFn) -> Callable[[int], bytes | None]:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return lambda rid: None  # close at once
    if kind == 1:
        junk = draw(st.binary(max_size=300))
        return lambda rid: junk
    base = draw(st.sampled_from([FOUND, NOTFOUND, TTL]))
    mutated = draw(edits(base))
    extra = draw(st.sampled_from([b"", b"\x00" * 7, FOUND[:30]]))
    return lambda rid: (_readdress(mutated, rid) if len(mutated) >= 12 else mutated) + extra


# -- the node ---------------------------------------------------------------------------------------------------
class Node(asyncio.DatagramProtocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.transport: asyncio.DatagramTransport | None = None
        self.udp_seen = 0
        self.tcp_seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        rid = decode_message(data).envelope.request_id
        i = self.udp_seen
        self.udp_seen += 1
        if i < len(self.script.udp):
            for d in self.script.udp[i](rid):
                self.transport.sendto(d, addr)

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(20)
            (length,) = struct.unpack_from(">I", head, 16)
            rid = decode_message(head + await reader.readexactly(length)).envelope.request_id
            i = self.tcp_seen
            self.tcp_seen += 1
            answer = self.script.tcp[i](rid) if i < len(self.script.tcp) else None
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _serve(node: Node) -> tuple[asyncio.Server, asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    for _ in range(20):
        server = await asyncio.start_server(node.tcp, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            udp, _ = await loop.create_datagram_endpoint(lambda: node, local_addr=("127.0.0.1", port))
        except OSError:
            server.close()
            continue
        return server, cast(asyncio.DatagramTransport, udp), port
    raise RuntimeError("no port free for both TCP and UDP")


def _check_result(r: Result, handle: str) -> None:
    assert isinstance(r, Result) and r.handle.upper() == handle.upper()
    for v in r.values:
        assert isinstance(v, HandleValue) and isinstance(v.type, str) and isinstance(v.data, bytes)
        assert 0 <= v.index <= 0xFFFFFFFF and 0 <= v.ttl <= 0xFFFFFFFF


async def _scenario(handles: list[str], script: Script, tcp_fallback: bool) -> list[str]:
    loop = asyncio.get_running_loop()
    with watch_logs() as watch:
        loop.set_exception_handler(watch.loop_handler)
        node = Node(script)
        server, udp, port = await _serve(node)
        outcomes = []
        try:
            async with HandleClient(
                "127.0.0.1", port, timeout=0.15, retries=1, backoff=0.04, tcp_fallback=tcp_fallback
            ) as c:
                for h in handles:
                    try:
                        r = await c.resolve(h)
                    except UpstreamError as e:
                        outcomes.append(type(e).__name__)
                    else:
                        _check_result(r, h)
                        outcomes.append(f"result {r.code}")
                    assert not c._pending, "a request stayed pending"
                # the same client still resolves a clean answer
                node.script = Script(udp=[lambda rid: [_readdress(FOUND, rid)]] * 3)
                node.udp_seen = 0
                r = await c.resolve(PUMP)
                assert r.found and [v.index for v in r.values] == [1, 2, 100]
        finally:
            udp.close()
            server.close()
            await server.wait_closed()
        await asyncio.sleep(0)
        problems = watch.problems()
        assert not problems, "\n".join(problems[:10])
    return outcomes


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[str], Script, bool]:
    handles = draw(st.lists(st.sampled_from(sorted(ANSWERS)), min_size=1, max_size=4))
    script = Script()
    for h in handles:
        for _ in range(draw(st.integers(1, 2))):  # the first send and maybe the retransmission
            script.udp.append(draw(udp_answers(h)))
    script.tcp = [draw(tcp_answers()) for _ in range(len(handles))]
    return handles, script, draw(st.booleans())


@fuzz_settings(20)
@given(scenarios())
def test_fuzz_handle_client_against_mutated_node(case: tuple[list[str], Script, bool]) -> None:
    handles, script, tcp_fallback = case
    asyncio.run(_scenario(handles, script, tcp_fallback))


def test_regression_handle_fuzz_smoke() -> None:
    """Fixed edits every run: huge value count, body length past the end, TC with pieces, wrong version."""

    def edit(off: int, fmt: str, v: int, base: bytes = FOUND) -> Callable[[int], list[bytes]]:
        b = bytearray(base)
        struct.pack_into(fmt, b, off, v)
        return lambda rid: [_readdress(bytes(b), rid)]

    cases = [
        edit(40, ">I", 0xFFFFFFFF),  # body length
        edit(16, ">I", 0xFFFFFFFF),  # message length
        edit(0, ">B", 5),  # major version
        edit(2, ">H", 0x8000),  # compressed
        edit(2, ">H", 0x2000, MANY_PIECES[0]),  # TC flag on the first of three pieces
        edit(24, ">I", 303),  # referral with a captured body
        edit(24, ">I", 0),  # a request instead of a response
        lambda rid: [_readdress(MANY_PIECES[1], rid), _readdress(MANY_PIECES[1], rid)],
    ]
    for c in cases:
        asyncio.run(_scenario([PUMP], Script(udp=[c, c], tcp=[lambda rid: None]), True))


# -- the UDP reassembler as a state machine -------------------------------------------------------------------------
class ReassemblerMachine(RuleBasedStateMachine):
    """Pieces of the real 3-datagram answer, mutated pieces, pieces of other answers and garbage, in any order and
    any number: feed() returns the original message exactly once, when every original piece is in and no
    inconsistent one was accepted first; it raises nothing but HandleFormatError; ``missing`` and ``received``
    always agree with what was accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.r = Reassembler(struct.unpack_from(">I", MANY_PIECES[0], 8)[0])
        self.accepted: set[int] = set()
        self.tainted = False  # a mutated piece got in: the result may differ (it must still be one message)
        self.done: bytes | None = None

    def _feed(self, d: bytes, original: int | None) -> None:
        try:
            out = self.r.feed(d)
        except HandleFormatError:
            return
        if original is None:
            self.tainted = True
        else:
            self.accepted.add(original)
        if out is not None:
            assert self.done is None, "a second whole message from one reassembler"
            self.done = out
            if not self.tainted:
                resp = decode_response(decode_message(out))
                assert isinstance(resp, ResolutionResponse) and len(resp.values) == 21

    @rule(i=st.integers(0, 2))
    def original(self, i: int) -> None:
        self._feed(MANY_PIECES[i], i)

    @rule(data=st.data(), i=st.integers(0, 2))
    def mutated_piece(self, data: st.DataObject, i: int) -> None:
        d = data.draw(edits(MANY_PIECES[i]))
        if d != MANY_PIECES[i]:
            self._feed(d, None)

    @rule(d=st.sampled_from([FOUND, NOTFOUND, TTL]) | st.binary(max_size=530))
    def other(self, d: bytes) -> None:
        self._feed(d, None)

    @invariant()
    def consistent(self) -> None:
        if self.r.expected is not None and not self.r.complete:
            assert set(self.r.missing) | set(range(self.r.expected)) == set(range(self.r.expected))
            assert self.r.received + len(self.r.missing) == self.r.expected
        if not self.tainted and self.accepted == {0, 1, 2}:
            assert self.done is not None and self.r.complete


ReassemblerMachine.TestCase.settings = fuzz_settings(30, stateful_step_count=12)
test_fuzz_reassembler_state_machine = ReassemblerMachine.TestCase
