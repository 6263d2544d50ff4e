"""What the MQTT front end's parts share: the fields and bytes of an answer to a resolve request (the slow path,
gateway/frontends/mqtt_requests.py, and the device link's table of pre-encoded answers,
gateway/frontends/mqtt_table.py, must say the same thing), and the counting (:class:`Tally`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from gateway.logfmt import kv
from gateway.metrics import Sample
from gateway.resolution import Answer
from proto import devicemsg

__all__ = ["ROOT", "FRONTEND", "reply_name", "answer_fields", "encode_answer", "RequestCounter", "Tally"]

log = logging.getLogger(__name__)

ROOT = devicemsg.TOPIC_ROOT  # "ida/v1/d"
FRONTEND = "mqtt"


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


def encode_answer(fields: dict[str, Any], key: str = "") -> tuple[bytes, int]:
    """The payload of an answer and the code it carries: an answer that does not encode (our bug) becomes an
    internal error, one larger than a device takes a "too large" error; the device gets a reply either way."""
    try:
        payload = devicemsg.encode(reply_name(fields["code"]), fields)
    except devicemsg.WireError:
        log.exception("mqtt answer not encodable %s", kv(key=key, code=fields["code"]))
        fields = {"token": fields["token"], "code": devicemsg.INTERNAL, "msg": "internal error"}
        payload = devicemsg.encode("error", fields)
    if len(payload) > devicemsg.MAX_PAYLOAD:
        fields = {
            "token": fields["token"],
            "code": devicemsg.TOO_LARGE,
            "msg": f"answer of {len(payload)} bytes exceeds {devicemsg.MAX_PAYLOAD}",
        }
        payload = devicemsg.encode("error", fields)
    return payload, fields["code"]


class RequestCounter(Protocol):
    """What the front end needs of gateway.metrics.Metrics."""

    def count_request(self, frontend: str, code: int) -> None: ...


class Tally:
    """The front end's counts: each answer or refusal by code (``ida_requests_total``), rate-limit refusals
    (``ida_ratelimited_total``), reports refused by an overloaded registry (``ida_reports_overloaded_total``), and
    ``counters`` by leaf, dropped, rate limited and overloaded (the tests and the status page read them).

    With a ``metrics`` that takes collectors (gateway.metrics.Metrics) the codes and overload refusals are integer
    counts here, added to its families at scrape time (:meth:`samples`: no lock per message); with another
    ``metrics`` (a plain ``count_request``) each is handed over as it happens."""

    def __init__(self, metrics: RequestCounter | None) -> None:
        self.metrics = metrics
        self.counters: dict[str, int] = {
            "req": 0,
            "rpt": 0,
            "cfgack": 0,
            "status": 0,
            "dropped": 0,
            "ratelimited": 0,
            "overloaded": 0,
        }
        self.codes: dict[int, int] = {}  # answers and refusals by code, until a scrape reads them (samples)
        add = getattr(metrics, "add_collector", None)
        self._collected = add is not None
        if add is not None:
            add(self.samples, add=True)

    def code(self, code: int) -> None:
        if self._collected:
            self.codes[code] = self.codes.get(code, 0) + 1
        elif self.metrics is not None:
            try:
                self.metrics.count_request(FRONTEND, code)
            except Exception:
                log.exception("metrics.count_request failed")

    def samples(self) -> Iterable[Sample]:
        """The counts kept here, for ``Metrics.add_collector(..., add=True)``."""
        for code, n in list(self.codes.items()):
            yield "ida_requests_total", {"frontend": FRONTEND, "code": str(code)}, float(n)
        yield "ida_reports_overloaded_total", {"frontend": FRONTEND}, float(self.counters["overloaded"])

    def dropped(self, code: int | None = None) -> None:
        """A message dropped unanswered (``code``: also counted as a request with that code)."""
        self.counters["dropped"] += 1
        if code is not None:
            self.code(code)

    def overloaded(self) -> None:
        """A report refused because too many wait for their commit (``ida_reports_overloaded_total``)."""
        self.counters["overloaded"] += 1

    def ratelimited(self, key: str, leaf: str) -> None:
        # Dropped unanswered (an answer would spend the broker bandwidth the limit protects); debug only, so a
        # flood does not become a flood of log lines.
        self.counters["ratelimited"] += 1
        count = getattr(self.metrics, "count_ratelimited", None)
        if count is not None:
            try:
                count(FRONTEND, "device")
            except Exception:
                log.exception("metrics.count_ratelimited failed")
        log.debug("mqtt rate limited %s", kv(key=key, leaf=leaf))
