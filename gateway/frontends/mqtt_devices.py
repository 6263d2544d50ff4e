"""Device messages over MQTT other than resolve requests and reports, all on the paho link (gateway/paholink.py):
config acks, device status, and each device's desired config published retained at QoS 1 on ``…/cfg``.

Identity: with the broker configuration of ``ida broker config`` (docs/security-mqtt.md) a device can publish
only under its own topic key (its username), so the topic key *is* the authenticated device (:func:`device_of`). A
config ack or status whose payload ``id`` names another device is refused (config ack: counted 403 and ignored;
status: dropped). A payload that does not decode is counted and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.frontends.mqtt_answers import Tally
from gateway.logfmt import kv
from gateway.registry import Registry
from proto import devicemsg, identifier

__all__ = ["DeviceMessages", "device_of", "TRANSPORT"]

log = logging.getLogger(__name__)

TRANSPORT = "mqtt"
Publish = Callable[..., object]  # PahoLink.publish(topic, payload, qos=, retain=)


def device_of(key: str) -> str:
    """The normalised identifier named by a topic key (WireError / IdentifierError when it names none)."""
    return identifier.normalise(devicemsg.identifier_from_topic_key(key))


def _decode(name: str, key: str, payload: bytes) -> tuple[dict[str, Any], str, str]:
    """(fields, the device the topic key names, the device the payload's ``id`` names) of a message ``name``;
    ValueError (WireError, IdentifierError) when any of them cannot be read."""
    fields = devicemsg.decode(name, payload)
    return fields, device_of(key), identifier.normalise(fields["id"])


class DeviceMessages:
    """``config_ack`` and ``status`` take a message of the topic key ``key``; ``publish`` is the paho link's."""

    def __init__(self, registry: Registry, tally: Tally, *, publish: Publish) -> None:
        self.registry = registry
        self.tally = tally
        self.publish = publish

    # config acks and status ----------------------------------------------------------------------------
    def config_ack(self, key: str, payload: bytes) -> None:
        try:
            fields, device, claimed = _decode("config_ack", key, payload)
        except ValueError as e:
            log.info("mqtt bad config ack %s", kv(key=key, error=e))
            self.tally.dropped(devicemsg.BAD_REQUEST)
            return
        if claimed != device:
            log.warning("mqtt config ack for another device %s", kv(topic_device=device, payload_id=claimed))
            self.tally.code(devicemsg.FORBIDDEN)
            return
        self.registry.record_config_ack(device, fields["cfgver"], fields["code"], fields.get("msg"))
        self.tally.code(devicemsg.OK)

    def status(self, key: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status
            return
        try:
            fields, device, claimed = _decode("status", key, payload)
        except ValueError as e:
            log.info("mqtt bad status %s", kv(key=key, error=e))
            self.tally.dropped()
            return
        if claimed != device:
            log.warning("mqtt status for another device %s", kv(topic_device=device, payload_id=claimed))
            self.tally.dropped()
            return
        self.registry.set_status(device, fields["online"], TRANSPORT)
        log.debug("mqtt status %s", kv(device=device, online=fields["online"]))

    # desired config ------------------------------------------------------------------------------------
    def publish_all_configs(self) -> None:
        """Every device's desired config (at every connect: it restores them after a broker restart without
        persistence; the device ignores a cfgver it already has)."""
        try:
            configs = self.registry.desired_configs()
        except Exception:
            log.exception("mqtt could not read desired configs")
            return
        for ident, cfg in configs:
            self.publish_config(ident, cfg)
        if configs:
            log.info("mqtt desired configs published %s", kv(devices=len(configs)))

    def publish_config(self, ident: str, cfg: dict[str, Any]) -> None:
        """Also called in the thread that changed the config (paho's publish is thread-safe)."""
        try:
            payload = devicemsg.encode("config", cfg) if cfg else b""
        except devicemsg.WireError as e:
            log.error("mqtt desired config not encodable %s", kv(device=ident, error=e))
            return
        self.publish(devicemsg.topic(ident, "cfg"), payload, qos=1, retain=True)
        log.debug("mqtt config published %s", kv(device=ident, cfgver=cfg.get("cfgver"), clear=not cfg))
