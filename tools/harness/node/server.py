"""`NodeServer`: a local recursive Handle node, in-process (tests, benchmarks, demo) or behind `ida node`.

It serves a :class:`RecordStore` over the Handle native protocol -- UDP **and** TCP on one port, as
HANDLE.NET does -- and over the Handle REST API (aiohttp), with the fault knobs of
:mod:`tools.harness.node.faults`. Use::

    async with NodeServer(handle="127.0.0.1:0", http="127.0.0.1:0") as node:
        client = HandleClient(*node.handle_address)
        node.knobs.busy_rate = 1.0          # from now on every request is answered "busy"
        node.remove_record("88.123.99/PUMP-0001")

UDP answers larger than 512 bytes are cut into datagrams as HANDLE.NET cuts them
(:func:`proto.handle.codec.split_datagrams`); multi-datagram requests are reassembled (pieces of one
request that do not all arrive within ``REASSEMBLY_TIMEOUT`` are forgotten). Over TCP a connection may
carry several requests; each is answered in turn.

Counters are in :attr:`NodeServer.stats`: requests per protocol (``udp``, ``tcp``, ``http``; a UDP request
counts once however many datagrams it took), answers per response code (native RC or REST
``responseCode``), dropped requests per reason (``silent``, ``failure``, ``malformed``), UDP answers sent
truncated, and datagrams sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web

from gateway.errors import ProtocolError
from proto.handle.codec import Reassembler, StreamFramer, decode_envelope, encode_truncated, split_datagrams
from proto.handle.numbers import DEFAULT_PORT, ENVELOPE_SIZE, MAX_UDP_MESSAGE_SIZE, RC_ERROR, RC_SERVER_BUSY
from proto.records import Record
from tools.harness.node.faults import DropConnection, Fault, Knobs
from tools.harness.node.native import Incoming, NotARequest, Outgoing, answer, error_answer, read_request
from tools.harness.node.rest import make_app
from tools.harness.node.store import RecordStore, sample_records

__all__ = ["NodeServer", "NodeStats", "NodeError", "parse_hostport", "format_hostport", "DEFAULT_HTTP_PORT"]

log = logging.getLogger("tools.harness.node")

DEFAULT_HTTP_PORT = 8000  # HANDLE.NET's default HTTP interface port
REASSEMBLY_TIMEOUT = 5.0  # seconds the pieces of a multi-datagram request are kept
MAX_PARTIAL_REQUESTS = 1024
TCP_READ = 64 << 10
HTTP_SHUTDOWN_TIMEOUT = 0.5  # seconds stop() lets REST requests in flight finish
FAILURE_TEXT = "simulated failure"
BUSY_TEXT = "server busy (simulated)"

Address = tuple[str, int]


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/+@%[],")


def kv(**fields: Any) -> str:
    """``key=value`` pairs (values with other characters double-quoted; None left out), as gateway logs."""
    out = []
    for k, v in fields.items():
        if v is None:
            continue
        s = str(v)
        if not s or any(c not in _PLAIN for c in s):
            s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        out.append(f"{k}={s}")
    return " ".join(out)


class NodeError(RuntimeError):
    """The node cannot start (an address in use, a host that does not resolve)."""


def parse_hostport(text: str, default_port: int, default_host: str = "127.0.0.1") -> Address:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (port 0 = any free port); ValueError otherwise."""
    s = text.strip()
    if not s:
        raise ValueError("empty address (expected HOST:PORT)")
    host, port_text = default_host, ""
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or (end + 1 < len(s) and s[end + 1] != ":"):
            raise ValueError(f"address {text!r}: expected [IPv6]:PORT")
        host, port_text = s[1:end], s[end + 2 :]
    elif s.count(":") == 1:
        h, port_text = s.split(":")
        host = h or default_host
    elif ":" in s:
        raise ValueError(f"address {text!r}: put an IPv6 address in brackets, e.g. [::1]:{default_port}")
    elif s.isdigit():
        port_text = s
    else:
        host = s
    if not host:
        raise ValueError(f"address {text!r}: empty host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {text!r}: port must be a number 0-65535")
    return host, int(port_text)


