"""The MQTT resolve link: resolve requests on an asyncio MQTT v5 connection of their own, cached answers pre-encoded.

Why a second connection: the paho link (``gateway/mqttlink.py``) runs paho's network loop in its own thread, and
that thread and the asyncio loop share one GIL; every request then costs a thread hand-off and paho's packet
handling on top of the work (about 0.45 ms on the 2-core bench machine, 2,000 requests/s per process). Requests
and answers are QoS 0 and need none of what paho is there for (QoS 1 retries, retained config, the last will), so
the front end (``gateway/frontends/mqtt.py``) leaves them to this link: the MQTT framing (``proto/mqtt/packets.py``)
runs on the asyncio loop, and a repeated request is answered from a table of pre-encoded answers without
decoding it. Reports, config acks, status and desired config stay on the paho link.

The link subscribes to ``[$share/<group>/]ida/v1/d/+/req`` at QoS 0 (the filter the paho link used to take) and
for every PUBLISH on it:

1. a **hit**: the payload is a deterministic-CBOR resolve request whose token (key 1) comes first, and the bytes
   after the token are a key of the table (:class:`AnswerTable`). Only requests the slow path decoded and answered
   were put in the table, so equal bytes mean an equal, valid request. The answer is the entry's pre-encoded
   answer with the request's token put in, published on the request topic with ``req`` replaced by ``res`` (the
   subtree the device listens on). Its ``ttl`` counts down: the entry is re-rendered when the whole-second value
   changes (at most once a second per entry), not per request;
2. anything else goes to the front end's message handler (``on_message``): decoding, errors, the resolver; its
   answer is published through :meth:`ResolveLink.publish_res`, and an OK or not-modified answer from the
   resolver's cache or upstream is learned (:meth:`ResolveLink.learn`).

The table stays equal to the resolver through :class:`gateway.frontends.hotpath.CacheGuard` (expiry, the cache
still holding the same entry, the local zone, the prefetch hand-over), exactly as the CoAP fast path's.

All answers of one read from the socket go out in one write. Back-pressure: when the socket's send buffer fills up,
the link stops reading from the broker until it drains (the broker then queues or drops QoS 0 messages, as it
does for any slow subscriber). Rate limits (``[limits] device_rate``) are checked for hits as for any request,
through the front end (``limit``). Counting: hits are integer counters (:attr:`ResolveLink.answered`) added to
``ida_requests_total{frontend="mqtt"}`` at scrape time (:meth:`ResolveLink.samples`).

Connection: TCP (or TLS for ``mqtts://``, verified against ``[mqtt] ca_file``), TCP_NODELAY, CONNECT with clean
start, the gateway's credentials and a Maximum Packet Size; reconnects with exponential back-off (1 s up to
``reconnect_max``) and subscribes again on every connect; PINGREQ every half keepalive, and a connection that
stays silent for 1.5 keepalives is dropped and opened again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.frontends.hotpath import CacheGuard, HotEntry
from gateway.logfmt import kv
from gateway.metrics import Sample
from gateway.mqttlink import MqttAuth, parse_url
from gateway.resolution import Answer, AnswerCache, CachedAnswer, ResolutionNote
from proto import devicemsg
from proto.mqtt import packets as mqttwire
from proto.records import TTL_ABSOLUTE

__all__ = ["ResolveLink", "AnswerTable", "answer_fields", "reply_name", "request_key", "MAX_ENTRIES"]

log = logging.getLogger(__name__)

ROOT = devicemsg.TOPIC_ROOT  # "ida/v1/d"
_ROOT_B = (ROOT + "/").encode()
_REQ_B = b"/req"
MAX_PACKET = (
    1 << 16
)  # announced to the broker: it does not send us anything larger (requests are far smaller)
MAX_ENTRIES = 20_000  # entries in the table; when full it is emptied (and refilled by the slow path)
CONNECT_TIMEOUT = 10.0  # TCP/TLS connect, CONNACK, SUBACK


def reply_name(code: int) -> str:
    """The wire message an answer with ``code`` is."""
    if code == devicemsg.OK:
        return "resolve_response"
    if code == devicemsg.NOT_MODIFIED:
        return "not_modified"
    return "error"


def answer_fields(token: bytes, answer: Answer, etag: bytes | None, now: float) -> dict[str, Any]:
    """The fields of the answer to a resolve request (its ``etag`` None when it sent none), TTLs as at ``now``."""
    ttl = answer.max_age(now)
    if answer.code != devicemsg.OK:
        return {"token": token, "code": answer.code, "id": answer.handle, "ttl": ttl}
    if etag is not None and answer.etag and etag == answer.etag:
        return {"token": token, "code": devicemsg.NOT_MODIFIED, "ttl": ttl, "etag": answer.etag}
    values = answer.record.to_device_values(now) if answer.record is not None else []
    out: dict[str, Any] = {
        "token": token,
        "code": devicemsg.OK,
        "id": answer.handle,
        "values": values,
        "ttl": ttl,
        "source": answer.source,
    }
    if answer.etag:
        out["etag"] = answer.etag
    return out


def request_key(payload: bytes) -> tuple[bytes, bytes] | None:
    """(key, token item) of a request payload the table can serve: a CBOR map whose first item is the token (key 1,
    1-8 bytes), as deterministic CBOR puts it; the key is everything after the token, the token item its CBOR
    bytes. None for any other payload."""
    if (
        len(payload) < 4
        or not 0xA2 <= payload[0] <= 0xA5
        or payload[1] != 0x01
        or not 0x41 <= payload[2] <= 0x48
    ):
        return None
    end = 3 + (payload[2] & 0x1F)
    if len(payload) <= end:
        return None
    return payload[end:], payload[2:end]


class _Entry(HotEntry):
    """A cached answer: the bytes before and after the token, and until when they are right."""

    __slots__ = ("key", "req_head", "etag", "dynamic", "age", "until", "code", "head", "tail")

    def __init__(
        self,
        key: bytes,
        req_head: int,
        answer: Answer,
        etag: bytes | None,
        refresh_at: float,
        ref: CachedAnswer | None,
    ) -> None:
        super().__init__(answer, refresh_at, ref)
        self.key = key
        self.req_head = req_head  # the request's CBOR map header (its item count)
        self.etag = etag  # the request's ETag (None: it sent none)
        assert answer.record is not None
        self.dynamic = any(
            v.ttl_type == TTL_ABSOLUTE for v in answer.record.values
        )  # absolute TTLs count down
        self.age = -1
        self.until = -math.inf
        self.code = devicemsg.OK  # or devicemsg.NOT_MODIFIED (the request's ETag is the answer's)
        self.head = b""  # map header and the token's key
        self.tail = b""  # everything after the token

    def render(self, now: float) -> bool:
        """Encode the answer for ``now``; False when it no longer fits in one answer."""
        age = int(self.expires - now)
        if age != self.age or self.dynamic:
            fields = answer_fields(b"\x00", self.answer, self.etag, now)
            try:
                payload = devicemsg.encode(reply_name(fields["code"]), fields)
            except devicemsg.WireError:
                return False
            if len(payload) > devicemsg.MAX_PAYLOAD or payload[1:4] != b"\x01\x41\x00":
                return False
            self.head, self.tail, self.age, self.code = payload[:2], payload[4:], age, fields["code"]
        self.until = self.hold_until(age, now, self.dynamic)
        return True


class AnswerTable:
    """Pre-encoded answers by request key (module doc), kept equal to the resolver by a CacheGuard."""

    def __init__(
        self,
        answers: AnswerCache | None = None,
        *,
        note: ResolutionNote | None = None,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.guard = CacheGuard(answers, frontend="mqtt", note=note)
        self.entries: dict[bytes, _Entry] = {}
        self.max_entries = max_entries
        self.learned = 0

    def learn(
        self,
        payload: bytes,
        answer: Answer,
        types: tuple[str, ...],
        indexes: tuple[int, ...],
        etag: bytes | None,
        now: float,
    ) -> bool:
        """Remember the answer to the request ``payload`` when the table may serve it from now on."""
        split = request_key(payload)
        if split is None:
            return False
        key = split[0]
        admitted = self.guard.admit(answer, types, indexes, now, self.entries.get(key))
        if admitted is None:
            return False
        ref, refresh_at = admitted
        cached = dataclasses.replace(
            answer, source=devicemsg.SOURCE_CACHE
        )  # what the resolver says for a hit
        entry = _Entry(key, payload[0], cached, etag, refresh_at, ref)
        if not entry.render(now):
            return False
        if key not in self.entries and len(self.entries) >= self.max_entries:
            self.entries.clear()  # rare (more hot keys than entries); the slow path refills what is asked
        self.entries[key] = entry
        self.learned += 1
        return True

    def refresh(self, entry: _Entry, now: float) -> bool:
        """Bring ``entry`` up to ``now``; False when the slow path must answer instead."""
        return self.guard.refresh(entry, now, self.forget)

    def forget(self, entry: _Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the broker; everything it reads goes to the link."""

    def __init__(self, link: ResolveLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.reader = mqttwire.Reader(MAX_PACKET)
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.connack: asyncio.Future[tuple[int, dict[int, object]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.acks: dict[int, asyncio.Future[list[int]]] = {}
        self.last_read = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        futures: list[asyncio.Future[Any]] = [self.connack, *self.acks.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self.link._received(self, data)

    def pause_writing(self) -> None:  # the send buffer is full: stop reading requests until it drains
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(data)
        return True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ResolveLink:
    """The asyncio MQTT connection for resolve requests (module doc).

    ``on_message(topic, payload)`` takes every request the table does not answer; ``limit(key)`` (optional) is the
    front end's rate-limit check for a hit, True when it refused (and counted) the request; ``answers`` and
    ``note`` are the resolver's answer cache and the status hook (for the table's guard, see hotpath.py);
    ``learning`` false leaves the table empty."""

    def __init__(
        self,
        url: str,
        *,
        on_message: Callable[[str, bytes], None],
        answers: AnswerCache | None = None,
        note: ResolutionNote | None = None,
        auth: MqttAuth | None = None,
        group: str | None = "ida-gw",
        client_id: str = "ida-gw-r",
        keepalive: int = 30,
        reconnect_max: float = 30.0,
        limit: Callable[[str], bool] | None = None,
        limiting: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
        learning: bool = True,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.address = parse_url(url)
        self.auth = auth or MqttAuth()
        self.client_id = client_id
        self.filter = f"$share/{group}/{ROOT}/+/req" if group else f"{ROOT}/+/req"
        self.keepalive = keepalive
        self.reconnect_max = max(1.0, float(reconnect_max))
        self.connect_timeout = connect_timeout
        self.clock = clock
        self.learning = learning
        self.table = AnswerTable(answers, note=note)
        self._on_message = on_message
        self._limit = limit
        self._limiting = limiting or (lambda: False)
        self._conn: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._started = False
        self._pid = 0
        self._heads: dict[
            int, bytes
        ] = {}  # PUBLISH fixed header by remaining length (answers come in few sizes)
        self.serving = True  # false: every request goes to on_message (the front end is stopping)
        self.connects = 0
        # counters (samples() and the tests)
        self.answered = 0  # OK answers from the table
        self.valid = 0  # not-modified answers from the table
        self.handed_on = 0  # requests given to on_message
        self.dropped = 0  # answers that could not be sent (not connected)

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.serving = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mqtt-resolve-link")

    async def unsubscribe(self, timeout: float = 2.0) -> None:
        """Stop taking requests (the shared group gives new ones to other gateways); answers still go out."""
        self.serving = False
        conn = self._conn
        if conn is None or not self._ready.is_set():
            return
        self._ready.clear()
        try:
            codes = await self._request(conn, mqttwire.unsubscribe, [self.filter], timeout)
        except (ConnectionError, TimeoutError) as e:
            log.info("mqtt resolve link unsubscribe failed %s", kv(error=e))
            return
        log.debug("mqtt resolve link unsubscribed %s", kv(codes=codes))

    async def stop(self) -> None:
        """Send DISCONNECT and close the connection."""
        if not self._started:
            return
        self._started = False
        self.serving = False
        self._ready.clear()
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.write(mqttwire.DISCONNECT)
            conn.transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        log.info("mqtt resolve link stopped %s", kv(broker=self.address))

    @property
    def ready(self) -> bool:
        """Connected and subscribed."""
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- the connection loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = 1.0
        insecure_said = False
        while self._started:
            if not self.address.tls and not insecure_said:
                insecure_said = True
                log.warning(
                    "mqtt resolve link INSECURE plain mode: no TLS; factory bench only %s",
                    kv(broker=self.address),
                )
            subscribed = False
            try:
                subscribed = await self._session()
            except (OSError, ConnectionError, TimeoutError, mqttwire.MqttProtocolError, ssl.SSLError) as e:
                if self._started:
                    log.warning(
                        "mqtt resolve link down, reconnecting %s",
                        kv(broker=self.address, error=e or type(e).__name__, retry_s=round(delay, 1)),
                    )
            finally:
                self._ready.clear()
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.abort()
            if not self._started:
                return
            if subscribed:
                delay = 1.0
            await asyncio.sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 2, self.reconnect_max)

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.address.tls:
            return None
        return ssl.create_default_context(cafile=self.auth.ca_file)

    async def _session(self) -> bool:
        """Connect, subscribe, serve until the connection closes; True when it got as far as subscribed."""
        loop = asyncio.get_running_loop()
        addr = self.address
        tls = self._ssl()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Connection(self),
                addr.host,
                addr.port,
                ssl=tls,
                server_hostname=addr.host if tls else None,
            ),
            self.connect_timeout,
        )
        self._conn = conn
        username = self.auth.username or addr.username
        password = self.auth.password if self.auth.username else addr.password
        conn.write(
            mqttwire.connect(
                self.client_id, self.keepalive, username=username, password=password, max_packet=MAX_PACKET
            )
        )
        code, props = await asyncio.wait_for(asyncio.shield(conn.connack), self.connect_timeout)
        if code >= 0x80:
            raise ConnectionError(f"broker refused the connection: {mqttwire.reason(code)}")
        server_keepalive = props.get(mqttwire.PROP_SERVER_KEEP_ALIVE)
        keepalive = server_keepalive if isinstance(server_keepalive, int) else self.keepalive
        codes = await self._request(conn, mqttwire.subscribe, [(self.filter, 0)], self.connect_timeout)
        if not codes or codes[0] >= 0x80:
            reason = mqttwire.reason(codes[0]) if codes else "no reason code"
            raise ConnectionError(f"broker refused the subscription {self.filter}: {reason}")
        if not self._started:
            return True
        self.connects += 1
        self.serving = True
        self._ready.set()
        log.info(
            "mqtt resolve link subscribed %s",
            kv(broker=addr, client_id=self.client_id, filter=self.filter, connects=self.connects),
        )
        pinger = loop.create_task(self._keepalive(conn, keepalive)) if keepalive > 0 else None
        try:
            exc = await asyncio.shield(conn.closed)
        finally:
            if pinger is not None:
                pinger.cancel()
        if self._started:
            raise ConnectionError(f"connection closed{f': {exc}' if exc else ''}")
        return True

    async def _request(
        self, conn: _Connection, encode: Callable[[int, Any], bytes], arg: Any, timeout: float
    ) -> list[int]:
        """Send a SUBSCRIBE or UNSUBSCRIBE and wait for its reason codes."""
        self._pid = self._pid % 0xFFFF + 1
        pid = self._pid
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        conn.acks[pid] = fut
        try:
            if not conn.write(encode(pid, arg)):
                raise ConnectionError("not connected")
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            conn.acks.pop(pid, None)

    async def _keepalive(self, conn: _Connection, keepalive: int) -> None:
        while True:
            await asyncio.sleep(keepalive / 2)
            if time.monotonic() - conn.last_read > keepalive * 1.5:
                log.warning(
                    "mqtt resolve link: broker silent %s", kv(broker=self.address, keepalive=keepalive)
                )
                conn.abort()
                return
            conn.write(mqttwire.PINGREQ)

    # -- receiving -------------------------------------------------------------------------------------------
    def _received(self, conn: _Connection, data: bytes) -> None:
        try:
            packets = conn.reader.feed(data)
        except mqttwire.MqttProtocolError as e:
            log.warning("mqtt resolve link: bad data from the broker %s", kv(broker=self.address, error=e))
            conn.abort()
            return
        out: list[bytes] = []
        entries = self.table.entries if self.serving else None
        limiting = self._limit is not None and self._limiting()
        heads = self._heads
        now = 0.0
        answered = valid = 0
        try:
            for first, body in packets:
                if first & 0xF0 != 0x30:
                    self._control(conn, first, body)
                    continue
                n = (body[0] << 8) | body[1] if len(body) > 1 else 0
                pos = 2 + n
                if (
                    first & 0x06
                ):  # QoS 1 (our subscription is QoS 0; a broker may still send one): acknowledge
                    if pos + 2 > len(body) or first & 0x06 == 0x06:
                        raise mqttwire.MqttProtocolError("malformed PUBLISH")
                    out.append(mqttwire.puback((body[pos] << 8) | body[pos + 1]))
                    pos += 2
                if pos >= len(body):
                    raise mqttwire.MqttProtocolError("truncated PUBLISH")
                if body[pos]:  # properties (brokers rarely add any to a plain message)
                    plen, pos = mqttwire.read_varint(body, pos)
                    pos += plen
                else:
                    pos += 1
                payload = body[pos:]
                if entries is not None and len(payload) > 4 and payload[1] == 1:
                    tl = payload[2] - 0x40
                    entry = entries.get(payload[3 + tl :]) if 1 <= tl <= 8 else None
                    if entry is not None and entry.req_head == payload[0]:
                        topic = body[2 : 2 + n]
                        if not now:
                            now = self.clock()
                        if (
                            topic.startswith(_ROOT_B)
                            and topic.endswith(_REQ_B)
                            and (now <= entry.until or self.table.refresh(entry, now))
                        ):
                            if limiting and self._limited(topic):
                                continue  # refused (and counted) by the front end's rate limit
                            size = n + 3 + len(entry.head) + 1 + tl + len(entry.tail)
                            head = heads.get(size)
                            if head is None:
                                head = heads[size] = b"\x30" + mqttwire.varlen(size)
                            out.append(head)
                            out.append(body[: n - 1])  # topic length and topic up to "req"
                            out.append(b"res\x00")  # ... "res", and no properties
                            out.append(entry.head)
                            out.append(payload[2 : 3 + tl])
                            out.append(entry.tail)
                            if entry.code == devicemsg.OK:
                                answered += 1
                            else:
                                valid += 1
                            continue
                self.handed_on += 1
                self._on_message(body[2 : 2 + n].decode("utf-8", "replace"), payload)
        except mqttwire.MqttProtocolError as e:
            log.warning("mqtt resolve link: bad packet from the broker %s", kv(broker=self.address, error=e))
            conn.abort()
        finally:
            if out:
                conn.write(b"".join(out))
            if answered or valid:
                self.answered += answered
                self.valid += valid
                self.table.guard.count_hits(answered + valid)

    def _limited(self, topic: bytes) -> bool:
        assert self._limit is not None
        return self._limit(topic[len(_ROOT_B) : -len(_REQ_B)].decode("utf-8", "replace"))

    def _control(self, conn: _Connection, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == mqttwire.CONNACK:
            _, code, props = mqttwire.parse_connack(body)
            if not conn.connack.done():
                conn.connack.set_result((code, props))
        elif kind in (mqttwire.SUBACK, mqttwire.UNSUBACK):
            pid, codes = mqttwire.parse_suback(body)
            fut = conn.acks.get(pid)
            if fut is not None and not fut.done():
                fut.set_result(codes)
        elif kind == mqttwire.PINGRESP_TYPE:
            pass
        elif kind == mqttwire.DISCONNECT_TYPE:
            code, text = mqttwire.parse_disconnect(body)
            log.warning(
                "mqtt resolve link: broker disconnects %s",
                kv(broker=self.address, reason=mqttwire.reason(code), text=text or None),
            )
            conn.abort()
        else:
            raise mqttwire.MqttProtocolError(f"unexpected packet type {kind}")

    # -- sending ---------------------------------------------------------------------------------------------
    def publish_res(self, key: str, payload: bytes) -> bool:
        """Publish an answer on ``ida/v1/d/<key>/res`` (QoS 0); False when not connected (the answer is lost, as
        any QoS 0 message to a device whose broker went away: the device asks again)."""
        conn = self._conn
        if conn is None or not conn.write(mqttwire.publish(f"{ROOT}/{key}/res".encode(), payload)):
            self.dropped += 1
            return False
        return True

    def learn(
        self,
        payload: bytes,
        answer: Answer,
        types: tuple[str, ...],
        indexes: tuple[int, ...],
        etag: bytes | None,
    ) -> bool:
        """Remember the answer the slow path gave to the request ``payload`` (module doc)."""
        if not self.learning:
            return False
        return self.table.learn(payload, answer, types, indexes, etag, self.clock())

    # -- metrics -----------------------------------------------------------------------------------------------
    def samples(self) -> Iterable[Sample]:
        """Counts to add to the front end's (a ``Metrics`` collector with ``add=True``)."""
        yield "ida_requests_total", {"frontend": "mqtt", "code": str(devicemsg.OK)}, float(self.answered)
        yield (
            "ida_requests_total",
            {"frontend": "mqtt", "code": str(devicemsg.NOT_MODIFIED)},
            float(self.valid),
        )

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.table.entries),
            "answered": self.answered,
            "valid": self.valid,
            "handed_on": self.handed_on,
            "learned": self.table.learned,
            "dropped": self.dropped,
            "connects": self.connects,
        }
