"""The paho link: one paho-mqtt 2.x client (MQTT v5) bridged to an asyncio loop, for the broker traffic that needs
what paho is there for (QoS 1 with re-sending, retained messages, reconnects): the MQTT front end's config acks,
device status and desired config (gateway/frontends/mqtt_devices.py), and the outbox's MQTT sink. Resolve requests
and reports have a connection of their own without paho (gateway/frontends/mqtt_link.py); where the broker
is and the gateway's credentials are in gateway/broker.py.

Threading model (a decision, see ``PahoLink``): paho's network loop runs in paho's own thread (``loop_start``);
its callbacks do nothing but hand the event to the asyncio loop with ``call_soon_threadsafe``. All our logic
(subscribing, decoding, the registry, the resolver) therefore runs on the asyncio loop, never in paho's thread.
Publishing is done from the asyncio loop: paho's ``publish``/``subscribe`` are thread-safe (they queue the packet
and wake paho's select loop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.aio import wait_set
from gateway.broker import MqttAuth, default_client_id, parse_url
from gateway.logfmt import kv

__all__ = ["PahoLink", "MqttError"]

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 16  # MQTT v5 PUBACK reason code (a success code: the broker accepted the message)


class MqttError(Exception):
    """A publish or subscribe that the broker refused, that timed out, or that was attempted while disconnected."""


class PahoLink:
    """A paho client that connects by itself, reconnects by itself, and reports to the asyncio loop.

    Why paho's thread (``loop_start``) rather than driving paho from asyncio (add_reader/add_writer +
    ``loop_misc``): paho's reconnect with back-off (``reconnect_delay_set``), keepalive and the re-sending of
    unacknowledged QoS 1 messages all live in ``loop_forever``; integrating with asyncio would mean
    re-implementing the reconnect loop and doing a blocking ``connect()`` (DNS + TCP) on the event loop. The cost
    is one thread per broker connection and one ``call_soon_threadsafe`` hop per burst of messages: messages queue
    in a deque and the loop is woken only when it was empty, so under load one wake-up of the loop handles
    every message paho read meanwhile.

    ``on_connect`` and ``on_message(topic, payload, retained)`` run on the asyncio loop.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        keepalive: int = 30,
        reconnect_min: int = 1,
        reconnect_max: int = 30,
        on_connect: Callable[[], None] | None = None,
        on_message: Callable[[str, bytes, bool], None] | None = None,
        name: str = "mqtt",
        auth: MqttAuth | None = None,
    ) -> None:
        self.address = parse_url(url)
        self.auth = auth or MqttAuth()
        self.client_id = client_id or default_client_id()
        self.name = name
        self._keepalive = keepalive
        self._on_connect_cb = on_connect
        self._on_message_cb = on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._pending_pub: dict[int, asyncio.Future[int]] = {}  # mid -> PUBACK reason code
        self._pending_sub: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._started = False
        self._inbox: collections.deque[tuple[str, bytes, bool]] = collections.deque()  # paho thread -> loop
        self._inbox_posted = False  # a drain of the inbox is scheduled on the loop
        self.connects = 0  # successful CONNACKs so far (a reconnect makes it > 1)

        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
        )
        c.reconnect_delay_set(min_delay=reconnect_min, max_delay=max(reconnect_min, reconnect_max))
        username = self.auth.username or self.address.username
        if username is not None:
            c.username_pw_set(username, self.auth.password if self.auth.username else self.address.password)
        if self.address.tls:  # the broker's certificate must chain to ca_file and name the host
            c.tls_set(ca_certs=self.auth.ca_file)
        c.on_socket_open = self._paho_socket_open
        c.on_connect = self._paho_connect
        c.on_disconnect = self._paho_disconnect
        c.on_message = self._paho_message
        c.on_publish = self._paho_publish
        c.on_subscribe = self._paho_subscribe
        c.on_unsubscribe = self._paho_unsubscribe
        self._client = c

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin connecting (returns at once; the first connection is retried like any reconnect)."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._client.connect_async(
            self.address.host, self.address.port, keepalive=self._keepalive, clean_start=True
        )
        self._client.loop_start()
        user = self.auth.username or self.address.username or "-"
        log.info(
            "mqtt connecting %s", kv(link=self.name, broker=self.address, client_id=self.client_id, user=user)
        )
        if not self.address.tls:
            log.warning(
                "mqtt INSECURE plain mode: no TLS, traffic%s in clear; factory bench only %s",
                " and password" if user != "-" else "",
                kv(link=self.name, broker=self.address),
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT (queued after what is already queued) and stop paho's thread."""
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._client.loop_stop), timeout)
        except TimeoutError:
            log.warning("mqtt network thread did not stop %s", kv(link=self.name, waited=timeout))
        self._connected.clear()
        futures: list[asyncio.Future[Any]] = [*self._pending_pub.values(), *self._pending_sub.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(MqttError("link stopped"))
        self._pending_pub.clear()
        self._pending_sub.clear()
        log.info("mqtt stopped %s", kv(link=self.name))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        return await wait_set(self._connected, timeout)

    # -- actions (call on the asyncio loop) ------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Fire and forget. QoS 0 while disconnected is dropped (False); QoS 1 is queued and sent on reconnect."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return True
        return qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN

    async def publish_acked(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10.0,
        require_subscriber: bool = False,
    ) -> None:
        """Publish at QoS 1/2 and return once the broker acknowledged it (PUBACK/PUBCOMP); MqttError otherwise.

        ``require_subscriber``: treat the MQTT v5 reason "No matching subscribers" (16) as a failure, so a
        message nobody received is not counted as delivered.
        """
        if qos not in (1, 2):
            raise ValueError("publish_acked needs QoS 1 or 2")
        if not self._connected.is_set():
            raise MqttError(f"{self.name}: not connected to {self.address}")
        loop = asyncio.get_running_loop()
        # publish() and the registration below run without an await in between, and PUBACKs are handed to this
        # loop with call_soon_threadsafe, so an acknowledgement is never processed before its future exists.
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"{self.name}: publish failed: {paho.error_string(info.rc)}")
        fut: asyncio.Future[int] = loop.create_future()
        self._pending_pub[info.mid] = fut
        try:
            code = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise MqttError(
                f"{self.name}: no acknowledgement within {timeout:g} s (mid {info.mid})"
            ) from None
        finally:
            self._pending_pub.pop(info.mid, None)
        if require_subscriber and code == NO_MATCHING_SUBSCRIBERS:
            raise MqttError(f"{self.name}: broker has no subscriber for {topic}")

    def subscribe(self, topics: list[str], qos: int = 1) -> asyncio.Future[list[ReasonCode]]:
        """Subscribe; the future resolves with the SUBACK reason codes (MqttError when not connected)."""
        assert self._loop is not None
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        rc, mid = self._client.subscribe([(t, SubscribeOptions(qos=qos)) for t in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            fut.set_exception(MqttError(f"{self.name}: subscribe failed: {paho.error_string(rc)}"))
        else:
            self._pending_sub[mid] = fut
        return fut

    def unsubscribe(self, topics: list[str]) -> None:
        self._client.unsubscribe(topics)

    # -- paho thread -> asyncio loop -------------------------------------------------------------------
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def _paho_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle on; with it, a QoS 1 exchange (PUBLISH, PUBACK, our answer) stalls on delayed ACKs
        # (~40 ms per hop on Linux). Small request/answer traffic wants every packet out at once.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _paho_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            log.warning(
                "mqtt connect refused %s", kv(link=self.name, broker=self.address, reason=reason_code)
            )
            return
        self._post(self._connected_in_loop)

    def _paho_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._post(self._disconnected_in_loop, str(reason_code))

    def _paho_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._inbox.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
        if not self._inbox_posted:  # the loop clears the flag before it drains: no message is left behind
            self._inbox_posted = True
            self._post(self._drain_inbox)

    def _paho_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._post(self._published_in_loop, mid, reason_code.value, reason_code.is_failure, str(reason_code))

    def _paho_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        self._post(self._subscribed_in_loop, mid, list(reason_codes))

    def _paho_unsubscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        pass

    # -- on the asyncio loop ---------------------------------------------------------------------------
    def _connected_in_loop(self) -> None:
        if not self._started:
            return
        self.connects += 1
        self._connected.set()
        log.info(
            "mqtt connected %s",
            kv(link=self.name, broker=self.address, client_id=self.client_id, connects=self.connects),
        )
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("mqtt on_connect handler failed %s", kv(link=self.name))

    def _disconnected_in_loop(self, reason: str) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and self._started:
            log.warning(
                "mqtt disconnected, reconnecting %s", kv(link=self.name, broker=self.address, reason=reason)
            )

    def _drain_inbox(self) -> None:
        self._inbox_posted = False
        inbox = self._inbox
        while inbox:
            topic, payload, retained = inbox.popleft()
            try:
                self._message_in_loop(topic, payload, retained)
            except Exception:  # one bad message must not hold back the ones queued behind it
                log.exception("mqtt message handler failed %s", kv(link=self.name, topic=topic))

    def _message_in_loop(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._on_message_cb is None or not self._started:
            return
        self._on_message_cb(topic, payload, retained)

    def _published_in_loop(self, mid: int, code: int, failure: bool, reason: str) -> None:
        fut = self._pending_pub.get(mid)
        if fut is None or fut.done():
            return
        if failure:
            fut.set_exception(MqttError(f"{self.name}: broker refused publish: {reason} ({code})"))
        else:
            fut.set_result(code)

    def _subscribed_in_loop(self, mid: int, codes: list[ReasonCode]) -> None:
        fut = self._pending_sub.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)