def format_hostport(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class NodeStats:
    """Counters of one node (see the module docstring)."""

    requests: Counter[str] = field(default_factory=Counter)
    answers: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    datagrams_sent: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "answers": {str(k): v for k, v in sorted(self.answers.items())},
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "datagrams_sent": self.datagrams_sent,
        }

    def summary(self) -> str:
        """One line: ``requests udp=3 tcp=1 http=2; answers 1=5 100=1; dropped -; truncated 0``."""

        def pairs(c: Counter[Any]) -> str:
            return " ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv_: str(kv_[0]))) or "-"

        return (
            f"requests {pairs(self.requests)}; answers {pairs(self.answers)}; "
            f"dropped {pairs(self.dropped)}; truncated {self.truncated}"
        )


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: NodeServer) -> None:
        self._node = node

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._node._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable from a client that left
        log.debug("node.udp.error %s", kv(error=exc))


class NodeServer:
    """A simulated recursive node. ``records`` defaults to the built-in sample set; ``handle`` / ``http``
    are ``"HOST:PORT"`` or ``(host, port)`` bind addresses (port 0 = any free port; None = that side off).
    ``prefixes`` are hosted in addition to those of the records. ``seed`` makes the fault dice repeatable.
    ``log_requests`` logs one line per request (logger ``tools.harness.node``, INFO).
    """

    def __init__(
        self,
        records: Iterable[Record | dict[str, Any]] | None = None,
        *,
        handle: str | Address | None = "127.0.0.1:0",
        http: str | Address | None = "127.0.0.1:0",
        knobs: Knobs | None = None,
        prefixes: Iterable[str] = (),
        seed: int | None = None,
        log_requests: bool = False,
    ) -> None:
        self.store = RecordStore(sample_records() if records is None else records, prefixes)
        self.knobs = knobs if knobs is not None else Knobs()
        self.knobs.check()
        self.stats = NodeStats()
        self.log_requests = log_requests
        self._handle_bind = parse_hostport(handle, DEFAULT_PORT) if isinstance(handle, str) else handle
        self._http_bind = parse_hostport(http, DEFAULT_HTTP_PORT) if isinstance(http, str) else http
        self._rng = random.Random(seed)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self.handle_address: Address | None = None
        self.http_address: Address | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._partials: dict[tuple[Any, int], tuple[Reassembler, float]] = {}
        self._started = False
        self._stopping = False

    # -- records -------------------------------------------------------------------------------------
    def add_record(self, record: Record | dict[str, Any]) -> Record:
        """Add or replace a record (Record or Handle REST JSON); served from the next request on."""
        return self.store.add(record)

    def remove_record(self, handle: str) -> bool:
        """Remove a record; the handle is then "not found" (100). False if it was not there."""
        return self.store.remove(handle)

    def get_record(self, handle: str) -> Record | None:
        return self.store.get(handle)

    # -- silence -------------------------------------------------------------------------------------
    @property
    def silent(self) -> bool:
        return self.knobs.silent

    def set_silent(self, on: bool) -> None:
        """Drop every request from now on (``True``) or answer again (``False``)."""
        if on != self.knobs.silent:
            log.info("node.silent %s", kv(on=on))
        self.knobs.silent = on

    def toggle_silent(self) -> bool:
        """Flip silence (SIGUSR1 in the CLI); returns the new state."""
        self.set_silent(not self.knobs.silent)
        return self.knobs.silent

    # -- addresses -----------------------------------------------------------------------------------
    @property
    def handle_url(self) -> str:
        """``hdl://host:port`` of the native side (after :meth:`start`)."""
        if self.handle_address is None:
            raise RuntimeError("the native side is not listening")
        return f"hdl://{format_hostport(self.handle_address)}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the REST side (after :meth:`start`)."""
        if self.http_address is None:
            raise RuntimeError("the REST side is not listening")
        return f"http://{format_hostport(self.http_address)}"

    def listening_lines(self) -> list[str]:
        """What ``ida node`` prints on start, one line per listener."""
        out = []
        if self.handle_address is not None:
            out.append(f"handle udp+tcp listening on {format_hostport(self.handle_address)}")
        if self.http_address is not None:
            out.append(f"http listening on {format_hostport(self.http_address)}")
        return out

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            raise RuntimeError("node already started")
        self._started = True
        try:
            if self._handle_bind is not None:
                await self._start_native(*self._handle_bind)
            if self._http_bind is not None:
                await self._start_http(*self._http_bind)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "node.started %s",
            kv(
                handle=format_hostport(self.handle_address) if self.handle_address else None,
                http=format_hostport(self.http_address) if self.http_address else None,
                records=len(self.store),
            ),
        )

    async def stop(self) -> None:
        """Close every listener and connection; requests in flight are dropped."""
        self._stopping = True
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> NodeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _resolve_host(self, host: str, port: int, kind: socket.SocketKind) -> str:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=kind)
        except OSError as e:
            raise NodeError(f"cannot resolve {host!r}: {e}") from None
        return str(infos[0][4][0])

    async def _start_native(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        host = await self._resolve_host(host, port, socket.SOCK_STREAM)
        where = format_hostport((host, port))
        for _ in range(20 if port == 0 else 1):  # port 0: find one number free for both TCP and UDP
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
            self.handle_address = (host, real)
            return
        raise NodeError(f"no port free for both TCP and UDP on {host}")

    async def _start_http(self, host: str, port: int) -> None:
        host = await self._resolve_host(host, port, socket.SOCK_STREAM)
        runner = web.AppRunner(
            make_app(self),
            access_log=None,  # log_request() logs each request
            shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise NodeError(
                f"cannot listen on {format_hostport((host, port))} (http): {e.strerror or e}"
            ) from None
        sockname = runner.addresses[0]
        self.http_address = (host, int(sockname[1]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- decisions shared by the protocols -------------------------------------------------------------
    def decide(self) -> tuple[Fault, float]:
        """The fault for one request and the delay before answering it (from :attr:`knobs`)."""
        return self.knobs.fault(self._rng), self.knobs.delay(self._rng)

    def _native_outcome(self, incoming: Incoming, fault: Fault) -> Outgoing | None:
        if fault is Fault.DROP:
            self.stats.dropped["failure"] += 1
            return None
        if fault is Fault.ERROR:
            return error_answer(incoming.message, RC_ERROR, FAILURE_TEXT)
        if fault is Fault.BUSY:
            return error_answer(incoming.message, RC_SERVER_BUSY, BUSY_TEXT)
        return answer(self.store, incoming)

    def log_request(
        self,
        proto: str,
        peer: Any,
        rid: int | None,
        handle: str,
        outcome: str,
        values: int,
        fault: Fault,
        t0: float,
    ) -> None:
        """One ``node.request`` line (when ``log_requests``); ``t0`` is ``time.perf_counter()`` at arrival."""
        if not self.log_requests:
            return
        host_port = format_hostport((str(peer[0]), int(peer[1]))) if isinstance(peer, tuple) else str(peer)
        log.info(
            "node.request %s",
            kv(
                proto=proto,
                peer=host_port,
                id=f"{rid:08x}" if rid is not None else None,
                handle=handle or None,
                answer=outcome,
                values=values,
                fault=fault.value,
                ms=f"{(time.perf_counter() - t0) * 1000:.2f}",
            ),
        )

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
                raise ProtocolError("too many multi-datagram requests in progress")
            entry = (Reassembler(env.request_id, max_size=MAX_UDP_MESSAGE_SIZE), now)
            self._partials[key] = entry
        try:
            whole = entry[0].feed(data)
        except ProtocolError:
            del self._partials[key]
            raise
        if whole is not None:
            del self._partials[key]
        return whole

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        t0 = time.perf_counter()
        try:
            whole = self._whole_udp_message(data, addr)
        except ProtocolError as e:
            self.stats.dropped["malformed"] += 1
            log.debug("node.udp.drop %s", kv(peer=addr, bytes=len(data), reason=e))
            return
        if whole is None:
            return
        self.stats.requests["udp"] += 1
        if self.knobs.silent:
            self.stats.dropped["silent"] += 1
            return
        try:
            incoming = read_request(whole)
        except NotARequest as e:
            self.stats.dropped["malformed"] += 1
            log.debug("node.udp.drop %s", kv(peer=addr, bytes=len(data), reason=e))
            return
        fault, delay = self.decide()
        if delay > 0:
            self._spawn(self._udp_answer_later(delay, incoming, fault, addr, t0))
        else:
            self._udp_answer(incoming, fault, addr, t0)

    async def _udp_answer_later(
        self, delay: float, incoming: Incoming, fault: Fault, addr: Any, t0: float
    ) -> None:
        await asyncio.sleep(delay)
        self._udp_answer(incoming, fault, addr, t0)

    def _udp_answer(self, incoming: Incoming, fault: Fault, addr: Any, t0: float) -> None:
        udp = self._udp
        rid = incoming.message.envelope.request_id
        if udp is None or udp.is_closing():
            return
        if self.knobs.silent:  # went silent while this answer was delayed
            self.stats.dropped["silent"] += 1
            return
        out = self._native_outcome(incoming, fault)
        if out is None:
            self.log_request("udp", addr, rid, "", "dropped", 0, fault, t0)
            return
        if self.knobs.truncate and fault is Fault.NONE:
            pieces = [encode_truncated(incoming.message)]
            self.stats.truncated += 1
            outcome = "TC"
        else:
            pieces = split_datagrams(out.data)
            self.stats.answers[out.code] += 1
            outcome = str(out.code)
        for p in pieces:
            udp.sendto(p, addr)
        self.stats.datagrams_sent += len(pieces)
        self.log_request("udp", addr, rid, out.handle, outcome, out.values, fault, t0)

    # -- TCP -----------------------------------------------------------------------------------------
    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        framer = StreamFramer()
        try:
            while not self._stopping:
                chunk = await reader.read(TCP_READ)
                if not chunk:
                    return
                try:
                    frames = framer.feed(chunk)
                except ProtocolError as e:
                    self.stats.dropped["malformed"] += 1
                    log.debug("node.tcp.drop %s", kv(peer=peer, reason=e))
                    return
                for frame in frames:
                    if not await self._tcp_answer(frame, writer, peer):
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _tcp_answer(self, frame: bytes, writer: asyncio.StreamWriter, peer: Any) -> bool:
        """Answer one framed request; False = close the connection."""
        t0 = time.perf_counter()
        self.stats.requests["tcp"] += 1
        if self.knobs.silent:
            self.stats.dropped["silent"] += 1
            return True
        try:
            incoming = read_request(frame)
        except NotARequest as e:
            self.stats.dropped["malformed"] += 1
            log.debug("node.tcp.drop %s", kv(peer=peer, reason=e))
            return True
        fault, delay = self.decide()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.knobs.silent:
            self.stats.dropped["silent"] += 1
            return True
        rid = incoming.message.envelope.request_id
        out = self._native_outcome(incoming, fault)
        if out is None:
            self.log_request("tcp", peer, rid, "", "dropped", 0, fault, t0)
            return False
        writer.write(out.data)
        await writer.drain()
        self.stats.answers[out.code] += 1
        self.log_request("tcp", peer, rid, out.handle, str(out.code), out.values, fault, t0)
        return True

    # -- REST (called by tools.harness.node.rest) --------------------------------------------------------------
    async def http_gate(self) -> Fault:
        """Apply silence, latency and the dice to one REST request. Returns the fault to answer with
        (NONE, ERROR, BUSY); silence and DROP raise :class:`DropConnection`."""
        self.stats.requests["http"] += 1
        await self._hold_while_silent()
        fault, delay = self.decide()
        if delay > 0:
            await asyncio.sleep(delay)
        await self._hold_while_silent()
        if fault is Fault.DROP:
            self.stats.dropped["failure"] += 1
            raise DropConnection("failure")
        return fault

    async def _hold_while_silent(self) -> None:
        if not self.knobs.silent:
            return
        self.stats.dropped["silent"] += 1
        while self.knobs.silent and not self._stopping:
            await asyncio.sleep(0.05)
        raise DropConnection()
