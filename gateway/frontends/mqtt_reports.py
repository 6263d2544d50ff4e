"""Device messages over MQTT other than resolve requests, all on the paho link (gateway/paholink.py): reports
(stored, then acknowledged on ``…/ack`` at QoS 1), config acks, device status, and each device's desired config
published retained at QoS 1 on ``…/cfg``.

Identity: with the broker configuration of ``ida broker config`` (docs/security-mqtt.md) a device can publish
only under its own topic key (its username), so the topic key *is* the authenticated device. A report, config
ack or status whose payload ``id`` names another device is refused (report: ack code 403; config ack: counted
403 and ignored; status: dropped). A payload that does not decode is answered with a 4.00 ack when its boot/seq
can be read (so the device can drop a report that can never be stored), else counted and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.frontends.mqtt_answers import ROOT, Tally
from gateway.logfmt import kv
from gateway.registry import Registry
from proto import devicemsg, identifier

__all__ = ["DeviceMessages", "peek_boot_seq", "TRANSPORT"]

log = logging.getLogger(__name__)

TRANSPORT = "mqtt"
Publish = Callable[..., object]  # PahoLink.publish(topic, payload, qos=, retain=)


def peek_boot_seq(payload: bytes) -> tuple[int, int] | None:
    """The (boot, seq) of a report that did not decode, if they can be read."""
    try:
        obj = devicemsg.loads(payload)
    except devicemsg.WireError:
        return None
    if not isinstance(obj, dict):
        return None
    boot, seq = obj.get(devicemsg.KEYS["boot"]), obj.get(devicemsg.KEYS["seq"])
    if (
        not (isinstance(boot, int) and isinstance(seq, int))
        or isinstance(boot, bool)
        or isinstance(seq, bool)
    ):
        return None
    return (boot, seq) if 0 <= boot < 2**64 and 0 <= seq < 2**64 else None


def device_of(key: str) -> str:
    """The normalised identifier named by a topic key (WireError / IdentifierError when it names none)."""
    return identifier.normalise(devicemsg.identifier_from_topic_key(key))


def _decode(name: str, key: str, payload: bytes) -> tuple[dict[str, Any], str, str]:
    """(fields, the device the topic key names, the device the payload's ``id`` names) of a message ``name``;
    ValueError (WireError, IdentifierError) when any of them cannot be read."""
    fields = devicemsg.decode(name, payload)
    return fields, device_of(key), identifier.normalise(fields["id"])


class DeviceMessages:
    """``report``, ``config_ack`` and ``status`` take a message of the topic key ``key``; ``publish`` is the paho
    link's; ``spawn`` runs a coroutine as a task the front end cancels at stop."""

    def __init__(
        self,
        registry: Registry,
        tally: Tally,
        *,
        publish: Publish,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.registry = registry
        self.tally = tally
        self.publish = publish
        self.spawn = spawn

    # reports -------------------------------------------------------------------------------------------
    def _ack(self, key: str, boot: int, seq: int, code: int, device: str | None = None) -> None:
        fields = {"boot": boot, "seq": seq, "code": code}
        cfgver = self.registry.desired_cfgver(device) if device is not None and code == devicemsg.OK else None
        if cfgver is not None:  # the device fetches it when it holds an older one
            fields["cfgver"] = cfgver
        payload = devicemsg.encode("report_ack", fields)
        self.publish(f"{ROOT}/{key}/ack", payload, qos=1)
        self.tally.code(code)

    def report(self, key: str, payload: bytes) -> None:
        try:
            fields, device, claimed = _decode("report", key, payload)
        except ValueError as e:  # WireError, IdentifierError
            bs = peek_boot_seq(payload)
            log.info("mqtt bad report %s", kv(key=key, error=e, answered=bs is not None))
            if bs is None:
                self.tally.dropped(devicemsg.BAD_REQUEST)
            else:  # a report that can never be stored: tell the device, so it can drop it from its queue
                self._ack(key, bs[0], bs[1], devicemsg.BAD_REQUEST)
            return
        boot, seq = fields["boot"], fields["seq"]
        if claimed != device:
            log.warning("mqtt report for another device %s", kv(topic_device=device, payload_id=claimed))
            self._ack(key, boot, seq, devicemsg.FORBIDDEN)
            return
        self.spawn(self._store_report(key, device, fields))

    async def _store_report(self, key: str, device: str, fields: dict[str, Any]) -> None:
        """Acknowledged only once the report's batch is committed (``Registry.record_report_async``)."""
        boot, seq = fields["boot"], fields["seq"]
        try:
            new = await self.registry.record_report_async(device, fields, TRANSPORT)
        except ValueError as e:
            log.info("mqtt report rejected %s", kv(device=device, boot=boot, seq=seq, error=e))
            self._ack(key, boot, seq, devicemsg.BAD_REQUEST)
            return
        except Exception:
            # Not stored (database trouble): no ack, so the device keeps it and sends it again.
            log.exception("mqtt report not stored %s", kv(device=device, boot=boot, seq=seq))
            self.tally.code(devicemsg.INTERNAL)
            return
        log.debug("mqtt report %s", kv(device=device, boot=boot, seq=seq, new=new))
        self._ack(key, boot, seq, devicemsg.OK, device)

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
