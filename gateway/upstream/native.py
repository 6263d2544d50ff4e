"""Asyncio client of the Handle native protocol: resolution requests to one recursive node.

UDP first, over one datagram endpoint shared by every request of the client; answers are matched by a
random 32-bit request id (unique among the requests in flight). A request is sent again after
``backoff``, ``2*backoff``, ... (``retries`` times, same request id) until ``timeout`` seconds after the
first send. Multi-datagram answers are reassembled. TCP is used instead:

* when the node answers with a self-contained datagram carrying the TC flag (the answer did not fit);
* when some datagrams of a multi-datagram answer are in but others are still missing when the next
  retransmission is due (UDP is losing pieces: fetch the whole answer over TCP rather than ask again);
* when UDP stayed silent for ``timeout`` seconds and ``tcp_fallback`` is on (so the worst case is
  2 x ``timeout``);
* when the request itself does not fit in one 512-byte datagram;
* always, with ``transport="tcp"``.

Results and errors: the codec (:mod:`proto.handle`) reads the answer; :func:`to_result` says what it
means for the resolution -- a :class:`gateway.upstream.base.Result` with code RC_SUCCESS, RC_HANDLE_NOT_FOUND
or RC_VALUES_NOT_FOUND; RC_SERVER_BUSY raises UpstreamBusy, referrals (302/303) UpstreamReferral with the
referral body, other codes UpstreamRefused(code); bytes that do not parse (the codec's HandleFormatError)
raise ProtocolError; no answer raises UpstreamTimeout; a TCP connection that cannot be made raises
UpstreamError. Which of these count against the node is :func:`gateway.upstream.base.outcome_of`'s call.

Logs go to ``logging.getLogger(__name__)`` as ``event key=value ...``. The client sends no credential,
so none can be logged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.errors import ProtocolError, UpstreamError, UpstreamTimeout
from gateway.logfmt import kv
from gateway.upstream.base import Result, error_for_code
from proto.handle import (
    HandleFormatError,
    Reassembler,
    ResolutionResponse,
    Response,
    StreamFramer,
    decode_answer,
    decode_envelope,
    encode_request,
    peek_envelope,
)
from proto.handle.numbers import (
    DEFAULT_PORT,
    DEFAULT_REQUEST_FLAGS,
    ENV_TC,
    ENVELOPE_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_UDP_DATAGRAM,
    MAX_UDP_MESSAGE_SIZE,
    RC_SUCCESS,
    ResponseCode,
)

__all__ = ["HandleClient", "Transport", "tcp_exchange", "to_result"]

log = logging.getLogger(__name__)

Transport = Literal["udp", "tcp"]

_TCP_READ = 64 << 10
_TC = int(ENV_TC)


def to_result(response: Response, *, handle: str, node: str | None = None) -> Result:
    """What a node's decoded answer to a resolution of ``handle`` means: a :class:`Result`, or the matching
    ``gateway.errors`` type raised.

    RC_SUCCESS -> Result with the values (an answer for another handle -> ProtocolError); 100 / 200 -> Result
    with no values; RC_SERVER_BUSY -> UpstreamBusy; 302/303 -> UpstreamReferral (with the referral body);
    other codes -> UpstreamRefused(code).
    """
    if isinstance(response, ResolutionResponse):
        if (
            response.handle.encode().lower() != handle.encode().lower()
        ):  # ASCII case-insensitive, as servers match
            raise ProtocolError(f"answer is for {response.handle!r}, asked for {handle!r}", node)
        return Result(RC_SUCCESS, handle, response.values)
    code = response.code
    if ResponseCode.is_not_found(code):
        return Result(code, handle)
    if code == RC_SUCCESS:  # an ErrorResponse built by hand with code 1
        raise ProtocolError(f"{handle}: success code without values", node)
    detail = f"{handle}: {response.name}" + (f": {response.message}" if response.message else "")
    raise error_for_code(code, detail, node, response.data)


class _Truncated:
    """Future result: the node said (TC flag) that its answer needs TCP."""


_TRUNCATED = _Truncated()


class _Refused:
    """Marker result: ICMP port unreachable on the UDP socket (nobody listens at the node's port)."""


_REFUSED = _Refused()


class _Expired:
    """Marker result: the wait after one send is over (retransmit, or give up)."""


_EXPIRED = _Expired()

_Outcome = bytes | _Truncated | _Refused | _Expired


def _expire(future: asyncio.Future[_Outcome]) -> None:
    if not future.done():
        future.set_result(_EXPIRED)


@dataclass(eq=False, slots=True)
class _Pending:
    future: asyncio.Future[_Outcome]
    max_size: int
    reassembler: Reassembler | None = None  # made when a datagram is not a whole message by itself


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, client: HandleClient) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._client._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on the connected socket. Port unreachable ends the waiting requests at once (they go
        # to TCP when allowed) instead of letting them time out; other errors: the request times out.
        log.debug("handle.udp.error %s", kv(node=self._client.node, error=exc))
        if isinstance(exc, ConnectionRefusedError):
            self._client._on_udp_refused()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._on_udp_lost()


class HandleClient:
    """Resolves handles at one node. Use as ``async with HandleClient(host, port) as c: await c.resolve(h)``.

    ``timeout`` bounds each transport attempt (UDP with its retransmissions, then TCP); ``retries`` is the
    number of UDP retransmissions; ``backoff`` the wait before the first one (doubling after each).
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        transport: Transport = "udp",
        timeout: float = 2.0,
        retries: int = 2,
        backoff: float = 0.25,
        tcp_fallback: bool = True,
        op_flags: int = DEFAULT_REQUEST_FLAGS,
        max_udp_message: int = MAX_UDP_MESSAGE_SIZE,
        max_message: int = MAX_MESSAGE_SIZE,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be 'udp' or 'tcp', not {transport!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("timeout must be positive, retries and backoff not negative")
        self.host = host
        self.port = port
        self.transport: Transport = transport
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.tcp_fallback = tcp_fallback
        self.op_flags = op_flags
        self.max_udp_message = max_udp_message
        self.max_message = max_message
        self.node = f"{'hdl' if transport == 'udp' else 'hdl+tcp'}://{host}:{port}"
        self.unparsable_datagrams = 0  # datagrams dropped because their envelope did not parse
        self._pending: dict[int, _Pending] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_lock = asyncio.Lock()
        self._closed = False

    # -- public API ----------------------------------------------------------------------------------
    async def resolve(self, handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()) -> Result:
        """Resolve ``handle`` (optionally only the given types / indexes) at this node."""
        if self._closed:
            raise UpstreamError("client is closed", self.node)
        if self.transport == "tcp":
            raw = await self._via_tcp(handle, types, indexes)
        else:
            raw = await self._via_udp(handle, types, indexes)
        try:
            response = decode_answer(raw, max_size=self.max_message)
        except HandleFormatError as e:
            raise self._malformed(handle, None, e) from None
        result = to_result(response, handle=handle, node=self.node)
        if log.isEnabledFor(logging.DEBUG):  # kv() costs a pass over the handle: not for every request
            log.debug(
                "handle.answer %s",
                kv(node=self.node, handle=handle, code=result.code, values=len(result.values)),
            )
        return result

    async def close(self) -> None:
        """Close the UDP endpoint; requests still in flight fail with UpstreamError."""
        self._closed = True
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_exception(UpstreamError("client closed", self.node))
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    async def __aenter__(self) -> HandleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- request ids, encoding, malformed answers ------------------------------------------------------
    def _new_id(self) -> int:
        while True:
            rid = secrets.randbits(32)
            if rid not in self._pending:
                return rid

    def _encode(self, rid: int, handle: str, types: Sequence[str], indexes: Sequence[int]) -> bytes:
        try:
            return encode_request(
                handle, request_id=rid, types=types, indexes=indexes, op_flags=self.op_flags
            )
        except ValueError as e:  # the caller's fault: an index out of range, a huge handle
            raise ValueError(f"cannot encode a request for {handle!r}: {e}") from None

    def _malformed(self, handle: str, rid: int | None, error: Exception) -> ProtocolError:
        """The ProtocolError for an answer that does not parse (the codec's HandleFormatError), logged."""
        log.warning(
            "handle.malformed %s",
            kv(node=self.node, id=None if rid is None else f"{rid:08x}", handle=handle, error=error),
        )
        return ProtocolError(f"{handle}: {error}", self.node)

    # -- UDP -----------------------------------------------------------------------------------------
    async def _endpoint(self) -> asyncio.DatagramTransport:
        async with self._udp_lock:
            if self._udp is None or self._udp.is_closing():
                loop = asyncio.get_running_loop()
                try:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _UdpProtocol(self), remote_addr=(self.host, self.port)
                    )
                except OSError as e:
                    raise UpstreamError(
                        f"cannot open a UDP socket to {self.host}:{self.port}: {e}", self.node
                    ) from e
                self._udp = transport
            return self._udp

    def _on_udp_lost(self) -> None:
        self._udp = None

    def _on_udp_refused(self) -> None:
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_result(_REFUSED)

    def _on_datagram(self, data: bytes) -> None:
        env = peek_envelope(data, self.max_udp_message)
        if env is None:
            self._drop(data)
            return
        flags, rid, seq, length = env
        p = self._pending.get(rid)
        if p is None or p.future.done():
            log.debug("handle.udp.unmatched node=%s id=%08x seq=%d", self.node, rid, seq)
            return
        if seq == 0 and length == len(data) - ENVELOPE_SIZE:
            if flags & _TC:  # a whole datagram saying "ask over TCP"
                p.future.set_result(_TRUNCATED)
                return
            if p.reassembler is None and length:  # a whole message in one datagram: its own reassembly
                p.future.set_result(data)
                return
        if p.reassembler is None:
            p.reassembler = Reassembler(rid, max_size=p.max_size)
        try:
            whole = p.reassembler.feed(data)
        except HandleFormatError as e:
            p.future.set_exception(e)
            return
        if whole is not None:
            p.future.set_result(whole)

    def _drop(self, data: bytes) -> None:
        """A datagram whose envelope does not parse: counted and logged, as decode_envelope words it."""
        try:
            decode_envelope(data, max_size=self.max_udp_message)
        except HandleFormatError as e:
            self.unparsable_datagrams += 1
            log.warning("handle.udp.drop %s", kv(node=self.node, bytes=len(data), reason=e))

    async def _via_udp(self, handle: str, types: Sequence[str], indexes: Sequence[int]) -> bytes:
        rid = self._new_id()
        request = self._encode(rid, handle, types, indexes)
        if len(request) > MAX_UDP_DATAGRAM:
            log.debug("handle.tcp.fallback %s", kv(node=self.node, handle=handle, reason="large-request"))
            return await self._via_tcp(handle, types, indexes)
        udp = self._udp
        if udp is None or udp.is_closing():
            udp = await self._endpoint()
        loop = asyncio.get_running_loop()
        # One future per send, resolved by the answer (_on_datagram) or by a timer (_EXPIRED): no timeout
        # context, no task; a retransmission gets a fresh future, the reassembly goes on across them.
        pending = _Pending(loop.create_future(), self.max_udp_message)
        self._pending[rid] = pending
        garbage_before = self.unparsable_datagrams
        reason = "timeout"
        sends = 0
        timer: asyncio.TimerHandle | None = None
        try:
            deadline = loop.time() + self.timeout
            while True:
                udp.sendto(request)
                sends += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "handle.send %s",
                        kv(node=self.node, id=f"{rid:08x}", handle=handle, transport="udp", attempt=sends),
                    )
                left = deadline - loop.time()
                wait = min(self.backoff * 2 ** (sends - 1), left) if sends <= self.retries else left
                timer = loop.call_later(max(wait, 0.0), _expire, pending.future)
                outcome = await pending.future  # raises HandleFormatError / UpstreamError (closed)
                timer.cancel()
                if outcome is _EXPIRED:
                    pending.future = loop.create_future()  # for the next send's answer
                elif isinstance(outcome, bytes):
                    return outcome
                elif outcome is _TRUNCATED:
                    reason = "truncated"
                    break
                else:
                    reason = "port-unreachable"
                    break
                if pending.reassembler is not None and pending.reassembler.received:
                    reason = f"missing-datagrams={list(pending.reassembler.missing)}"
                    break
                if loop.time() >= deadline or sends > self.retries:
                    break
        except HandleFormatError as e:
            raise self._malformed(handle, rid, e) from None
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(rid, None)
            if pending.future.done() and not pending.future.cancelled():
                pending.future.exception()  # mark retrieved

        if reason == "port-unreachable" and not self.tcp_fallback:
            raise UpstreamError(f"{handle}: UDP port unreachable at {self.host}:{self.port}", self.node)
        if reason != "timeout":
            log.info(
                "handle.tcp.fallback %s", kv(node=self.node, id=f"{rid:08x}", handle=handle, reason=reason)
            )
            return await self._via_tcp(handle, types, indexes)
        garbage = self.unparsable_datagrams - garbage_before
        silent = f"no answer over UDP within {self.timeout:g}s ({sends} sends)"
        if not self.tcp_fallback:
            if garbage:
                raise ProtocolError(f"{handle}: {silent}, but {garbage} unparsable datagrams", self.node)
            log.info("handle.timeout %s", kv(node=self.node, handle=handle, transport="udp", sends=sends))
            raise UpstreamTimeout(f"{handle}: {silent}", self.node)
        log.info(
            "handle.tcp.fallback %s", kv(node=self.node, id=f"{rid:08x}", handle=handle, reason="udp-timeout")
        )
        try:
            return await self._via_tcp(handle, types, indexes)
        except (UpstreamTimeout, ProtocolError):
            raise
        except UpstreamError as e:  # TCP unreachable too: the node is silent
            raise UpstreamTimeout(f"{handle}: {silent}; TCP fallback failed: {e}", self.node) from e

    # -- TCP -----------------------------------------------------------------------------------------
    async def _via_tcp(self, handle: str, types: Sequence[str], indexes: Sequence[int]) -> bytes:
        rid = self._new_id()
        request = self._encode(rid, handle, types, indexes)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("handle.send %s", kv(node=self.node, id=f"{rid:08x}", handle=handle, transport="tcp"))
        try:
            async with asyncio.timeout(self.timeout):
                return await self._tcp_exchange(rid, request)
        except TimeoutError:
            log.info("handle.timeout %s", kv(node=self.node, handle=handle, transport="tcp"))
            raise UpstreamTimeout(
                f"{handle}: no answer over TCP within {self.timeout:g}s", self.node
            ) from None
        except (HandleFormatError, ProtocolError) as e:
            raise self._malformed(handle, rid, e) from None
        except OSError as e:
            log.info("handle.tcp.error %s", kv(node=self.node, handle=handle, error=e))
            raise UpstreamError(
                f"{handle}: TCP connection to {self.host}:{self.port} failed: {e}", self.node
            ) from e

    async def _tcp_exchange(self, rid: int, request: bytes) -> bytes:
        return await tcp_exchange(self.host, self.port, request, rid, self.max_message)


async def tcp_exchange(
    host: str, port: int, request: bytes, request_id: int, max_size: int = MAX_MESSAGE_SIZE
) -> bytes:
    """Send one request on a new TCP connection and return the message answering ``request_id`` (no timeout:
    the caller bounds it). A connection closed before the answer raises ConnectionResetError (nothing came)
    or ProtocolError (something else came); bytes that do not frame raise HandleFormatError; OSError for a
    connection that cannot be made."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        framer = StreamFramer(max_size=max_size)
        got = 0
        while True:
            chunk = await reader.read(_TCP_READ)
            if not chunk:
                framer.eof()
                if got:
                    raise ProtocolError("connection closed without an answer to our request id")
                raise ConnectionResetError("connection closed without an answer")
            got += len(chunk)
            for message in framer.feed(chunk):
                env = decode_envelope(message, max_size=max_size)
                if env.request_id == request_id:
                    return message
                log.debug(
                    "handle.tcp.unmatched %s:%d id=%08x expected=%08x", host, port, env.request_id, request_id
                )
    finally:
        writer.close()
