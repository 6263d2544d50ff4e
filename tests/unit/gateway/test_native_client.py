"""HandleClient against an in-test Handle node (UDP + TCP on one ephemeral 127.0.0.1 port) built from the
codec, with knobs for loss, truncation, missing datagrams, busy/referral/error answers, garbage and silence;
and :func:`to_result`, what a decoded answer means for a resolution (captures and hand-made answers)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import errors as E
from gateway.upstream import native as client_module
from gateway.upstream.base import Result
from gateway.upstream.native import HandleClient, to_result
from proto.handle import (
    Envelope,
    ErrorResponse,
    HandleFormatError,
    Message,
    Reassembler,
    ResolutionResponse,
    decode_message,
    decode_request,
    decode_response,
    encode_response,
    encode_truncated,
    split_datagrams,
)
from proto.handle import numbers as N
from proto.records import AdminRef, HandleValue
from tests.support.captures import NAMES, load_capture

PUMP = "88.123.99/PUMP-0001"
MANY = "88.123.99/MANY-0001"
PUMP_VALUES = (
    HandleValue(1, "URL", b"https://example.com/pump/0001"),
    HandleValue(2, "EMAIL", b"ops@example.com"),
    HandleValue(100, "HS_ADMIN", AdminRef("0.NA/88.123.99", 300, 0x0FFF).encode()),
)
MANY_VALUES = tuple(HandleValue(i, "DESC", f"Description value number {i}".encode()) for i in range(1, 40))
RECORDS = {PUMP: PUMP_VALUES, MANY: MANY_VALUES}

FAST = {"timeout": 0.3, "retries": 2, "backoff": 0.04}


@dataclass
class Knobs:
    drop_udp: int = 0  # drop the first N UDP requests
    truncate: bool = False  # answer UDP with a TC datagram
    missing_piece: int | None = None  # never send this datagram of a multi-datagram UDP answer
    reverse: bool = False  # send multi-datagram answers last piece first
    duplicate: bool = False  # send every datagram twice
    code: int | None = None  # answer with this error code (and `data` as body for referrals)
    data: bytes = b""
    garbage: bytes | None = None  # raw UDP answer (no envelope of ours)
    garbage_message: bytes | None = None  # a right envelope around these message bytes
    tcp_garbage: bytes | None = None
    udp_silent: bool = False
    tcp_silent: bool = False
    tcp_close: bool = False  # accept, then close without answering
    wrong_handle: bool = False
    tcp_extra_first: bool = False  # send an unrelated message before the answer on TCP


@dataclass
class FakeNode:
    knobs: Knobs = field(default_factory=Knobs)
    udp_requests: list[int] = field(default_factory=list)  # request ids seen
    tcp_requests: list[int] = field(default_factory=list)
    port: int = 0

    def answer(self, request: Message) -> bytes:
        k = self.knobs
        if k.code is not None:
            return encode_response(request, ErrorResponse(k.code, "knob", k.data))
        req = decode_request(request)
        values = RECORDS.get(req.name.upper())
        if values is None:
            return encode_response(request, ErrorResponse(N.RC_HANDLE_NOT_FOUND))
        if req.types or req.indexes:
            types = {t.decode().upper() for t in req.types}
            values = tuple(v for v in values if v.index in req.indexes or v.type in types)
            if not values:
                return encode_response(request, ErrorResponse(N.RC_VALUES_NOT_FOUND))
        name = "88.123.99/OTHER" if k.wrong_handle else req.name
        return encode_response(request, ResolutionResponse(name, values))

    # UDP ------------------------------------------------------------------------------------------
    def udp_received(self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple[str, int]) -> None:
        k = self.knobs
        request = decode_message(data)
        self.udp_requests.append(request.envelope.request_id)
        if k.udp_silent or len(self.udp_requests) <= k.drop_udp:
            return
        if k.garbage is not None:
            transport.sendto(k.garbage, addr)
            return
        if k.garbage_message is not None:
            env = Envelope(request_id=request.envelope.request_id, message_length=len(k.garbage_message))
            transport.sendto(env.encode() + k.garbage_message, addr)
            return
        if k.truncate:
            transport.sendto(encode_truncated(request), addr)
            return
        pieces = split_datagrams(self.answer(request))
        if k.missing_piece is not None and len(pieces) > 1:
            del pieces[k.missing_piece]
        if k.reverse:
            pieces.reverse()
        for p in pieces:
            transport.sendto(p, addr)
            if k.duplicate:
                transport.sendto(p, addr)

    # TCP ------------------------------------------------------------------------------------------
    async def tcp_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        k = self.knobs
        try:
            head = await reader.readexactly(20)
            (length,) = struct.unpack_from(">I", head, 16)
            request = decode_message(head + await reader.readexactly(length))
            self.tcp_requests.append(request.envelope.request_id)
            if k.tcp_close:
                return
            if k.tcp_silent:
                await asyncio.sleep(5)
                return
            if k.tcp_garbage is not None:
                writer.write(k.tcp_garbage)
            else:
                if k.tcp_extra_first:
                    other = Message(request.envelope, request.header, request.body)
                    other = Message(
                        Envelope(request_id=request.envelope.request_id ^ 1), other.header, other.body
                    )
                    writer.write(encode_response(other, ErrorResponse(2, "not yours")))
                writer.write(self.answer(request))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.node.udp_received(self.transport, data, addr)


async def _start(node: FakeNode) -> tuple[asyncio.Server, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    for _ in range(20):  # the same port number for TCP and UDP
        server = await asyncio.start_server(node.tcp_connected, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpServer(node), local_addr=("127.0.0.1", port)
            )
        except OSError:
            server.close()
            continue
        node.port = port
        return server, udp
    raise RuntimeError("no port free for both TCP and UDP")


@pytest.fixture
async def node() -> AsyncIterator[FakeNode]:
    n = FakeNode()
    server, udp = await _start(n)
    yield n
    udp.close()
    server.close()


def client(node: FakeNode, **kw: object) -> HandleClient:
    args: dict[str, object] = {**FAST, **kw}
    return HandleClient("127.0.0.1", node.port, **args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------
async def test_found_over_udp(node: FakeNode) -> None:
    async with client(node) as c:
        r = await c.resolve(PUMP)
    assert r == Result(N.RC_SUCCESS, PUMP, PUMP_VALUES) and r.found
    assert len(node.udp_requests) == 1 and node.tcp_requests == []
    assert c.node == f"hdl://127.0.0.1:{node.port}"


async def test_not_found_is_a_result(node: FakeNode) -> None:
    async with client(node) as c:
        assert await c.resolve("88.123.99/NOPE") == Result(100, "88.123.99/NOPE")
        assert await c.resolve(PUMP, types=["CUSTOM"]) == Result(200, PUMP)
        r = await c.resolve(PUMP, types=["URL"], indexes=[100])
    assert [v.index for v in r.values] == [1, 100]


async def test_lost_request_is_retransmitted(node: FakeNode) -> None:
    node.knobs.drop_udp = 2
    async with client(node) as c:
        r = await c.resolve(PUMP)
    assert r.found
    assert len(node.udp_requests) == 3 and len(set(node.udp_requests)) == 1  # same request id
    assert node.tcp_requests == []


async def test_structured_logs(node: FakeNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.upstream.native")
    node.knobs.missing_piece = 0
    async with client(node) as c:
        await c.resolve('88.123.99/a "b" c')
        await c.resolve(MANY)
    lines = [r.getMessage() for r in caplog.records]
    assert f"handle.send node=hdl://127.0.0.1:{node.port} " in lines[0]
    assert 'handle="88.123.99/a \\"b\\" c" transport=udp attempt=1' in lines[0]
    assert any("handle.tcp.fallback" in ln and 'reason="missing-datagrams=[0]"' in ln for ln in lines)


async def test_tc_flag_switches_to_tcp(node: FakeNode) -> None:
    node.knobs.truncate = True
    async with client(node) as c:
        r = await c.resolve(MANY)
    assert r.values == MANY_VALUES
    assert len(node.udp_requests) == 1 and len(node.tcp_requests) == 1


async def test_multi_datagram_answer_any_order_and_duplicates(node: FakeNode) -> None:
    node.knobs.reverse = node.knobs.duplicate = True
    async with client(node) as c:
        r = await c.resolve(MANY)
    assert r.values == MANY_VALUES
    assert len(node.udp_requests) == 1 and node.tcp_requests == []


async def test_missing_datagram_falls_back_to_tcp(node: FakeNode) -> None:
    node.knobs.missing_piece = 1
    async with client(node) as c:
        t0 = time.monotonic()
        r = await c.resolve(MANY)
        elapsed = time.monotonic() - t0
    assert r.values == MANY_VALUES
    assert len(node.udp_requests) == 1 and len(node.tcp_requests) == 1
    assert elapsed < FAST["timeout"]  # at the first retransmission point, not after the whole timeout


async def test_busy(node: FakeNode) -> None:
    node.knobs.code = N.RC_SERVER_BUSY
    async with client(node) as c:
        with pytest.raises(E.UpstreamBusy) as e:
            await c.resolve(PUMP)
    assert e.value.node == c.node


async def test_referral(node: FakeNode) -> None:
    body = struct.pack(">I", 11) + b"0.NA/10.999"
    node.knobs.code, node.knobs.data = N.RC_SERVICE_REFERRAL, body
    async with client(node) as c:
        with pytest.raises(E.UpstreamReferral) as e:
            await c.resolve(PUMP)
    assert (e.value.code, e.value.referral) == (302, body)


@pytest.mark.parametrize(
    "code", [N.RC_ERROR, N.RC_SERVER_NOT_RESP, N.RC_ACCESS_DENIED, N.RC_AUTHEN_NEEDED, 777]
)
async def test_error_codes_are_refusals(node: FakeNode, code: int) -> None:
    node.knobs.code = code
    async with client(node) as c:
        with pytest.raises(E.UpstreamRefused) as e:
            await c.resolve(PUMP)
    assert e.value.code == code


async def test_garbage_message_is_protocol_error(node: FakeNode) -> None:
    node.knobs.garbage_message = b"\x00" * 10
    async with client(node) as c:
        with pytest.raises(E.ProtocolError) as e:
            await c.resolve(PUMP)
    assert PUMP in str(e.value) and e.value.node == c.node


async def test_unparsable_datagrams_without_fallback(node: FakeNode) -> None:
    node.knobs.garbage = b"\xde\xad\xbe\xef" * 3
    async with client(node, tcp_fallback=False) as c:
        with pytest.raises(E.ProtocolError, match="unparsable"):
            await c.resolve(PUMP)
    assert c.unparsable_datagrams >= 1


async def test_wrong_handle_is_protocol_error(node: FakeNode) -> None:
    node.knobs.wrong_handle = True
    async with client(node) as c:
        with pytest.raises(E.ProtocolError, match="asked for"):
            await c.resolve(PUMP)


async def test_udp_silent_without_fallback_times_out(node: FakeNode) -> None:
    node.knobs.udp_silent = True
    async with client(node, tcp_fallback=False) as c:
        t0 = time.monotonic()
        with pytest.raises(E.UpstreamTimeout):
            await c.resolve(PUMP)
        elapsed = time.monotonic() - t0
    assert FAST["timeout"] <= elapsed + 0.01 < FAST["timeout"] + 0.3
    assert len(node.udp_requests) == 1 + FAST["retries"] and node.tcp_requests == []


async def test_udp_silent_falls_back_to_tcp(node: FakeNode) -> None:
    node.knobs.udp_silent = True
    async with client(node) as c:
        assert (await c.resolve(PUMP)).found
    assert len(node.tcp_requests) == 1


async def test_everything_silent_times_out(node: FakeNode) -> None:
    node.knobs.udp_silent = node.knobs.tcp_silent = True
    async with client(node, timeout=0.2) as c:
        with pytest.raises(E.UpstreamTimeout):
            await c.resolve(PUMP)


async def test_tcp_transport(node: FakeNode) -> None:
    node.knobs.tcp_extra_first = True
    async with client(node, transport="tcp") as c:
        assert c.node.startswith("hdl+tcp://")
        r = await c.resolve(MANY)
        assert (await c.resolve("88.123.99/x")).code == 100
    assert r.values == MANY_VALUES
    assert node.udp_requests == [] and len(node.tcp_requests) == 2


async def test_tcp_garbage_and_close(node: FakeNode) -> None:
    node.knobs.tcp_garbage = b"\x09" * 40
    async with client(node, transport="tcp") as c:
        with pytest.raises(E.ProtocolError):
            await c.resolve(PUMP)
        node.knobs.tcp_garbage = Envelope(message_length=100).encode() + b"\x00" * 30  # cut short
        with pytest.raises(E.ProtocolError, match="stream ended"):
            await c.resolve(PUMP)
        node.knobs.tcp_garbage, node.knobs.tcp_close = None, True
        with pytest.raises(E.UpstreamError):
            await c.resolve(PUMP)


async def test_tcp_connection_refused() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with HandleClient("127.0.0.1", port, transport="tcp", timeout=0.5) as c:
        with pytest.raises(E.UpstreamError) as e:
            await c.resolve(PUMP)
    assert not isinstance(e.value, E.ProtocolError)


async def test_concurrent_resolutions_share_one_endpoint(node: FakeNode) -> None:
    async with client(node) as c:
        names = [PUMP, MANY, "88.123.99/NOPE"] * 20
        results = await asyncio.gather(*(c.resolve(n) for n in names))
        assert c._udp is not None
    assert [r.handle for r in results] == names
    assert [r.code for r in results] == [1, 1, 100] * 20
    assert len(set(node.udp_requests)) == len(names)  # distinct request ids


async def test_closed_client() -> None:
    c = HandleClient("127.0.0.1", 9, timeout=1.0)
    await c.close()
    with pytest.raises(E.UpstreamError, match="closed"):
        await c.resolve(PUMP)


async def test_close_fails_requests_in_flight(node: FakeNode) -> None:
    node.knobs.udp_silent = True
    c = client(node, timeout=2.0, tcp_fallback=False)
    task = asyncio.create_task(c.resolve(PUMP))
    await asyncio.sleep(0.05)
    await c.close()
    with pytest.raises(E.UpstreamError, match="closed"):
        await task


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        HandleClient("h", transport="quic")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HandleClient("h", timeout=0)


async def test_bad_index_is_caller_error(node: FakeNode) -> None:
    async with client(node) as c:
        with pytest.raises(ValueError):
            await c.resolve(PUMP, indexes=[-1])


# ------------------------------------------------------------------------------------------------------
# hypothesis: whatever a node sends back, resolve() raises only the documented errors
# ------------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300).map(lambda b: ("message", b)),
        st.binary(min_size=1, max_size=300).map(lambda b: ("raw", b)),
    )
)
def test_malformed_answers_only_raise_documented_errors(answer: tuple[str, bytes]) -> None:
    kind, data = answer

    async def run() -> None:
        n = FakeNode()
        if kind == "message":
            n.knobs.garbage_message = data
        else:
            n.knobs.garbage = data
        n.knobs.tcp_garbage = data
        server, udp = await _start(n)
        try:
            async with HandleClient("127.0.0.1", n.port, timeout=0.05, retries=0) as c:
                try:
                    await c.resolve(PUMP)
                except (
                    E.ProtocolError,
                    E.UpstreamTimeout,
                    E.UpstreamBusy,
                    E.UpstreamReferral,
                    E.UpstreamRefused,
                ):
                    pass
                except E.UpstreamError as e:  # TCP connection closed early
                    assert "TCP" in str(e)
        finally:
            udp.close()
            server.close()

    asyncio.run(run())


async def test_nobody_listening_fails_fast_not_after_the_timeout() -> None:
    """ICMP port unreachable ends the UDP wait at once; TCP is refused too: an error well before the timeout."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this UDP (nor TCP) port now
    async with HandleClient("127.0.0.1", port, timeout=5.0, retries=3, backoff=0.2) as c:
        t0 = time.monotonic()
        with pytest.raises(E.UpstreamError):
            await c.resolve("88.123.99/PUMP-0001")
        assert time.monotonic() - t0 < 2.0


