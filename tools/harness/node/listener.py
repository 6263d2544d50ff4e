"""The node's native side on the network: UDP **and** TCP on one port, as HANDLE.NET listens.

UDP answers larger than 512 bytes are cut into datagrams as HANDLE.NET cuts them
(:func:`proto.handle.split_datagrams`); multi-datagram requests are reassembled (pieces of one request that
do not all arrive within ``REASSEMBLY_TIMEOUT`` are forgotten). Over TCP a connection may carry several
requests; each is answered in turn. What is answered is :func:`tools.harness.node.native.answer`'s call,
after the node's fault knobs (:meth:`NodeServer.decide`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from gateway.logfmt import kv
from proto.handle import (
    HandleFormatError,
    Reassembler,
    StreamFramer,
    decode_envelope,
    encode_truncated,
    split_datagrams,
)
from proto.handle.numbers import ENVELOPE_SIZE, MAX_UDP_MESSAGE_SIZE, RC_ERROR, RC_SERVER_BUSY
from tools.harness.node.address import Address, NodeError, format_hostport, resolve_host
from tools.harness.node.faults import Fault
from tools.harness.node.native import Incoming, NotARequest, Outgoing, answer, error_answer, read_request
from tools.support.tasks import TaskSet

if TYPE_CHECKING:
    from tools.harness.node.server import NodeServer

__all__ = ["NativeListener", "REASSEMBLY_TIMEOUT", "FAILURE_TEXT", "BUSY_TEXT"]

log = logging.getLogger("tools.harness.node")

REASSEMBLY_TIMEOUT = 5.0  # seconds the pieces of a multi-datagram request are kept
MAX_PARTIAL_REQUESTS = 1024
TCP_READ = 64 << 10
FAILURE_TEXT = "simulated failure"
BUSY_TEXT = "server busy (simulated)"


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, listener: NativeListener) -> None:
        self._listener = listener

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._listener.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable from a client that left
        log.debug("node.udp.error %s", kv(error=exc))


class NativeListener:
    """Serves ``node`` over the Handle native protocol once :meth:`start` has bound it."""

    def __init__(self, node: NodeServer) -> None:
        self.node = node
        self.address: Address | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks = TaskSet()
        self._partials: dict[tuple[Any, int], tuple[Reassembler, float]] = {}
        self._stopping = False

    async def start(self, host: str, port: int) -> Address:
        """Listen on ``host:port`` over TCP and UDP (port 0: one number free for both); NodeError if not."""
        loop = asyncio.get_running_loop()
        host = await resolve_host(host, port)
        where = format_hostport((host, port))
        for _ in range(20 if port == 0 else 1):
            try:
                tcp = await asyncio.start_server(self._on_tcp, host, port, reuse_address=True)
            except OSError as e:
                raise NodeError(f"cannot listen on {where} (tcp): {e.strerror or e}") from None
            real = int(tcp.sockets[0].getsockname()[1])
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(host, real)
                )
            except OSError as e:
                tcp.close()
                await tcp.wait_closed()
                if port != 0:
                    raise NodeError(f"cannot listen on {where} (udp): {e.strerror or e}") from None
                continue
            self._tcp, self._udp = tcp, cast(asyncio.DatagramTransport, udp)
            self.address = (host, real)
            return self.address
        raise NodeError(f"no port free for both TCP and UDP on {host}")

    async def stop(self) -> None:
        """Close both listeners and every connection; requests in flight are dropped."""
        self._stopping = True
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        await self._tasks.cancel()
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None

    def _outcome(self, incoming: Incoming, fault: Fault) -> Outgoing | None:
        """The answer after the fault dice: None = dropped (counted)."""
        if fault is Fault.DROP:
            self.node.stats.dropped["failure"] += 1
            return None
        if fault is Fault.ERROR:
            return error_answer(incoming.message, RC_ERROR, FAILURE_TEXT)
        if fault is Fault.BUSY:
            return error_answer(incoming.message, RC_SERVER_BUSY, BUSY_TEXT)
        return answer(self.node.store, incoming, self.node.admin)

    # -- UDP -----------------------------------------------------------------------------------------
    def _whole_udp_message(self, data: bytes, addr: Any) -> bytes | None:
        """The complete message ``data`` is or completes, None while pieces are missing."""
        env = decode_envelope(data, max_size=MAX_UDP_MESSAGE_SIZE)
        if env.sequence == 0 and env.message_length == len(data) - ENVELOPE_SIZE:
            return data
        now = time.monotonic()
        key = (addr, env.request_id)
        entry = self._partials.get(key)
        if entry is None:
            for k in [k for k, (_, t) in self._partials.items() if now - t > REASSEMBLY_TIMEOUT]:
                del self._partials[k]
            if len(self._partials) >= MAX_PARTIAL_REQUESTS:
                raise HandleFormatError("too many multi-datagram requests in progress")
            entry = (Reassembler(env.request_id, max_size=MAX_UDP_MESSAGE_SIZE), now)
            self._partials[key] = entry
        try:
            whole = entry[0].feed(data)
        except HandleFormatError:
            del self._partials[key]
            raise
        if whole is not None:
            del self._partials[key]
        return whole

    def on_datagram(self, data: bytes, addr: Any) -> None:
        node = self.node
        t0 = time.perf_counter()
        try:
            whole = self._whole_udp_message(data, addr)
        except HandleFormatError as e:
            node.stats.dropped["malformed"] += 1
            log.debug("node.udp.drop %s", kv(peer=addr, bytes=len(data), reason=e))
            return
        if whole is None:
            return
        node.stats.requests["udp"] += 1
        if node.knobs.silent:
            node.stats.dropped["silent"] += 1
            return
        try:
            incoming = read_request(whole)
        except NotARequest as e:
            node.stats.dropped["malformed"] += 1
            log.debug("node.udp.drop %s", kv(peer=addr, bytes=len(data), reason=e))
            return
        fault, delay = node.decide()
        if delay > 0:
            self._tasks.spawn(self._udp_answer_later(delay, incoming, fault, addr, t0))
        else:
            self._udp_answer(incoming, fault, addr, t0)

    async def _udp_answer_later(
        self, delay: float, incoming: Incoming, fault: Fault, addr: Any, t0: float
    ) -> None:
        await asyncio.sleep(delay)
        self._udp_answer(incoming, fault, addr, t0)

    def _udp_answer(self, incoming: Incoming, fault: Fault, addr: Any, t0: float) -> None:
        node, udp = self.node, self._udp
        rid = incoming.message.envelope.request_id
        if udp is None or udp.is_closing():
            return
        if node.knobs.silent:  # went silent while this answer was delayed
            node.stats.dropped["silent"] += 1
            return
        out = self._outcome(incoming, fault)
        if out is None:
            node.log_request("udp", addr, rid, "", "dropped", 0, fault, t0)
            return
        if node.knobs.truncate and fault is Fault.NONE:
            pieces = [encode_truncated(incoming.message)]
            node.stats.truncated += 1
            outcome = "TC"
        else:
            pieces = split_datagrams(out.data)
            node.stats.answers[out.code] += 1
            outcome = str(out.code)
        for p in pieces:
            udp.sendto(p, addr)
        node.stats.datagrams_sent += len(pieces)
        node.log_request("udp", addr, rid, out.handle, outcome, out.values, fault, t0)

    # -- TCP -----------------------------------------------------------------------------------------
    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # stop() cancels it
        peer = writer.get_extra_info("peername")
        framer = StreamFramer()
        try:
            while not self._stopping:
                chunk = await reader.read(TCP_READ)
                if not chunk:
                    return
                try:
                    frames = framer.feed(chunk)
                except HandleFormatError as e:
                    self.node.stats.dropped["malformed"] += 1
                    log.debug("node.tcp.drop %s", kv(peer=peer, reason=e))
                    return
                for frame in frames:
                    if not await self._tcp_answer(frame, writer, peer):
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (Python 3.11's stream callback logs a re-raise)
            return
        finally:
            writer.close()

    async def _tcp_answer(self, frame: bytes, writer: asyncio.StreamWriter, peer: Any) -> bool:
        """Answer one framed request; False = close the connection."""
        node = self.node
        t0 = time.perf_counter()
        node.stats.requests["tcp"] += 1
        if node.knobs.silent:
            node.stats.dropped["silent"] += 1
            return True
        try:
            incoming = read_request(frame)
        except NotARequest as e:
            node.stats.dropped["malformed"] += 1
            log.debug("node.tcp.drop %s", kv(peer=peer, reason=e))
            return True
        fault, delay = node.decide()
        if delay > 0:
            await asyncio.sleep(delay)
        if node.knobs.silent:
            node.stats.dropped["silent"] += 1
            return True
        rid = incoming.message.envelope.request_id
        out = self._outcome(incoming, fault)
        if out is None:
            node.log_request("tcp", peer, rid, "", "dropped", 0, fault, t0)
            return False
        writer.write(out.data)
        await writer.drain()
        node.stats.answers[out.code] += 1
        node.log_request("tcp", peer, rid, out.handle, str(out.code), out.values, fault, t0)
        return True
