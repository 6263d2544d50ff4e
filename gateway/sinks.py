"""Where the outbox delivers (gateway/outbox.py): the :class:`Sink` interface and its two kinds, an HTTP webhook
(:class:`WebhookSink`) and an MQTT topic (:class:`MqttSink`, over gateway/paholink.py), made from a URL by
:func:`make_sink`. A sink returns once its far end acknowledged a payload and raises otherwise; the outbox keeps the
row and retries it (the payload's form and the delivery guarantee are in gateway/outbox.py's docstring).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from proto import devicemsg

__all__ = ["DEFAULT_TOPIC", "DeliveryError", "MqttSink", "Sink", "WebhookSink", "make_sink"]

DEFAULT_TOPIC = "ida/v1/north/reports"


class DeliveryError(Exception):
    """A sink did not take a payload (it will be retried)."""


class Sink(Protocol):
    """Where the outbox delivers. ``name`` must be stable across restarts (it is stored with each row)."""

    name: str

    async def start(self) -> None: ...

    async def deliver(self, payload: dict[str, Any]) -> None:
        """Return once the payload is acknowledged; raise (DeliveryError or anything else) when not."""
        ...

    async def close(self) -> None: ...


class WebhookSink:
    """HTTP POST of the JSON payload; any 2xx answer means delivered."""

    def __init__(self, url: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL {url!r} must start with http:// or https://")
        self.url = url
        self.name = f"webhook {url}"
        self._timeout = timeout
        self._headers = dict(headers or {})
        self._session: Any = None

    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))

    async def deliver(self, payload: dict[str, Any]) -> None:
        import aiohttp

        if self._session is None:
            await self.start()
        key = f"{payload.get('id')}|{payload.get('boot')}|{payload.get('seq')}"
        headers = {**self._headers, "Idempotency-Key": key}
        try:
            async with self._session.post(self.url, json=payload, headers=headers) as resp:
                if not 200 <= resp.status < 300:
                    raise DeliveryError(f"{self.url} answered {resp.status}")
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"{self.url}: {type(e).__name__}: {e}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class MqttSink:
    """Publish the JSON payload at QoS 1 on a broker and wait for its PUBACK.

    ``topic`` may contain ``{key}``, replaced by the device's topic key (``devicemsg.topic_key``), e.g.
    ``ida/v1/north/{key}/report``. With ``require_subscriber`` (default) a PUBACK saying "no matching
    subscribers" counts as not delivered, so reports are kept until a consumer (or a bridge, or a persistent
    session) subscribes instead of vanishing in the broker.
    """

    def __init__(
        self,
        url: str,
        topic: str = DEFAULT_TOPIC,
        *,
        qos: int = 1,
        client_id: str | None = None,
        timeout: float = 10.0,
        require_subscriber: bool = True,
        reconnect_max: int = 30,
        auth: Any = None,  # gateway.broker.MqttAuth: the gateway's broker credentials and CA
    ) -> None:
        from gateway.broker import default_client_id
        from gateway.paholink import PahoLink

        if qos not in (1, 2):
            raise ValueError("the outbox MQTT sink needs QoS 1 or 2 (it waits for the acknowledgement)")
        self.url = url
        self.topic = topic
        self.name = f"mqtt {url} {topic}"
        self._qos = qos
        self._timeout = timeout
        self._require_subscriber = require_subscriber
        self._link = PahoLink(
            url,
            client_id=client_id or default_client_id("ida-north"),
            name="north",
            reconnect_max=reconnect_max,
            auth=auth,
        )

    async def start(self) -> None:
        await self._link.start()

    async def deliver(self, payload: dict[str, Any]) -> None:
        from gateway.paholink import MqttError

        if not await self._link.wait_connected(self._timeout):
            raise DeliveryError(f"not connected to {self._link.address}")
        topic = self.topic.replace("{key}", devicemsg.topic_key(str(payload.get("id", ""))))
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            await self._link.publish_acked(
                topic, body, qos=self._qos, timeout=self._timeout, require_subscriber=self._require_subscriber
            )
        except MqttError as e:
            raise DeliveryError(str(e)) from None

    async def close(self) -> None:
        await self._link.stop()


def make_sink(url: str, topic: str = DEFAULT_TOPIC, auth: Any = None) -> Sink:
    """A sink from a URL: ``mqtt://host:port`` (publishing on ``topic``) or ``http(s)://…`` (webhook)."""
    if url.startswith(("http://", "https://")):
        return WebhookSink(url)
    if url.startswith(("mqtt://", "mqtts://")):
        return MqttSink(url, topic, auth=auth)
    raise ValueError(f"outbox sink {url!r}: use mqtt://host:port or http(s)://…")