# -- the UDP request path: one future per send, resolved by the answer or a timer ------------------------------
async def test_cancelled_request_leaves_nothing_behind(node: FakeNode) -> None:
    node.knobs.udp_silent = True
    async with client(node, timeout=2.0, backoff=0.5, tcp_fallback=False) as c:
        task = asyncio.create_task(c.resolve(PUMP))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert c._pending == {}
        await asyncio.sleep(0.6)  # past the first retransmission: its timer was cancelled, nothing was resent
        assert len(node.udp_requests) == 1


async def test_retransmissions_follow_the_backoff(node: FakeNode) -> None:
    node.knobs.udp_silent = True
    async with client(node, timeout=0.5, retries=2, backoff=0.1, tcp_fallback=False) as c:
        t0 = time.monotonic()
        with pytest.raises(E.UpstreamTimeout, match=r"3 sends"):
            await c.resolve(PUMP)
        elapsed = time.monotonic() - t0
    assert len(node.udp_requests) == 3 and len(set(node.udp_requests)) == 1
    assert 0.45 <= elapsed < 1.5  # sends at 0, 0.1, 0.3; gives up at the 0.5 s timeout


async def test_whole_tc_datagram_after_pieces_still_means_tcp(node: FakeNode) -> None:
    """A whole datagram with TC switches to TCP even when pieces of a split answer came before it; a whole
    datagram without TC after pieces goes to the reassembly (which refuses it: it disagrees with them)."""
    loop = asyncio.get_running_loop()
    c = client(node)
    request = decode_message(c._encode(0x1234, MANY, (), ()))
    pieces = split_datagrams(node.answer(request))
    assert len(pieces) > 1
    for last, expect in (
        (encode_truncated(request), "truncated"),
        (split_datagrams(encode_response(request, ResolutionResponse(MANY, MANY_VALUES[:1])))[0], "error"),
    ):
        pending = client_module._Pending(loop.create_future(), c.max_udp_message)
        c._pending[0x1234] = pending
        c._on_datagram(pieces[0])
        assert pending.reassembler is not None and not pending.future.done()
        c._on_datagram(last)
        if expect == "truncated":
            assert pending.future.result() is client_module._TRUNCATED
        else:
            assert isinstance(pending.future.exception(), HandleFormatError)
        del c._pending[0x1234]
    await c.close()


