"""How a device of the light fleet resolves identifiers (:mod:`tools.harness.sim.light`): one resolve at a time,
spread over ``resolve_every`` as the reports are spread over the interval, of its own identifier or of the
configured ones in turn.

CoAP devices: ``GET /r/<id>`` with the ETag of the last answer (2.03 when unchanged). MQTT devices: QoS 0 on
``req`` with a 4-byte token matched on ``res`` (5 s timeout); an offline device does not resolve (as the
firmware: no resolve without a transport).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

from proto import devicemsg
from proto.coap import Message, MessageError
from proto.coap.numbers import CONTENT, VALID, Code, Option
from tools.harness.sim.coap import NO_RESPONSE, resolve_template
from tools.harness.sim.devices import Device
from tools.harness.sim.light_base import LightBase, perf

__all__ = ["Resolving", "MQTT_RESOLVE_TIMEOUT"]

MQTT_RESOLVE_TIMEOUT = 5.0
NOT_FOUND = Code.NOT_FOUND


class Resolving(LightBase):
    """The resolve exchanges of the light fleet: asked on schedule (:meth:`_resolve`), answered or timed out."""

    def _resolve(self, d: Device) -> None:
        """The resolve of ``d``'s schedule, unless the previous one is still waiting or ``d`` is offline."""
        if d.resolve_token is not None:
            return  # the previous one is still waiting
        conn = d.conn
        if d.transport == "mqtt" and (conn is None or not conn.ready):
            return  # offline: as the firmware, no resolve without a transport
        ids = self.cfg.resolve_ids
        target = ids[d.resolves % len(ids)] if ids else d.ident
        d.resolves += 1
        self.counters.resolves += 1
        self._token = (self._token + 1) & 0xFFFFFFFF
        d.resolve_token = self._token.to_bytes(4, "big")
        self.resolving += 1
        d.resolve_t0 = perf()
        d.resolve_target = target
        etag = d.etags.get(target)
        if d.transport == "coap":
            assert self.coap is not None
            self.coap.request(
                d.sock, resolve_template(target, etag), b"", partial(self._coap_resolve_done, d, target)
            )
            return
        fields: dict[str, Any] = {"token": d.resolve_token, "id": target}
        if etag:
            fields["etag"] = etag
        assert conn is not None
        if not conn.publish(devicemsg.topic(d.ident, "req"), devicemsg.encode("resolve_request", fields)):
            self._resolved(d, target, devicemsg.INTERNAL, None, 0.0)
            return
        d.resolve_timer = self.loop.call_later(MQTT_RESOLVE_TIMEOUT, self._mqtt_resolve_timeout, d)

    def _resolved(self, d: Device, target: str, code: int, etag: bytes | None, ms: float) -> None:
        """``code`` in docs/protocol.md terms (1, 203, 100, 200, errors; -1 = no answer)."""
        if d.resolve_token is not None:
            self.resolving -= 1
        d.resolve_token = None
        if not self.counters.count_resolve(code):
            if code == NO_RESPONSE:
                self.counters.timeouts += 1
            else:
                self.counters.errors += 1
            return
        if code == devicemsg.OK and etag:
            d.etags[target] = etag
        self.resolve_ms.add(ms)

    def _coap_resolve_done(self, d: Device, target: str, code: int, data: bytes, ms: float) -> None:
        etag = None
        if code == CONTENT:
            with contextlib.suppress(MessageError):
                etag = Message.decode(data).option(Option.ETAG)
        proto = {
            CONTENT: devicemsg.OK,
            VALID: devicemsg.NOT_MODIFIED,
            NOT_FOUND: devicemsg.NOT_FOUND,
            NO_RESPONSE: NO_RESPONSE,
        }
        self._resolved(d, target, proto.get(code, devicemsg.INTERNAL), etag, ms)

    def _mqtt_resolve_timeout(self, d: Device) -> None:
        d.resolve_timer = None
        if d.resolve_token is not None:
            self._resolved(d, d.resolve_target, NO_RESPONSE, None, (perf() - d.resolve_t0) * 1000.0)

    def _mqtt_res(self, d: Device, payload: bytes) -> None:
        try:
            obj = devicemsg.loads(payload)
        except devicemsg.WireError:
            self.counters.errors += 1
            return
        if (
            not isinstance(obj, dict)
            or d.resolve_token is None
            or obj.get(devicemsg.KEYS["token"]) != d.resolve_token
        ):
            self.counters.late += 1
            return
        if d.resolve_timer is not None:
            d.resolve_timer.cancel()
            d.resolve_timer = None
        ms = (perf() - d.resolve_t0) * 1000.0
        code = obj.get(devicemsg.KEYS["code"])
        etag = obj.get(devicemsg.KEYS["etag"])
        self._resolved(
            d,
            d.resolve_target,
            code if isinstance(code, int) else 500,
            etag if isinstance(etag, bytes) else None,
            ms,
        )
