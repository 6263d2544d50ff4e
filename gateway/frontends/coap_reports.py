"""Reports from the CoAP socket straight to the registry's group commit: ``POST /d/<id segments...>/rpt``.

The fast path (``coap_fast.py``) hands every new request (after de-duplication by :class:`proto.coap.Server`) whose
code is POST to :meth:`ReportPath.take`. A report it can take is one whose options are only Uri-Path (``d``, the
identifier's segments, ``rpt``), Uri-Port and Content-Format CBOR (60), with a payload: what the firmware sends.
Anything else -- OSCORE, block-wise, other options, other paths -- goes to aiocoap as before (``take`` returns
:data:`NOT_MINE`). For a report it takes, the cost is what the job needs: the option walk, one CBOR decode that
checks every field (:func:`proto.devicemsg.decode_report`), the identifier normalised once per device (a bounded
table), a row queued for the registry's group commit (:meth:`gateway.registry.Registry.submit_report`), and one
datagram out:

* after the commit, 2.04 with the ``report_ack`` (piggybacked on the ACK of a CON, a NON for a NON; when the
  commit takes longer than the message layer's empty-ACK delay, an empty ACK first and the answer as a separate
  CON response, sent again until acknowledged) -- the ACK never leaves before the report is durable;
* at once, 4.00 for a report that can never be stored (the device drops it), 4.03 for a report naming another
  device, 4.29 + Max-Age for a rate-limited device or source, 5.03 + Max-Age when the registry is overloaded
  (:class:`gateway.errors.Overloaded`: nothing stored, the device waits Max-Age and sends it again);
* 5.00 when the commit failed (disk full): nothing stored, the device sends it again.

Error answers are the same bytes the slow path sends (``coap.error_message``). The answers are counted in
``ida_requests_total{frontend="coap"}`` as the slow path counts them, with integer counters added at scrape time
(:meth:`ReportPath.samples`), not a metrics update per report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from gateway.errors import Overloaded
from gateway.frontends.coap_aiocoap import body, hostinfo
from gateway.frontends.common import InFlight, failure
from gateway.ingest import Outcome
from gateway.metrics import Sample
from gateway.ratelimit import RateLimiter, retry_after, source_of_sockaddr
from proto import devicemsg, identifier
from proto.coap.message import PAYLOAD_MARKER
from proto.coap.numbers import Code, ContentFormat, Option
from proto.coap.server import Deferred, Request, Server

__all__ = ["NOT_MINE", "ReportPath"]

log = logging.getLogger(__name__)

NOT_MINE = b"not mine"  # take(): the request is not a report this path handles (hand it to aiocoap)
MAX_IDS = 65536  # identifiers remembered normalised (the table is emptied when full)

_POST = int(Code.POST)
_CHANGED = int(Code.CHANGED)
_URI_PORT, _URI_PATH, _CONTENT_FORMAT = int(Option.URI_PORT), int(Option.URI_PATH), int(Option.CONTENT_FORMAT)
_ACK_HEAD = bytes(
    (_CONTENT_FORMAT << 4 | 1, int(ContentFormat.CBOR), PAYLOAD_MARKER)
)  # CF 60, then the payload

ErrorAnswer = Callable[..., Any]  # coap.error_message(code, msg, *, max_age=None) -> aiocoap.Message


def report_parts(data: bytes) -> tuple[list[bytes], int] | None:
    """(the Uri-Path segments between ``d`` and ``rpt``, where the payload starts) of a request this path takes,
    else None. The header was checked by the message layer (a POST request of CoAP version 1)."""
    n = len(data)
    pos = 4 + (data[0] & 0x0F)
    number = 0
    segments: list[bytes] = []
    while pos < n:
        byte = data[pos]
        if byte == PAYLOAD_MARKER:
            if pos + 1 == n or len(segments) < 3 or segments[0] != b"d" or segments[-1] != b"rpt":
                return None
            return segments[1:-1], pos + 1
        delta, length = byte >> 4, byte & 0x0F
        pos += 1
        if delta == 13:
            if pos >= n:
                return None
            delta = data[pos] + 13
            pos += 1
        elif delta > 13:
            return None  # no option number the firmware sends needs a two-byte delta
        if length == 13:
            if pos >= n:
                return None
            length = data[pos] + 13
            pos += 1
        elif length == 14:
            if pos + 1 >= n:
                return None
            length = (data[pos] << 8 | data[pos + 1]) + 269
            pos += 2
        elif length == 15:
            return None
        number += delta
        end = pos + length
        if end > n:
            return None
        if number == _URI_PATH:
            segments.append(data[pos:end])
        elif number == _CONTENT_FORMAT:
            if length > 2 or int.from_bytes(data[pos:end], "big") != ContentFormat.CBOR:
                return None
        elif number != _URI_PORT:
            return None
        pos = end
    return None  # no payload


@dataclass(eq=False)
class ReportPath:
    """Takes reports off the CoAP socket (module doc) for ``registry``, answering through the fast path's message
    layer ``server``."""

    registry: Any
    server: Server
    _: KW_ONLY
    send: Callable[[bytes, Any], None]  # send(datagram, route) sends an answer
    arm: Callable[[], None]  # tells the fast path the message layer has a new deadline
    limiter: Callable[[], RateLimiter | None]  # returns the front end's rate limiter
    count_limited: Callable[[str], None]  # counts a rate-limit refusal
    error_answer: ErrorAnswer  # builds the slow path's error response
    inflight: (
        InFlight  # the front end's count of requests being answered (a stopping front end waits for them)
    )

    def __post_init__(self) -> None:
        self._ids: dict[bytes | str, str] = {}
        self._peers: dict[Any, str] = {}  # source address -> its text form (the registry's ``peer``)
        self.answers: dict[int, int] = {}  # wire code -> answers (ida_requests_total at scrape time)
        self._loop = asyncio.get_running_loop()
        # counters (the tests and stats())
        self.taken = 0  # reports this path answered (stored, duplicate or refused)
        self.refused = 0  # answered at once with 4.xx / 5.03
        self.overloaded = 0  # 5.03 because the registry's queue was full

    # -- one request -----------------------------------------------------------------------------------------
    def take(self, ev: Request, pktinfo: bytes | None, now: float) -> bytes | None:
        """The answer to send now, None when it comes later (after the commit), :data:`NOT_MINE` when the request
        is not a report this path takes."""
        data = ev.datagram
        if data[1] != _POST:
            return NOT_MINE
        parts = report_parts(data)
        if parts is None:
            return NOT_MINE
        segments, start = parts
        self.taken += 1
        try:
            ident = self._device(b"/".join(segments))
        except (identifier.IdentifierError, UnicodeDecodeError) as e:
            return self._refuse(ev, devicemsg.BAD_REQUEST, f"bad identifier: {e}")
        limiter = self.limiter()
        if limiter is not None and getattr(limiter, "enabled", True):
            verdict = limiter.check(device=ident, source=source_of_sockaddr(str(ev.addr[0])))  # type: ignore[index]
            if verdict.limited:
                wait = retry_after(verdict.wait)
                self.count_limited(verdict.limit or "device")
                msg = f"rate limited ({verdict.limit}); retry in {wait} s"
                return self._refuse(ev, devicemsg.RATE_LIMITED, msg, max_age=wait)
        try:
            report = devicemsg.decode_report(data[start:])
            if self._device(report.id) != ident:
                return self._refuse(
                    ev, devicemsg.FORBIDDEN, f"payload id {report.id!r} is not the device in the path"
                )
            waiting = _Waiting(self, report)
            self.registry.submit_report_then(ident, report, "coap", self._peer(ev.addr), waiting)
        except Overloaded as e:
            self.overloaded += 1
            return self._refuse(ev, devicemsg.UPSTREAM_UNAVAILABLE, str(e), max_age=e.retry_after)
        except (identifier.IdentifierError, devicemsg.WireError, ValueError) as e:
            return self._refuse(ev, *failure(e))
        # queued (never before: a refused report is answered at once): its answer waits for the commit
        waiting.deferred = self.server.defer(ev, now, (ev.addr, pktinfo))
        self.inflight.__enter__()
        return None

    def _device(self, raw: bytes | str) -> str:
        """The normalised identifier of a path (bytes) or a payload id (text), remembered per spelling."""
        ident = self._ids.get(raw)
        if ident is None:
            ident = identifier.normalise(raw.decode() if isinstance(raw, bytes) else raw)
            if len(self._ids) >= MAX_IDS:
                self._ids.clear()
            self._ids[raw] = ident
        return ident

    def _peer(self, addr: Any) -> str:
        peer = self._peers.get(addr)
        if peer is None:
            if len(self._peers) >= MAX_IDS:
                self._peers.clear()
            peer = self._peers[addr] = hostinfo(addr[0], addr[1])
        return peer

    def _count(self, code: int) -> None:
        answers = self.answers
        answers[code] = answers.get(code, 0) + 1

    def _refuse(self, ev: Request, code: int, msg: str, max_age: int | None = None) -> bytes:
        self.refused += 1
        self._count(code)
        coap_code, tail = body(self.error_answer(code, msg, max_age=max_age))
        return self.server.answer(ev, coap_code, tail)

    # -- after the commit ------------------------------------------------------------------------------------
    def _committed(self, outcome: Outcome, deferred: Deferred, report: devicemsg.Report) -> None:
        """The commit of ``report``'s batch is done: True stored, False a duplicate (both acknowledged), or the
        error (nothing stored for this report: 5.00)."""
        try:
            if outcome is True or outcome is False:
                ack = devicemsg.encode_report_ack(
                    report.boot, report.seq, devicemsg.OK, self.registry.desired_cfgver(report.id)
                )
                code, tail, wire_code = _CHANGED, _ACK_HEAD + ack, devicemsg.OK
            else:
                wire_code, msg = failure(outcome)
                code, tail = body(self.error_answer(wire_code, msg))
            self._count(wire_code)
            out = self.server.respond(deferred, code, tail, self._loop.time())
            addr, pktinfo = deferred.route
            self.send(out, (addr, pktinfo))
            self.arm()
        except Exception:
            log.exception("coap: answering a report failed")
        finally:
            self.inflight.__exit__(None, None, None)

    def samples(self) -> Iterable[Sample]:
        """What to add to ``ida_requests_total{frontend="coap"}`` (a collector with ``add=True``)."""
        for code, n in self.answers.items():
            yield "ida_requests_total", {"frontend": "coap", "code": str(code)}, float(n)

    def stats(self) -> dict[str, int]:
        return {"reports": self.taken, "reports_refused": self.refused, "reports_overloaded": self.overloaded}


class _Waiting:
    """A report queued for its commit: the registry calls it with the outcome (no future per report)."""

    __slots__ = ("path", "report", "deferred")

    def __init__(self, path: ReportPath, report: devicemsg.Report) -> None:
        self.path = path
        self.report = report
        self.deferred: Deferred | None = None

    def __call__(self, outcome: Outcome) -> None:
        assert self.deferred is not None  # set right after the submit; the outcome comes on a later loop turn
        self.path._committed(outcome, self.deferred, self.report)
