"""Anchor servers, each run in its own process: ``python -m tools.harness.bench.servers KIND [options]``.

* ``raw``     -- a bare asyncio UDP responder: every CON GET gets the same piggybacked 2.05 ACK (token and
  Message ID echoed), every NON GET a NON 2.05; nothing else (no de-duplication, no routing). The ceiling of
  what a Python asyncio CoAP server can do on this machine.
* ``raw-drain`` -- the same responder, but after each datagram asyncio delivers it reads and answers whatever
  else is queued on the socket: the ceiling for a Python server that batches its reads.
* ``mqtt`` -- a bare MQTT client behind the broker at ``--host``/``--port`` answering every
  ``<root>/+/req`` with a fixed resolve answer (the request's token patched in): the MQTT ceiling.
* ``mqtt-ack`` -- a bare MQTT client behind the broker subscribed to ``<root>/+/rpt`` at QoS 1 that acknowledges
  every report with a ``report_ack`` (code 1, the report's boot and seq) at QoS 1 on ``…/ack``, storing nothing:
  the ceiling of the report round trip through the broker.
* ``aiocoap`` -- a plain aiocoap server with one resource under ``/r`` returning the same payload, ETag and
  Max-Age: what aiocoap costs without any of the gateway's work.

Each prints ``READY <port>`` on stdout once bound (``--port 0`` = any free port) and runs until SIGTERM/SIGINT.
The payload is given in hex (``--payload``) so every anchor answers with the same bytes as the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, cast

import cbor2

from proto import mqtt
from proto.coap import encode_body, uint_value
from proto.coap.message import heads
from proto.coap.numbers import ACK, CHANGED, CON, CONTENT, GET, NON, POST, ContentFormat, Option
from tools.harness.bench.procs import free_port

CF_CBOR = ContentFormat.CBOR
DRAIN_MAX = 64


def response_tail(
    payload: bytes, etag: bytes | None, max_age: int | None, content_format: int = CF_CBOR
) -> bytes:
    """The part of a 2.05 response after the token: options, marker, payload."""
    opts: list[tuple[int, bytes]] = [(Option.CONTENT_FORMAT, uint_value(content_format))]
    if etag:
        opts.append((Option.ETAG, etag))
    if max_age is not None:
        opts.append((Option.MAX_AGE, uint_value(max_age)))
    return encode_body(opts, payload)


class RawResponder(asyncio.DatagramProtocol):
    """Answers every CoAP GET with a fixed 2.05 (piggybacked ACK for CON, NON for NON); with ``method`` POST and
    ``code`` 2.04, every POST with a fixed 2.04 (P6's responder that acknowledges reports without storing them).

    With ``sock`` (the bound socket, owned by the caller) it also drains the socket after each datagram
    asyncio delivers (``sock.recvfrom`` until it would block, at most ``DRAIN_MAX``) and answers with
    ``sock.sendto``: one event-loop iteration per burst instead of one per datagram.
    """

    def __init__(
        self, tail: bytes, sock: socket.socket | None = None, method: int = GET, code: int = CONTENT
    ) -> None:
        self.tail = tail
        self.sock = sock
        self.method = method
        self._ack, self._non = heads(ACK, code), heads(NON, code)
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = 0
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._answer(data, addr)
        sock = self.sock
        if sock is None:
            return
        for _ in range(DRAIN_MAX):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self._answer(data, addr)

    def _answer(self, data: bytes, addr: Any) -> None:
        if len(data) < 4 or data[1] != self.method:
            return
        first = data[0]
        tkl = first & 0x0F
        if first >> 6 != 1 or tkl > 8 or len(data) < 4 + tkl:
            return
        mtype = (first >> 4) & 3
        if mtype == CON:
            out = self._ack[tkl] + data[2 : 4 + tkl] + self.tail
        elif mtype == NON:
            self.mid = (self.mid + 1) & 0xFFFF
            out = self._non[tkl] + self.mid.to_bytes(2, "big") + data[4 : 4 + tkl] + self.tail
        else:
            return
        self._send(out, addr)
        self.answered += 1

    def _send(self, out: bytes, addr: Any) -> None:
        if self.sock is not None:
            try:
                self.sock.sendto(out, addr)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return
        assert self.transport is not None
        self.transport.sendto(out, addr)


async def serve_raw(
    host: str,
    port: int,
    tail: bytes,
    stop: asyncio.Event,
    drain: bool = False,
    method: int = GET,
    code: int = CONTENT,
) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, port))
    sock.setblocking(False)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: RawResponder(tail, sock if drain else None, method, code), sock=sock
    )
    _ready(sock.getsockname()[1])
    try:
        await stop.wait()
    finally:
        transport.close()


async def serve_aiocoap(
    host: str, port: int, payload: bytes, etag: bytes | None, max_age: int | None, stop: asyncio.Event
) -> None:
    import aiocoap
    from aiocoap import resource

    class Fixed(resource.Resource, resource.PathCapable):
        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            m = aiocoap.Message(code=aiocoap.CONTENT, payload=payload, content_format=CF_CBOR)
            if etag:
                m.opt.etag = etag
            if max_age is not None:
                m.opt.max_age = max_age
            return m

    site = resource.Site()
    site.add_resource(("r",), Fixed())
    for attempt in range(5):  # aiocoap says no port it bound: pick a free one (racy, so try again)
        bound = port or free_port(host=host)
        try:
            ctx = await aiocoap.Context.create_server_context(site, bind=(host, bound), transports=["udp6"])
            break
        except OSError:
            if port or attempt == 4:
                raise
    _ready(bound)
    try:
        await stop.wait()
    finally:
        await ctx.shutdown()


class MqttResponder(asyncio.Protocol):
    """A bare MQTT client answering every ``<root>/+/req`` resolve request with a fixed answer on ``…/res``
    (the request's 4-byte token patched in): the ceiling for a Python MQTT front end behind the same broker.
    Subclasses answer another leaf (``leaf``, subscribed at ``qos``) in :meth:`answer`."""

    leaf, qos = "req", 0

    def __init__(self, root: str, pre: bytes, post: bytes, ready: asyncio.Future[None]) -> None:
        self.root = root
        self.pre, self.post = pre, post
        self.reader = mqtt.Reader()
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            mqtt.connect(f"bench-responder-{os.getpid()}", 120, version=mqtt.MQTT311)
            + mqtt.subscribe(1, [(f"{self.root}/+/{self.leaf}", self.qos)], version=mqtt.MQTT311)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"broker closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        for first, body in self.reader.feed(data):
            kind = first >> 4
            if kind == mqtt.PUBLISH:
                self.answer(first, body, out)
            elif kind == mqtt.SUBACK and not self.ready.done():
                self.ready.set_result(None)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def answer(self, first: int, body: bytes, out: list[bytes]) -> None:
        """Put the packets answering the PUBLISH (``first``, ``body``) in ``out``."""
        topic, payload, _ = mqtt.parse_publish(first, body, version=mqtt.MQTT311)
        if len(payload) < 7 or payload[1] != 1 or payload[2] != 0x44:  # {1: 4-byte token, ...}
            return
        answer = self.pre + payload[3:7] + self.post
        out.append(mqtt.publish_head(topic[:-3] + b"res", len(answer), version=mqtt.MQTT311) + answer)
        self.answered += 1


class MqttAckResponder(MqttResponder):
    """A bare MQTT client acknowledging every ``<root>/+/rpt`` report (QoS 1) with a ``report_ack`` at QoS 1."""

    leaf, qos = "rpt", 1

    def __init__(self, root: str, ready: asyncio.Future[None]) -> None:
        super().__init__(root, b"", b"", ready)
        self.pid = 0
        self.heads = mqtt.FixedHeaders(mqtt.PUBLISH << 4 | 0x02)

    def answer(self, first: int, body: bytes, out: list[bytes]) -> None:
        topic, payload, pid = mqtt.parse_publish(first, body, version=mqtt.MQTT311)
        if pid:
            out.append(mqtt.puback(pid))
        try:
            report = cbor2.loads(payload)
            ack = cbor2.dumps({3: 1, 10: report[10], 11: report[11]})
        except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError):
            return
        self.pid = self.pid % 0xFFFF + 1
        ack_topic = topic[:-3] + b"ack"
        size = 2 + len(ack_topic) + 2 + len(ack)
        out += (
            self.heads[size],
            len(ack_topic).to_bytes(2, "big"),
            ack_topic,
            self.pid.to_bytes(2, "big"),
            ack,
        )
        self.answered += 1


async def serve_mqtt(
    host: str, port: int, root: str, pre: bytes, post: bytes, stop: asyncio.Event, acks: bool = False
) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def client() -> MqttResponder:
        return MqttAckResponder(root, ready) if acks else MqttResponder(root, pre, post, ready)

    transport, _ = await loop.create_connection(client, host, port)
    await asyncio.wait_for(ready, 10)
    _ready(port)
    try:
        await stop.wait()
    finally:
        transport.write(mqtt.DISCONNECT_BYTES)
        transport.close()


def _ready(port: int) -> None:
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if args.kind in ("mqtt", "mqtt-ack"):
        pre, _, post = args.payload.partition(":")
        await serve_mqtt(
            args.host,
            args.port,
            args.root,
            bytes.fromhex(pre),
            bytes.fromhex(post),
            stop,
            args.kind == "mqtt-ack",
        )
        return
    payload = bytes.fromhex(args.payload)
    etag = bytes.fromhex(args.etag) if args.etag else None
    if args.kind in ("raw", "raw-drain"):
        await serve_raw(
            args.host, args.port, response_tail(payload, etag, args.max_age), stop, args.kind == "raw-drain"
        )
    elif (
        args.kind == "raw-post"
    ):  # P6: every POST gets a 2.04 with the payload (a report_ack), nothing stored
        await serve_raw(args.host, args.port, response_tail(payload, None, None), stop, True, POST, CHANGED)
    else:
        await serve_aiocoap(args.host, args.port, payload, etag, args.max_age, stop)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.harness.bench.servers", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("kind", choices=("raw", "raw-drain", "raw-post", "aiocoap", "mqtt", "mqtt-ack"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--payload", default="", help="response payload, hex (mqtt: PRE:POST around the token)")
    p.add_argument("--etag", default="", help="ETag option, hex (empty = none)")
    p.add_argument("--max-age", type=int, default=None)
    p.add_argument(
        "--root", default="bench/v1/d", help="mqtt: topic root answered (<root>/+/req, <root>/+/rpt)"
    )
    args = p.parse_args(argv)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
