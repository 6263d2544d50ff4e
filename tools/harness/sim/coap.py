"""A tiny CoAP (RFC 7252) client for thousands of simulated devices in one asyncio process.

aiocoap costs far too much per message for a 10,000-device fleet (it builds message objects, runs a task per
request and keeps per-remote state), so the light simulator speaks the few bytes it needs itself, on raw
asyncio UDP endpoints:

* confirmable requests with a 4-byte token and a per-socket Message ID;
* retransmission as RFC 7252 says: first timeout ACK_TIMEOUT x random(1, ACK_RANDOM_FACTOR), doubling, at most
  MAX_RETRANSMIT retransmissions of the same datagram (same Message ID, so the server's de-duplication
  answers them from its cache), then the exchange fails with :data:`NO_RESPONSE`;
* piggybacked responses (ACK carrying the code) matched by token; an empty ACK stops the retransmissions and
  the response then comes separately (CON, acknowledged here, or NON), still matched by token; a RST fails the
  exchange;
* answers for an exchange already given up are counted as ``late`` and dropped (a CON one is still ACKed).

Devices share ``sockets`` connected UDP sockets (device ``i`` uses socket ``i % sockets``), like devices
behind a few NAT addresses; Message IDs and tokens are per socket, so they never collide. Encoding of options
comes from ``tools.harness.bench.coapmsg`` (the bench load generator's CoAP bytes).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from tools.harness.bench.coapmsg import ACK, CON, NON, RST, parse_header
from tools.harness.sim.stats import Counters

__all__ = ["CoapClient", "NO_RESPONSE", "RESET", "ACK_TIMEOUT", "MAX_RETRANSMIT", "POST", "GET"]

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
SEPARATE_TIMEOUT = 30.0  # after an empty ACK: how long to wait for the separate response
NO_RESPONSE = -1  # pseudo codes handed to on_done
RESET = -2
GET, POST = 0x01, 0x02
_H = struct.Struct("!BBH")
_perf = time.perf_counter

# on_done(code, datagram, latency_ms): code is the CoAP code byte (0x44 = 2.04) or NO_RESPONSE / RESET, in
# which case datagram is b"".
OnDone = Callable[[int, bytes, float], None]


class _Exchange:
    __slots__ = ("sock", "token", "mid", "data", "attempts", "timeout", "timer", "t0", "on_done")

    def __init__(
        self, sock: _Socket, token: bytes, mid: int, data: bytes, on_done: OnDone, timeout: float
    ) -> None:
        self.sock = sock
        self.token = token
        self.mid = mid
        self.data = data
        self.on_done = on_done
        self.attempts = 0
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = _perf()


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, client: CoapClient) -> None:
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.by_token: dict[bytes, _Exchange] = {}
        self.by_mid: dict[int, _Exchange] = {}
        self.mid = client.rng.randrange(0x10000)
        self.tok = client.rng.randrange(0x100000000)

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
            s = _Socket(self)
            await loop.create_datagram_endpoint(
                partial(_same, s), remote_addr=(self.host, self.port), family=family
            )
            self.socks.append(s)

    @property
    def in_flight(self) -> int:
        return sum(len(s.by_token) for s in self.socks)

    def close(self) -> None:
        """Close every socket; exchanges still open are dropped without calling back."""
        for s in self.socks:
            for ex in s.by_token.values():
                if ex.timer is not None:
                    ex.timer.cancel()
            s.by_token.clear()
            s.by_mid.clear()
            if s.transport is not None:
                s.transport.close()
        self.socks.clear()

    def request(self, sock_index: int, code: int, options: bytes, payload: bytes, on_done: OnDone) -> None:
        """Send a confirmable request (``options`` already encoded, ``payload`` may be empty)."""
        s = self.socks[sock_index % len(self.socks)]
        s.mid = (s.mid + 1) & 0xFFFF
        s.tok = (s.tok + 1) & 0xFFFFFFFF
        token = s.tok.to_bytes(4, "big")
        data = (
            _H.pack(0x40 | CON << 4 | 4, code, s.mid)
            + token
            + options
            + (b"\xff" + payload if payload else b"")
        )
        ex = _Exchange(s, token, s.mid, data, on_done, ACK_TIMEOUT * self.rng.uniform(1.0, ACK_RANDOM_FACTOR))
        s.by_token[token] = ex
        s.by_mid[s.mid] = ex
        assert self._loop is not None and s.transport is not None
        ex.timer = self._loop.call_later(ex.timeout, self._retransmit, ex)
        s.transport.sendto(data)

    def _retransmit(self, ex: _Exchange) -> None:
        s = ex.sock
        if s.by_token.get(ex.token) is not ex:
            return
        if ex.attempts >= MAX_RETRANSMIT:
            self._finish(ex, NO_RESPONSE, b"")
            return
        ex.attempts += 1
        ex.timeout *= 2
        self.counters.retransmits += 1
        assert self._loop is not None and s.transport is not None
        ex.timer = self._loop.call_later(ex.timeout, self._retransmit, ex)
        s.transport.sendto(ex.data)

    def _separate_timeout(self, ex: _Exchange) -> None:
        if ex.sock.by_token.get(ex.token) is ex:
            self._finish(ex, NO_RESPONSE, b"")

    def _finish(self, ex: _Exchange, code: int, data: bytes) -> None:
        s = ex.sock
        s.by_token.pop(ex.token, None)
        if s.by_mid.get(ex.mid) is ex:
            del s.by_mid[ex.mid]
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        ex.on_done(code, data, (_perf() - ex.t0) * 1000.0)

    def on_datagram(self, s: _Socket, data: bytes) -> None:
        h = parse_header(data)
        if h is None:
            return
        mtype, code, mid, token = h
        if code == 0:  # empty message
            if mtype == CON:  # a CoAP ping: answer RST
                self._send_empty(s, RST, mid)
                return
            ex = s.by_mid.get(mid)
            if ex is None:
                return
            if mtype == RST:
                self._finish(ex, RESET, b"")
            elif mtype == ACK:  # the response comes separately: stop retransmitting, keep waiting for it
                del s.by_mid[mid]
                if ex.timer is not None:
                    ex.timer.cancel()
                assert self._loop is not None
                ex.timer = self._loop.call_later(SEPARATE_TIMEOUT, self._separate_timeout, ex)
            return
        if code < 0x40:  # a request sent to us: not served here
            if mtype == CON:
                self._send_empty(s, RST, mid)
            return
        ex = s.by_token.get(token)
        if mtype == CON:
            self._send_empty(s, ACK if ex is not None else RST, mid)
        if ex is None or (mtype == ACK and mid != ex.mid) or mtype == RST:
            self.counters.late += 1
            return
        if mtype == NON or mtype == CON or mtype == ACK:
            self._finish(ex, code, data)

    @staticmethod
    def _send_empty(s: _Socket, mtype: int, mid: int) -> None:
        if s.transport is not None:
            s.transport.sendto(_H.pack(0x40 | mtype << 4, 0, mid))
