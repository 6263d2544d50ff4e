"""The CoAP front end's UDP socket: it binds, reads every datagram queued per wake-up of the event loop, hands each
to a handler, sends what the handler answers, and holds answers back while the socket is full.

On every wake-up it reads at most ``DRAIN_MAX`` datagrams; ``handler.begin()`` gives the function that takes
each (``(data, addr, pktinfo)`` -> the bytes to send back, or None), and ``handler.end()`` closes the wake-up. The handler is the
fast path (gateway/frontends/coap_fast.py) or, without it, aiocoap's bridge (gateway/frontends/coap_aiocoap.py).

A specific bind address is served with ``recvfrom`` / ``sendto``. A wildcard bind (``::``, ``0.0.0.0``) is served
with ``recvmsg`` / ``sendmsg`` and the packet-info ancillary data, so that an answer leaves from the address the
request was sent to (as aiocoap's udp6 transport does). ``SO_REUSEPORT`` is set, as aiocoap did, so several
gateway processes can share the port. ICMP errors are not read (no ``IP_RECVERR``): a CON sent to a peer that went
away times out by retransmission instead of failing at once.

Back-pressure: a send the kernel will not take now is queued (at most ``BACKLOG_MAX``, then dropped and counted in
``dropped``) and the queue is written out in order when the socket is writable; while it is not empty,
:attr:`CoapSocket.backlog` is true and the fast path answers nothing itself.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["CoapSocket", "DatagramHandler", "DRAIN_MAX"]

log = logging.getLogger(__name__)

DRAIN_MAX = 256  # datagrams read per wake-up before other callbacks get their turn
RECV_SIZE = 65535  # never truncate a datagram (a truncated CoAP message would be misread)
ANC_SIZE = 128  # room for one in6_pktinfo control message
RCVBUF = 1 << 20  # absorb bursts from many devices
BACKLOG_MAX = 4096
_WILDCARDS = ("", "::", "0.0.0.0", "::ffff:0.0.0.0")


class DatagramHandler(Protocol):
    def begin(self) -> Callable[[bytes, Any, bytes | None], bytes | None]:
        """A wake-up starts: the function for each of its datagrams, which returns the bytes to send back to
        ``addr`` (from ``pktinfo``), or None."""

    def end(self) -> None:
        """The wake-up's datagrams were read (also after one raised)."""


def _anc(pktinfo: bytes) -> list[tuple[int, int, bytes]]:
    return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]


def _put(sock: socket.socket, data: bytes, addr: Any, anc: list[Any]) -> None:
    """One datagram out (from the packet-info address when ``anc``); BlockingIOError when the socket is full."""
    if anc:
        sock.sendmsg((data,), anc, 0, addr)
    else:
        sock.sendto(data, addr)


class CoapSocket:
    """Owns the UDP socket (module doc): ``await open(host, port)``, then ``serve(handler)``; ``close()``."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._pktinfo = False  # a wildcard bind: recvmsg / sendmsg with packet info
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: DatagramHandler | None = None
        self.backlog: collections.deque[tuple[bytes, Any, list[Any]]] = collections.deque()
        self.address: tuple[str, int] = ("", 0)
        self.dropped = 0  # answers the socket would not take

    @property
    def pktinfo(self) -> bool:
        return self._pktinfo

    async def open(self, host: str, port: int, *, reuse_port: bool = True) -> tuple[str, int]:
        """Bind ``host:port`` (port 0 = any free port); the bound (host, port)."""
        self._loop = asyncio.get_running_loop()
        self._sock, self._pktinfo = await _bind(self._loop, host, port, reuse_port)
        self.address = (host, int(self._sock.getsockname()[1]))
        return self.address

    def serve(self, handler: DatagramHandler) -> None:
        assert self._loop is not None and self._sock is not None
        self._handler = handler
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
                self._loop.remove_writer(sock.fileno())
            sock.close()
        self.backlog.clear()

    # -- sending -------------------------------------------------------------------------------------------
    def send(self, data: bytes, addr: Any, pktinfo: bytes | None = None) -> None:
        """Send one datagram; when the socket buffer is full, queue it until the socket is writable."""
        sock = self._sock
        if sock is None:
            return
        anc = _anc(pktinfo) if self._pktinfo and pktinfo else []
        if self.backlog:
            self._queue(data, addr, anc)
            return
        try:
            _put(sock, data, addr, anc)
        except (BlockingIOError, InterruptedError):
            self._queue(data, addr, anc)
        except OSError as e:  # e.g. an unreachable peer address
            self.dropped += 1
            log.debug("coap send to %s failed: %s", addr, e)

    def _queue(self, data: bytes, addr: Any, anc: list[Any]) -> None:
        if len(self.backlog) >= BACKLOG_MAX:
            self.dropped += 1
            return
        self.backlog.append((data, addr, anc))
        if len(self.backlog) == 1 and self._loop is not None and self._sock is not None:
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        sock = self._sock
        while self.backlog and sock is not None:
            data, addr, anc = self.backlog[0]
            try:
                _put(sock, data, addr, anc)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped += 1
            self.backlog.popleft()
        if sock is not None and self._loop is not None:
            self._loop.remove_writer(sock.fileno())

    # -- receiving -----------------------------------------------------------------------------------------
    def _readable(self) -> None:
        """Read every queued datagram (at most DRAIN_MAX), hand each to the handler, send its answers."""
        sock = self._sock
        handler = self._handler
        if sock is None or handler is None:
            return
        pk = self._pktinfo
        recvfrom = sock.recvfrom
        recvmsg = sock.recvmsg
        sendto = sock.sendto
        backlog = self.backlog
        anc: list[Any] = []
        pktinfo: bytes | None = None
        on = handler.begin()
        try:
            for _ in range(DRAIN_MAX):
                try:
                    if pk:
                        data, cmsgs, _flags, addr = recvmsg(RECV_SIZE, ANC_SIZE)
                        pktinfo = cmsgs[0][2] if cmsgs else None
                        anc = _anc(pktinfo) if pktinfo else []
                    else:
                        data, addr = recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.EBADF, errno.ENOTSOCK):
                        return
                    continue  # an error queued on the socket: the next read gets the next datagram
                out = on(data, addr, pktinfo)
                if out is None:
                    continue
                if backlog:
                    self._queue(out, addr, anc)
                    continue
                try:
                    if pk:
                        _put(sock, out, addr, anc)
                    else:
                        sendto(out, addr)
                except (BlockingIOError, InterruptedError):
                    self._queue(out, addr, anc)  # the socket is full: the rest of this batch waits in order
                except OSError:
                    self.dropped += 1
        finally:
            handler.end()


async def _bind(
    loop: asyncio.AbstractEventLoop, host: str, port: int, reuse_port: bool
) -> tuple[socket.socket, bool]:
    """A non-blocking UDP socket bound to ``host:port``; True when it is a wildcard bind served with pktinfo."""
    wildcard = host in _WILDCARDS
    if wildcard:
        family = socket.AF_INET6
        addr: Any = ("::" if host in ("", "::") else "::ffff:0.0.0.0", port, 0, 0)
    else:
        try:
            ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            infos = await loop.getaddrinfo(host.strip("[]"), port, family=family, type=socket.SOCK_DGRAM)
        except ValueError:  # a name
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
        family, addr = infos[0][0], infos[0][4]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if wildcard:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        sock.setblocking(False)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, wildcard