async def test_whole_answer_datagram_is_the_message(node: FakeNode) -> None:
    loop = asyncio.get_running_loop()
    c = client(node)
    request = decode_message(c._encode(0x42, PUMP, (), ()))
    (answer,) = split_datagrams(node.answer(request))
    pending = client_module._Pending(loop.create_future(), c.max_udp_message)
    c._pending[0x42] = pending
    c._on_datagram(answer[:19])  # no envelope: dropped and counted
    c._on_datagram(b"\x03" + answer[1:])  # another major version: dropped and counted
    assert c.unparsable_datagrams == 2 and not pending.future.done()
    c._on_datagram(answer)
    assert pending.future.result() == answer and pending.reassembler is None
    await c.close()


# -- to_result: what a decoded answer means for a resolution ------------------------------------------------
def _capture(name: str) -> tuple[Message, Message]:
    """(request, whole response) of one capture file."""
    request, pieces = load_capture(name)
    r = Reassembler()
    (whole,) = [m for m in (r.feed(p) for p in pieces) if m is not None]
    return decode_message(request), decode_message(whole)


@pytest.mark.parametrize("name", NAMES)
def test_captured_answers_map_to_results_and_back(name: str) -> None:
    """A captured answer's result holds everything the node said: re-encoded, it is the capture again."""
    request, response = _capture(name)
    asked = decode_request(request).name
    result = to_result(decode_response(response), handle=asked, node="hdl://x")
    if result.found:
        assert result.record().to_rest()["handle"] == asked and result.values
        again: ResolutionResponse | ErrorResponse = ResolutionResponse(result.handle, result.values)
    else:
        assert result == Result(N.RC_HANDLE_NOT_FOUND, asked) and not result.found
        again = ErrorResponse(result.code)
    assert encode_response(request, again) == response.encode()


