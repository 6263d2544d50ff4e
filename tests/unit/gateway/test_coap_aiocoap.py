"""The contract gateway/frontends/coap_aiocoap.py relies on (its module doc, points 1-5), checked against the
aiocoap installed: when an aiocoap release changes any of it, this fails before the gateway misbehaves."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import aiocoap
from aiocoap import interfaces, resource

from gateway.frontends import coap_aiocoap
from gateway.frontends.coap_aiocoap import Bridge, Remote
from proto.coap import Message
from proto.coap.numbers import ACK, CON, CONTENT, GET, RST, Option

PEER = ("127.0.0.1", 40000)


class FakeSocket:
    address = ("127.0.0.1", 5683)

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any, bytes | None]] = []

    def send(self, data: bytes, addr: Any, pktinfo: bytes | None = None) -> None:
        self.sent.append((data, addr, pktinfo))


class Fixed(resource.Resource):
    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload
        self.rendered = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.rendered += 1
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.payload)


async def _context(payload: bytes = b"hello") -> tuple[aiocoap.Context, Bridge, FakeSocket, Fixed, list[int]]:
    site = resource.Site()
    fixed = Fixed(payload)
    site.add_resource(("x",), fixed)
    ctx = aiocoap.Context(loop=asyncio.get_running_loop(), serversite=site, loggername="test-coap")
    sock = FakeSocket()
    closed: list[int] = []
    bridge = await coap_aiocoap.attach(ctx, Bridge(sock, lambda: closed.append(1)))
    return ctx, bridge, sock, fixed, closed


def test_point_1_the_transport_hook_exists_with_its_signature() -> None:
    hook = aiocoap.Context._append_tokenmanaged_messagemanaged_transport
    assert inspect.iscoroutinefunction(hook)
    assert list(inspect.signature(hook).parameters) == ["self", "message_interface_constructor"]


def test_point_4_remote_implements_every_abstract_member() -> None:
    assert not Remote.__abstractmethods__ and not Bridge.__abstractmethods__
    abstract = {
        n for n, v in vars(interfaces.EndpointAddress).items() if getattr(v, "__isabstractmethod__", False)
    }
    assert abstract <= set(dir(Remote))
    bridge = Bridge(FakeSocket(), lambda: None)
    a, b = Remote(("::ffff:10.0.0.1", 5683, 0, 0), bridge), Remote(("::ffff:10.0.0.1", 5683, 1, 2), bridge)
    assert a == b and hash(a) == hash(b) and a.hostinfo == "10.0.0.1" and a.blockwise_key == a.sockaddr[:2]
    assert Remote(("127.0.0.1", 40000), bridge).uri_base == "coap://127.0.0.1:40000"
    assert a.hostinfo_local == "127.0.0.1" and not a.is_multicast and a.maximum_payload_size == 1124


async def test_points_2_3_a_datagram_in_and_aiocoaps_answer_out() -> None:
    ctx, bridge, sock, fixed, closed = await _context()
    try:
        req = Message(CON, GET, 0x1234, b"tk", ((Option.URI_PATH, b"x"),)).encode()
        bridge.feed(req, PEER, b"pkt")
        await asyncio.sleep(0.05)
        want = Message(ACK, CONTENT, 0x1234, b"tk", payload=b"hello").encode()
        assert sock.sent == [(want, PEER, b"pkt")] and fixed.rendered == 1
        bridge.feed(req, PEER, b"pkt")  # aiocoap's de-duplication answers a duplicate with the same bytes
        await asyncio.sleep(0.05)
        assert sock.sent[-1] == (want, PEER, b"pkt") and fixed.rendered == 1
        bridge.feed(b"\x40\x00\x00\x09", PEER)  # a ping: aiocoap answers RST
        bridge.feed(b"\xff\xff", PEER)  # junk: dropped, counted
        await asyncio.sleep(0.05)
        assert sock.sent[-1] == (Message(RST, 0, 9).encode(), PEER, None)
        assert bridge.fed == 4 and bridge.unparsable == 1
        assert await bridge.recognize_remote(bridge.decode(req, PEER).remote)
        assert await bridge.determine_remote(aiocoap.Message(code=aiocoap.GET)) is None
    finally:
        await ctx.shutdown()
    assert closed == [1] and bridge.mman is None


def test_point_5_body_is_what_aiocoap_encodes_after_the_token() -> None:
    response = aiocoap.Message(code=aiocoap.CONTENT, payload=b"hi", content_format=60)
    response.opt.etag = b"12345678"
    code, tail = coap_aiocoap.body(response)
    opts = ((Option.ETAG, b"12345678"), (Option.CONTENT_FORMAT, b"\x3c"))
    assert code == CONTENT and tail == Message(ACK, CONTENT, 0, b"", opts, b"hi").encode()[4:]
