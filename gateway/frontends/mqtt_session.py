"""The device link's broker session: an asyncio MQTT v5 client (framing and packets from proto/mqtt) that keeps its
subscriptions alive, hands what it receives to its owner (gateway/frontends/mqtt_link.py) and sends its QoS 0 and
QoS 1 messages.

Connection: TCP (or TLS for ``mqtts://``, verified against ``[mqtt] ca_file``), TCP_NODELAY, CONNECT with clean
start, the gateway's credentials and a Maximum Packet Size; one SUBSCRIBE with every filter (each at its QoS). It
reconnects with exponential back-off (1 s up to ``reconnect_max``) and subscribes again on every connect; PINGREQ
every half keepalive (the broker's Server Keep Alive when it sends one), and a connection that stays silent for 1.5
keepalives is dropped and opened again. Bytes that are not MQTT, a refused CONNECT or SUBSCRIBE and a DISCONNECT
from the broker close the connection, which is then opened again.

Receiving: the PUBLISH packets of one read from the socket go to ``on_publish(packets)`` together; a QoS 1 PUBLISH
is acknowledged (PUBACK) here, at once: the broker may forget it then, and whatever the owner promises the device
it promises with a message of its own (a report's ``report_ack``). Sending: :meth:`MqttSession.write` for bytes
built by the owner (QoS 0 answers), :meth:`MqttSession.publish_qos1` for QoS 1 messages, which get packet ids and
stay within the broker's Receive Maximum (:class:`Qos1Window` of mqtt_window.py; the rest wait in order for a
PUBACK). The PUBACKs, what ``on_publish`` returns and the QoS 1 messages queued meanwhile go out in one write per
read; QoS 1 messages published outside a read (e.g. when a commit completes) are written together once per turn of
the event loop.

Back-pressure: when the socket's send buffer fills up, the session stops reading from the broker until it drains
(the broker then queues messages for it, up to its own limits, as for any slow subscriber).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.aio import cancel_all, wait_set
from gateway.broker import MqttAuth, parse_url
from gateway.frontends.mqtt_window import Qos1Window
from gateway.logfmt import kv
from proto import mqtt

__all__ = ["MqttSession", "MAX_PACKET", "CONNECT_TIMEOUT"]

log = logging.getLogger(__name__)

MAX_PACKET = (
    1 << 16
)  # announced to the broker: it sends us nothing larger (requests and reports are far smaller)
CONNECT_TIMEOUT = 10.0  # TCP/TLS connect, CONNACK, SUBACK
V5 = mqtt.MQTT5
_PUBLISH_QOS0 = mqtt.PUBLISH << 4  # the first byte of a QoS 0 PUBLISH, not retained, not a duplicate
_PUBACK_HEAD = bytes((mqtt.PUBACK << 4, 2))
_RECEIVE_MAXIMUM = 0x21  # v5 CONNACK property: QoS > 0 PUBLISH packets the broker takes unacknowledged
OnPublish = Callable[[list[tuple[int, bytes]]], bytes]


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the broker."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.reader = mqtt.Reader(MAX_PACKET)
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[Exception | None] = loop.create_future()
        self.connack: asyncio.Future[mqtt.Connack] = loop.create_future()
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
        session = self.session
        acks: list[bytes] = []
        try:
            packets = self.reader.feed(data)
            publishes = packets
            for first, _ in packets:
                if first != _PUBLISH_QOS0:
                    publishes = self._sort(packets, acks)
                    break
            # else the usual read of requests: QoS 0 PUBLISH packets only
            out = session.on_publish(publishes) if publishes else b""
        except mqtt.MqttProtocolError as e:
            log.warning("mqtt device link: bad data from the broker %s", kv(broker=session.address, error=e))
            self.abort()
            return
        if acks:
            out = b"".join(acks) + out
        if session.queued:
            out += session.take_output()
        if out:
            self.write(out)

    def _sort(self, packets: list[tuple[int, bytes]], acks: list[bytes]) -> list[tuple[int, bytes]]:
        """Handle the control packets among ``packets`` and put a PUBACK for each QoS 1 PUBLISH in ``acks``; the
        PUBLISH packets, in order."""
        publishes = []
        for first, body in packets:
            if first & 0xF0 == 0x30:
                qos = first & 0x06
                if qos:
                    acks.append(_PUBACK_HEAD + _packet_id(body, qos))
                publishes.append((first, body))
            else:
                self._control(first, body)
        return publishes

    def _control(self, first: int, body: bytes) -> None:
        kind = first >> 4
        session = self.session
        if kind == mqtt.PUBACK:
            session.released(session.window.acked(body))
        elif kind == mqtt.CONNACK:
            connack = mqtt.parse_connack(body, version=V5)
            if not self.connack.done():
                self.connack.set_result(connack)
        elif kind in (mqtt.SUBACK, mqtt.UNSUBACK):
            pid, codes = mqtt.parse_suback(body, version=V5)
            fut = self.acks.get(pid)
            if fut is not None and not fut.done():
                fut.set_result(codes)
        elif kind == mqtt.DISCONNECT:
            code, text = mqtt.parse_disconnect(body)
            log.warning(
                "mqtt device link: broker disconnects %s",
                kv(broker=session.address, reason=mqtt.reason(code), text=text or None),
            )
            self.abort()
        elif kind != mqtt.PINGRESP:
            raise mqtt.MqttProtocolError(f"unexpected packet type {kind}")

    def pause_writing(self) -> None:  # the send buffer is full: stop reading until it drains
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


def _packet_id(body: bytes, qos: int) -> bytes:
    """The packet identifier of a QoS 1 PUBLISH (its two bytes), read without parsing the rest."""
    if qos != 0x02:
        raise mqtt.MqttProtocolError("PUBLISH at QoS 2 (every subscription is at most QoS 1)")
    if len(body) < 2:
        raise mqtt.MqttProtocolError("truncated PUBLISH")
    end = 4 + ((body[0] << 8) | body[1])
    pid = body[end - 2 : end]
    if len(pid) != 2 or pid == b"\x00\x00":
        raise mqtt.MqttProtocolError("QoS 1 PUBLISH without a packet identifier")
    return pid


class MqttSession:
    """Keeps ``filters`` ((topic filter, QoS) pairs) subscribed on the broker at ``url`` (module doc);
    ``on_publish(packets)`` takes the ``(first byte, body)`` of the PUBLISH packets of one read and returns the
    bytes to send back."""

    def __init__(
        self,
        url: str,
        filters: Sequence[tuple[str, int]],
        *,
        on_publish: OnPublish,
        auth: MqttAuth | None = None,
        client_id: str = "ida-gw-r",
        keepalive: int = 30,
        reconnect_max: float = 30.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        if not filters:
            raise ValueError("a session subscribes to at least one topic filter")
        self.address = parse_url(url)
        self.auth = auth or MqttAuth()
        self.client_id = client_id
        self.filters = list(filters)
        self.keepalive = keepalive
        self.reconnect_max = max(1.0, float(reconnect_max))
        self.connect_timeout = connect_timeout
        self.on_publish = on_publish
        self.on_subscribed = on_subscribed
        self.window = Qos1Window()
        self._conn: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._started = False
        self._out: list[bytes] = []  # QoS 1 packets to write at the end of this read or turn of the loop
        self._flush: asyncio.Handle | None = None
        self.connects = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mqtt-device-link")

    async def unsubscribe(self, timeout: float = 2.0) -> None:
        """Stop taking messages (a shared group gives new ones to other members); writes still go out."""
        conn = self._conn
        if conn is None or not self._ready.is_set():
            return
        self._ready.clear()
        try:
            pid = self.window.take_id()
            packet = mqtt.unsubscribe(pid, [f for f, _ in self.filters], version=V5)
            codes = await self._request(conn, pid, packet, timeout)
        except (ConnectionError, TimeoutError) as e:
            log.info("mqtt device link unsubscribe failed %s", kv(error=e))
            return
        log.debug("mqtt device link unsubscribed %s", kv(codes=codes))

    async def stop(self) -> None:
        """Send what is queued and DISCONNECT, and close the connection."""
        if not self._started:
            return
        self._started = False
        self._ready.clear()
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.write(self.take_output() + mqtt.DISCONNECT_BYTES)
            conn.transport.close()
        if self._task is not None:
            await cancel_all([self._task])
        self._task = None
        log.info("mqtt device link stopped %s", kv(broker=self.address))

    @property
    def ready(self) -> bool:
        """Connected and subscribed."""
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        return await wait_set(self._ready, timeout)

    # -- sending ---------------------------------------------------------------------------------------------
    def write(self, data: bytes) -> bool:
        """Send ``data`` now; False when not connected."""
        conn = self._conn
        return conn is not None and conn.write(data)

    def publish_qos1(self, topic: bytes, payload: bytes) -> bool:
        """Publish at QoS 1 (module doc: within the broker's window, written with the others of this turn of
        the loop); False when not connected (the message is not sent)."""
        if self._conn is None:
            return False
        packet = self.window.publish(topic, payload)
        if packet is not None:
            self._queue(packet)
        return True

    def released(self, packets: list[bytes]) -> None:
        """Packets the window let go (a PUBACK made room): written with the rest."""
        for packet in packets:
            self._queue(packet)

    @property
    def queued(self) -> bool:
        """QoS 1 packets wait to be written."""
        return bool(self._out)

    def take_output(self) -> bytes:
        """The QoS 1 packets queued for writing (the caller writes them)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out = []
        return out

    def _queue(self, packet: bytes) -> None:
        self._out.append(packet)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._write_queued)

    def _write_queued(self) -> None:
        self._flush = None
        queued = len(self._out)
        if queued and not self.write(self.take_output()):
            self.window.dropped += queued  # the connection ended first

    # -- the connection loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = 1.0
        if not self.address.tls:
            log.warning(
                "mqtt device link INSECURE plain mode: no TLS; factory bench only %s", kv(broker=self.address)
            )
        while self._started:
            subscribed = False
            try:
                subscribed = await self._session()
            except (OSError, ConnectionError, TimeoutError, mqtt.MqttProtocolError, ssl.SSLError) as e:
                if self._started:
                    log.warning(
                        "mqtt device link down, reconnecting %s",
                        kv(broker=self.address, error=e or type(e).__name__, retry_s=round(delay, 1)),
                    )
            finally:
                self._ready.clear()
                conn, self._conn = self._conn, None
                self.window.dropped += len(self._out)
                self._out = []
                if conn is not None:
                    conn.abort()
            if not self._started:
                return
            if subscribed:
                delay = 1.0
            await asyncio.sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 2, self.reconnect_max)

    async def _session(self) -> bool:
        """Connect, subscribe, serve until the connection closes; True when it got as far as subscribed."""
        loop = asyncio.get_running_loop()
        addr = self.address
        tls = ssl.create_default_context(cafile=self.auth.ca_file) if addr.tls else None
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
        hello = mqtt.connect(
            self.client_id,
            self.keepalive,
            version=V5,
            username=username,
            password=password,
            max_packet=MAX_PACKET,
        )
        conn.write(hello)
        connack = await asyncio.wait_for(asyncio.shield(conn.connack), self.connect_timeout)
        if connack.code >= 0x80:
            raise ConnectionError(f"broker refused the connection: {mqtt.reason(connack.code)}")
        receive_max = connack.properties.get(_RECEIVE_MAXIMUM)
        self.window.reset(receive_max if isinstance(receive_max, int) else 0xFFFF)
        server_keepalive = connack.properties.get(mqtt.PROP_SERVER_KEEP_ALIVE)
        keepalive = server_keepalive if isinstance(server_keepalive, int) else self.keepalive
        pid = self.window.take_id()
        packet = mqtt.subscribe(pid, self.filters, version=V5)
        codes = await self._request(conn, pid, packet, self.connect_timeout)
        if len(codes) != len(self.filters) or any(code >= 0x80 for code in codes):
            refused = [
                f"{f}: {mqtt.reason(c)}" for (f, _), c in zip(self.filters, codes, strict=False) if c >= 0x80
            ]
            raise ConnectionError(f"broker refused the subscription: {', '.join(refused) or codes}")
        if not self._started:
            return True
        self.connects += 1
        if self.on_subscribed is not None:
            self.on_subscribed()
        self._ready.set()
        log.info(
            "mqtt device link subscribed %s",
            kv(
                broker=addr,
                client_id=self.client_id,
                filters=",".join(f for f, _ in self.filters),
                connects=self.connects,
            ),
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

    async def _request(self, conn: _Connection, pid: int, packet: bytes, timeout: float) -> list[int]:
        """Send the SUBSCRIBE or UNSUBSCRIBE ``packet`` (packet identifier ``pid``), wait for its reason codes."""
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        conn.acks[pid] = fut
        try:
            if not conn.write(packet):
                raise ConnectionError("not connected")
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            conn.acks.pop(pid, None)
            self.window.release_id(pid)

    async def _keepalive(self, conn: _Connection, keepalive: int) -> None:
        while True:
            await asyncio.sleep(keepalive / 2)
            if time.monotonic() - conn.last_read > keepalive * 1.5:
                log.warning(
                    "mqtt device link: broker silent %s", kv(broker=self.address, keepalive=keepalive)
                )
                conn.abort()
                return
            conn.write(mqtt.PINGREQ_BYTES)