def test_found_capture_is_a_result() -> None:
    _, response = _capture("capture_found.hex")
    resp = decode_response(response)
    assert isinstance(resp, ResolutionResponse)
    result = to_result(resp, handle=PUMP, node="hdl://x")
    assert result == Result(N.RC_SUCCESS, PUMP, resp.values) and result.found
    assert result.record().to_rest()["values"][0]["data"] == {
        "format": "string",
        "value": "https://example.com/pump/0001",
    }


def test_error_mapping() -> None:
    assert to_result(ErrorResponse(200), handle="a/b") == Result(200, "a/b")
    assert to_result(ErrorResponse(100, "gone"), handle="a/b") == Result(100, "a/b")
    with pytest.raises(E.UpstreamBusy):
        to_result(ErrorResponse(3, "busy"), handle="a/b")
    for code in (2, 4, 301, 400, 401, 402, 403, 500, 999):
        with pytest.raises(E.UpstreamRefused) as e:
            to_result(ErrorResponse(code, "x"), handle="a/b", node="hdl://n")
        assert e.value.code == code and e.value.node == "hdl://n"
    with pytest.raises(E.UpstreamRefused, match="SERVER_NOT_RESP") as e:
        to_result(ErrorResponse(301, "not here"), handle="10.1000/1", node="hdl://n")
    assert "10.1000/1" in str(e.value) and "not here" in str(e.value)
    with pytest.raises(E.ProtocolError, match="without values"):
        to_result(ErrorResponse(1), handle="a/b")


def test_referral_mapping_keeps_the_body() -> None:
    body = struct.pack(">I", 11) + b"0.NA/10.999"
    for code in (302, 303):
        with pytest.raises(E.UpstreamReferral) as e:
            to_result(ErrorResponse(code, "", body), handle="a/b")
        assert (e.value.code, e.value.referral) == (code, body)


def test_answer_for_another_handle_is_protocol_error() -> None:
    resp = ResolutionResponse(PUMP, PUMP_VALUES)
    assert to_result(resp, handle="88.123.99/pump-0001").found  # servers match ASCII-case-insensitively
    with pytest.raises(E.ProtocolError, match="asked for"):
        to_result(resp, handle="88.123.99/PUMP-0002")
