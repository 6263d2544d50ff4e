"""The one place the gateway's CoAP socket meets aiocoap: the datagrams the fast path does not answer go in, and
aiocoap's answers come out.

What this relies on (aiocoap 0.4.17; ``tests/unit/gateway/test_coap_aiocoap.py`` fails when any of it changes):

1. ``aiocoap.Context(loop=, serversite=, loggername=)`` is a context with no transport, and
   ``Context._append_tokenmanaged_messagemanaged_transport(factory)`` is how aiocoap's own UDP transports (udp6,
   simple6, tinydtls) join one: aiocoap builds its token and message managers, awaits ``factory(mman)`` and uses
   the :class:`aiocoap.interfaces.MessageInterface` it returns. That underscore name is the only private one
   used; building ``TokenManager`` and ``MessageManager`` by hand instead would depend on five.
2. ``mman`` is an :class:`aiocoap.interfaces.MessageManager`: ``dispatch_message(message)`` takes an incoming
   message, decoded with the public ``aiocoap.Message.decode(data, remote)``.
3. aiocoap calls our interface's ``send(message)`` (we ``encode()`` it and the socket sends the bytes),
   ``shutdown()``, ``determine_remote(message)`` (None: the gateway sends no requests of its own) and
   ``recognize_remote(remote)`` (asked by aiocoap's message manager, though not part of the ABC).
4. :class:`Remote` is an :class:`aiocoap.interfaces.EndpointAddress` (every abstract property), equal and hashed
   by (host, port), like udp6's.
5. ``aiocoap.Message.encode()`` gives the bytes of a response (:func:`body`: the fast path sends them itself).

Nothing here reads or writes an attribute of an aiocoap object that is not public, and nothing subclasses anything
but the ABCs of ``aiocoap.interfaces``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import aiocoap
from aiocoap import interfaces
from aiocoap.numbers import COAP_PORT
from aiocoap.util import hostportjoin

__all__ = ["Bridge", "Remote", "attach", "body", "hostinfo", "Sender"]

log = logging.getLogger(__name__)


class Sender(Protocol):
    """The socket (gateway/frontends/coap_socket.py)."""

    address: tuple[str, int]

    def send(self, data: bytes, addr: Any, pktinfo: bytes | None = None) -> None: ...


class Remote(interfaces.EndpointAddress):
    """The peer of a datagram. ``sockaddr`` is what ``recvfrom`` returned; ``pktinfo`` the request's destination
    (wildcard binds); ``fast_key`` the fast path's table key when it may learn the answer to this request."""

    scheme = "coap"
    maximum_block_size_exp = 6  # 1024-byte blocks, as udp6

    def __init__(
        self, sockaddr: Any, bridge: Bridge, pktinfo: bytes | None = None, fast_key: bytes | None = None
    ) -> None:
        self.sockaddr = sockaddr
        self.pktinfo = pktinfo
        self.fast_key = fast_key
        self._bridge = bridge

    def __hash__(self) -> int:
        return hash(self.sockaddr[:2])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and self.sockaddr[:2] == other.sockaddr[:2]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.hostinfo}>"

    @property
    def interface(self) -> Bridge:
        return self._bridge

    @property
    def hostinfo(self) -> str:
        return hostinfo(self.sockaddr[0], self.sockaddr[1])

    @property
    def hostinfo_local(self) -> str:
        return hostinfo(*self._bridge.sock.address)

    @property
    def uri_base(self) -> str:
        return "coap://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coap://" + self.hostinfo_local

    @property
    def is_multicast(self) -> bool:
        return False  # the socket joins no group: a datagram always came from a unicast peer

    @property
    def is_multicast_locally(self) -> bool:
        return False

    @property
    def blockwise_key(self) -> Any:
        return self.sockaddr[:2]


def hostinfo(host: str, port: int) -> str:
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return str(hostportjoin(host, None if port == COAP_PORT else port))


class Bridge(interfaces.MessageInterface):
    """aiocoap's message interface over the gateway's socket (module doc): :meth:`feed` hands it a datagram,
    aiocoap sends through :meth:`send`. It is also the socket's datagram handler when the fast path is off."""

    def __init__(self, sock: Sender, on_shutdown: Callable[[], None]) -> None:
        self.sock = sock
        self.mman: interfaces.MessageManager | None = None
        self._on_shutdown = on_shutdown
        self.fed = 0  # datagrams handed to aiocoap
        self.unparsable = 0  # of which aiocoap could not decode

    def decode(
        self, data: bytes, addr: Any, pktinfo: bytes | None = None, fast_key: bytes | None = None
    ) -> aiocoap.Message:
        """The datagram as aiocoap's message (raises what aiocoap raises for junk)."""
        return aiocoap.Message.decode(data, Remote(addr, self, pktinfo, fast_key))

    def feed(
        self, data: bytes, addr: Any, pktinfo: bytes | None = None, fast_key: bytes | None = None
    ) -> None:
        """Hand one datagram to aiocoap's message layer."""
        mman = self.mman
        if mman is None:
            return
        self.fed += 1
        try:
            message = self.decode(data, addr, pktinfo, fast_key)
        except Exception:  # UnparsableMessage, and whatever else junk makes the decoder raise
            self.unparsable += 1
            log.debug("coap: ignoring an unparsable datagram from %s", hostinfo(addr[0], addr[1]))
            return
        try:
            mman.dispatch_message(message)
        except Exception:  # never let one datagram stop the reader
            log.exception("coap: dispatching a datagram from %s failed", message.remote.hostinfo)

    # -- the socket's handler when the fast path is off ------------------------------------------------------
    def begin(self) -> Callable[[bytes, Any, bytes | None], bytes | None]:
        return self.datagram

    def datagram(self, data: bytes, addr: Any, pktinfo: bytes | None) -> bytes | None:
        self.feed(data, addr, pktinfo)
        return None

    def end(self) -> None:
        pass

    # -- interfaces.MessageInterface ---------------------------------------------------------------------------
    def send(self, message: aiocoap.Message) -> None:
        remote = message.remote
        self.sock.send(message.encode(), remote.sockaddr, remote.pktinfo)

    async def shutdown(self) -> None:
        self.mman = None
        self._on_shutdown()

    async def determine_remote(self, message: aiocoap.Message) -> None:
        return None  # server only: the gateway sends no requests of its own over CoAP

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, Remote) and remote.interface is self


async def attach(ctx: aiocoap.Context, bridge: Bridge) -> Bridge:
    """Make ``bridge`` the transport of ``ctx`` (contract point 1)."""

    async def factory(mman: interfaces.MessageManager) -> Bridge:
        bridge.mman = mman
        return bridge

    await ctx._append_tokenmanaged_messagemanaged_transport(factory)
    return bridge


def body(response: aiocoap.Message) -> tuple[int, bytes]:
    """(code, what follows the token) of a response, as aiocoap encodes it."""
    response.mtype, response.mid, response.token = aiocoap.ACK, 0, b""
    raw = response.encode()
    return raw[1], raw[4:]
