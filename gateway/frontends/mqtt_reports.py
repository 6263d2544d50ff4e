"""Reports over MQTT (``ida/v1/d/<key>/rpt``, QoS 1): decoded and checked, committed by the registry's ingest
engine, and acknowledged with a ``report_ack`` on ``…/<key>/ack`` (QoS 1) only once the commit is durable.

Both MQTT links hand reports here: the device link (gateway/frontends/mqtt_link.py, asyncio) and, with
``MqttFrontEnd(fast_path=False)``, the paho link; ``send(key, payload)`` publishes an ack on the link in use.

For each report of the topic key ``key`` (docs/protocol.md, "Reports the gateway stores"):

* ``devicemsg.decode_report`` decodes it and checks every field. A report that can never be stored gets an ack
  with code 400 at once (the device drops it from its queue; why is logged: a ``report_ack`` has no ``msg``),
  when its boot/seq can be read, else it is counted and dropped. A topic key that names no identifier is the same.
* Identity: with the broker configuration of ``ida broker config`` (docs/security-mqtt.md) a device can publish
  only under its own topic key (its username), so the topic key *is* the authenticated device. A report whose
  ``id`` names another device gets code 403.
* ``Registry.submit_report`` queues it for a group commit. ``Overloaded`` (too many wait for their commit): no
  ack -- the device keeps the report and sends it again after its own timeout (its in-flight window is one
  report) -- counted (``ida_reports_overloaded_total{frontend="mqtt"}``), nothing stored.
* After the commit: new or duplicate -> code 1 with the device's desired ``cfgver`` when one is set; the row's own
  permanent error (a ValueError) -> 400; a failed commit (StorageError) or anything else -> no ack (the device
  sends it again), counted as 500.

Every ack and refusal is counted in ``ida_requests_total{frontend="mqtt"}`` by its code (``Tally``). The reports
waiting for their commit are :attr:`Reports.inflight` (a stopping front end waits for them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from gateway.errors import Overloaded, StorageError
from gateway.frontends.common import InFlight
from gateway.frontends.mqtt_answers import Tally
from gateway.frontends.mqtt_devices import TRANSPORT, device_of
from gateway.ingest import IdentifierCache
from gateway.logfmt import kv
from gateway.registry import Registry
from proto import devicemsg

__all__ = ["Reports", "peek_boot_seq"]

log = logging.getLogger(__name__)

DEVICES_MAX = 65_536  # topic keys remembered with their device (when full: emptied, then filled again)


def peek_boot_seq(payload: bytes) -> tuple[int, int] | None:
    """The (boot, seq) of a report that did not pass, if they can be read (and sent back in an ack)."""
    try:
        obj = devicemsg.loads(payload)
    except devicemsg.WireError:
        return None
    if not isinstance(obj, dict):
        return None
    boot, seq = obj.get(devicemsg.KEYS["boot"]), obj.get(devicemsg.KEYS["seq"])
    if type(boot) is not int or type(seq) is not int:
        return None
    return (boot, seq) if 0 <= boot < 2**64 and 0 <= seq < 2**64 else None


class Reports:
    """``handle(key, payload)`` takes a report published on ``ida/v1/d/<key>/rpt`` (module doc); ``send(key,
    payload)`` publishes a ``report_ack`` on ``ida/v1/d/<key>/ack`` at QoS 1."""

    def __init__(self, registry: Registry, tally: Tally, send: Callable[[str, bytes], object]) -> None:
        self.registry = registry
        self.tally = tally
        self.send = send
        self.inflight = InFlight()  # reports waiting for their commit
        self._devices: dict[str, str] = {}  # topic key -> the device it names (normalised)
        self._ids = IdentifierCache()  # a report's id -> normalised

    def handle(self, key: str, payload: bytes) -> None:
        device = self._devices.get(key)
        try:
            if device is None:
                device = self._device(key)
            report = devicemsg.decode_report(payload)
            claimed = report.id if report.id == device else self._ids.normalise(report.id)
        except ValueError as e:  # WireError (InvalidReport: permanent), IdentifierError
            self._refuse(key, payload, e)
            return
        boot, seq = report.boot, report.seq
        if claimed != device:
            log.warning("mqtt report for another device %s", kv(topic_device=device, payload_id=report.id))
            self._ack(key, boot, seq, devicemsg.FORBIDDEN)
            return
        try:
            fut = self.registry.submit_report(device, report, TRANSPORT)
        except Overloaded as e:
            # No ack: the device keeps the report and sends it again after its timeout. Debug only, so that an
            # overload does not become a flood of log lines.
            self.tally.overloaded()
            log.debug("mqtt report refused %s", kv(device=device, boot=boot, seq=seq, error=e))
            return
        self.inflight.__enter__()
        fut.add_done_callback(functools.partial(self._committed, key, device, boot, seq))

    def _device(self, key: str) -> str:
        device = device_of(key)
        if len(self._devices) >= DEVICES_MAX:
            self._devices.clear()
        self._devices[key] = device
        return device

    def _refuse(self, key: str, payload: bytes, error: ValueError) -> None:
        """A report that can never be stored: a 400 ack when its boot/seq can be read, else dropped."""
        bs = peek_boot_seq(payload)
        log.info("mqtt bad report %s", kv(key=key, error=error, answered=bs is not None))
        if bs is None:
            self.tally.dropped(devicemsg.BAD_REQUEST)
        else:  # tell the device, so it drops the report from its queue
            self._ack(key, bs[0], bs[1], devicemsg.BAD_REQUEST)

    def _committed(self, key: str, device: str, boot: int, seq: int, fut: asyncio.Future[bool]) -> None:
        self.inflight.__exit__(None, None, None)
        if fut.cancelled():
            return
        error = fut.exception()
        if error is None:
            self._ack(key, boot, seq, devicemsg.OK, self.registry.desired_cfgver(device))
            return
        if isinstance(error, ValueError):  # this row alone can never be stored
            log.info("mqtt report rejected %s", kv(device=device, boot=boot, seq=seq, error=error))
            self._ack(key, boot, seq, devicemsg.BAD_REQUEST)
            return
        # Not stored (the commit failed: logged by the registry; or a bug): no ack, so the device sends it again.
        if not isinstance(error, StorageError):
            log.error("mqtt report not stored %s", kv(device=device, boot=boot, seq=seq, error=repr(error)))
        self.tally.code(devicemsg.INTERNAL)

    def _ack(self, key: str, boot: int, seq: int, code: int, cfgver: int | None = None) -> None:
        """``cfgver``: the device's desired config version (it fetches the config when it holds an older one)."""
        try:
            payload = devicemsg.encode_report_ack(boot, seq, code, cfgver)
        except devicemsg.WireError as e:  # a boot/seq a report_ack cannot carry: nothing to answer with
            log.info("mqtt report not answerable %s", kv(key=key, boot=boot, seq=seq, error=e))
            self.tally.dropped(code)
            return
        self.send(key, payload)
        self.tally.code(code)
