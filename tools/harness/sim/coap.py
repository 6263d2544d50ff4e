"""CoAP (RFC 7252) for thousands of simulated devices in one asyncio process.

aiocoap costs far too much per message for a 10,000-device fleet (it builds message objects, runs a task per
request and keeps per-remote state), so the light simulator moves bytes over raw asyncio UDP endpoints and leaves
the message layer to :class:`proto.coap.Client` (one per socket):

* confirmable requests with a 4-byte token and a per-socket Message ID;
* retransmission as RFC 7252 says: first timeout ACK_TIMEOUT x random(1, ACK_RANDOM_FACTOR), doubling, at most
  MAX_RETRANSMIT retransmissions of the same datagram (same Message ID, so the server's de-duplication
  answers them from its cache), then the exchange fails with :data:`NO_RESPONSE`;
* piggybacked responses matched by token; an empty ACK stops the retransmissions and the response then comes
  separately (CON, acknowledged here, or NON) within SEPARATE_TIMEOUT; a RST fails the exchange (:data:`RESET`);
* answers for an exchange already given up are counted as ``late`` and dropped (a CON one is rejected with RST).

Devices share ``sockets`` connected UDP sockets (device ``i`` uses socket ``i % sockets``), like devices behind a
few NAT addresses; Message IDs and tokens are per socket, so they never collide. :func:`report_template` and
:func:`resolve_template` are a device's two requests.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from proto.coap import Client, RequestTemplate, request_template, uint_value
from proto.coap.client import Acknowledged, Reset, Response
from proto.coap.numbers import ContentFormat, Option, Timing
from tools.harness.sim.stats import Counters

__all__ = [
    "CoapClient",
    "NO_RESPONSE",
    "RESET",
    "ACK_TIMEOUT",
    "MAX_RETRANSMIT",
    "POST",
    "GET",
    "TOKEN_LEN",
    "report_template",
    "resolve_template",
]

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
SEPARATE_TIMEOUT = 30.0  # after an empty ACK: how long to wait for the separate response
NO_RESPONSE = -1  # pseudo codes handed to on_done
RESET = -2
GET, POST = 0x01, 0x02
TOKEN_LEN = 4

# on_done(code, datagram, latency_ms): code is the CoAP code byte (0x44 = 2.04) or NO_RESPONSE / RESET, in
# which case datagram is b"".
OnDone = Callable[[int, bytes, float], None]


def _path(ident: str) -> list[str]:
    prefix, _, suffix = ident.partition("/")
    return [prefix, *suffix.split("/")]


def report_template(ident: str) -> RequestTemplate:
    """``POST /d/<id>/rpt`` with Content-Format 60 (the report is the payload)."""
    cf = (int(Option.CONTENT_FORMAT), uint_value(ContentFormat.CBOR))
    return request_template(("d", *_path(ident), "rpt"), code=POST, token_len=TOKEN_LEN, options=(cf,))


def resolve_template(ident: str, etag: bytes | None = None) -> RequestTemplate:
    """``GET /r/<id>``, with the ETag of the last answer when there is one."""
    opts = [(int(Option.ETAG), etag)] if etag else []
    return request_template(("r", *_path(ident)), token_len=TOKEN_LEN, options=opts)


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, client: CoapClient, exchanges: Client) -> None:
        self.client = client
        self.exchanges = exchanges
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and the like
        self.client.counters.errors += 1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client.on_datagram(self, data)


def _same(s: _Socket) -> _Socket:
    return s


class CoapClient:
    """Confirmable requests to one server from ``sockets`` UDP sockets."""

    def __init__(
        self, host: str, port: int, sockets: int, counters: Counters, rng: random.Random | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.n_sockets = max(1, sockets)
        self.counters = counters
        self.rng = rng or random.Random()
        self.socks: list[_Socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(self.n_sockets):
            exchanges = Client(
                token_prefix=self.rng.randbytes(TOKEN_LEN - 2),
                rng=self.rng,
                timing=Timing(ACK_TIMEOUT, ACK_RANDOM_FACTOR, MAX_RETRANSMIT),
                separate_timeout=SEPARATE_TIMEOUT,
            )
            s = _Socket(self, exchanges)
            await loop.create_datagram_endpoint(
                partial(_same, s), remote_addr=(self.host, self.port), family=family
            )
            self.socks.append(s)

    @property
    def in_flight(self) -> int:
        return sum(s.exchanges.in_flight for s in self.socks)

    def close(self) -> None:
        """Close every socket; exchanges still open are dropped without calling back."""
        for s in self.socks:
            if s.timer is not None:
                s.timer.cancel()
            for ex in list(s.exchanges.exchanges.values()):
                s.exchanges.cancel(ex)
            if s.transport is not None:
                s.transport.close()
        self.socks.clear()

    def request(self, sock_index: int, template: RequestTemplate, payload: bytes, on_done: OnDone) -> None:
        """Send ``template`` (with ``payload``, may be empty); ``on_done`` gets the outcome."""
        s = self.socks[sock_index % len(self.socks)]
        assert self._loop is not None and s.transport is not None
        ex = s.exchanges.request(template, self._loop.time(), payload, on_done)
        s.transport.sendto(ex.datagram)
        self._arm(s)

    def _arm(self, s: _Socket) -> None:
        due = s.exchanges.next_timeout()
        if due is None or due >= s.timer_at:
            return
        if s.timer is not None:
            s.timer.cancel()
        assert self._loop is not None
        s.timer_at = due
        s.timer = self._loop.call_at(due, self._timeouts, s)

    def _timeouts(self, s: _Socket) -> None:
        assert self._loop is not None and s.transport is not None
        s.timer, s.timer_at = None, math.inf
        now = self._loop.time()
        again, gone = s.exchanges.timeouts(now)
        for datagram in again:
            self.counters.retransmits += 1
            s.transport.sendto(datagram)
        for ex in gone:
            ex.context(NO_RESPONSE, b"", (now - ex.sent_at) * 1000.0)
        self._arm(s)

    def on_datagram(self, s: _Socket, data: bytes) -> None:
        assert self._loop is not None
        now = self._loop.time()
        ev = s.exchanges.receive(data, now)
        if ev.reply and s.transport is not None:
            s.transport.sendto(ev.reply)
        if type(ev) is Response:
            ev.exchange.context(ev.code, data, (now - ev.exchange.sent_at) * 1000.0)
        elif type(ev) is Reset:
            ev.exchange.context(RESET, b"", (now - ev.exchange.sent_at) * 1000.0)
        elif type(ev) is not Acknowledged and len(data) >= 4 and data[1] >= 0x40:  # nobody waits for it
            self.counters.late += 1
