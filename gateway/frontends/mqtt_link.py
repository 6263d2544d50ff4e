"""The MQTT device link: the device's resolve requests and reports on an asyncio MQTT v5 connection of the gateway's
own, cached answers pre-encoded.

Why a second connection: the paho link (gateway/paholink.py) runs paho's network loop in its own thread, and that
thread and the asyncio loop share one GIL; every message then costs a thread hand-off and paho's packet handling
on top of the work (about 0.45 ms on the 2-core bench machine: 2,000 requests/s per process). Requests, answers,
reports and their acks need none of what paho is there for (re-sending QoS 1 messages of a kept session, retained
config, the last will), so the front end (gateway/frontends/mqtt.py) leaves them to this link: its session
(gateway/frontends/mqtt_session.py, framing and packets from proto/mqtt) runs on the asyncio loop, and a repeated
request is answered from a table of pre-encoded answers (gateway/frontends/mqtt_table.py) without decoding it.
Config acks, status and desired config stay on the paho link.

The link subscribes to ``[$share/<group>/]ida/v1/d/+/req`` at QoS 0 and, when it carries reports (``on_report``),
``[$share/<group>/]ida/v1/d/+/rpt`` at QoS 1 (the session acknowledges each delivery at once). For every PUBLISH:

1. a **hit**: a request whose bytes after its token are a key of the table (:class:`AnswerTable`). The answer is
   the entry's pre-encoded answer with the request's token put in, published on the request topic with ``req``
   replaced by ``res`` (the subtree the device listens on): the fixed header comes from a table by size and the
   reply topic from a table by request topic, so a hit encodes nothing;
2. a **report** on ``ida/v1/d/<key>/rpt`` goes to ``on_report(key, payload)`` (the front end's: rate limit, then
   gateway/frontends/mqtt_reports.py: decoded, checked, committed); its ``report_ack`` comes back through
   :meth:`DeviceLink.publish_ack` (QoS 1) after the commit;
3. anything else goes to the front end's message handler (``on_message``): decoding, errors, the resolver; a
   request's answer is published through :meth:`DeviceLink.publish_res`, and an OK or not-modified answer from the
   resolver's cache or upstream is learned (``learn``, :meth:`AnswerTable.learn`).

All answers of one read from the socket go out in one write, and the acks of one commit in one write. Rate limits
(``[limits] device_rate``) are checked for hits as for any request, through the front end (``limit``). Counting:
hits are integer counters (:attr:`DeviceLink.answered`) added to ``ida_requests_total{frontend="mqtt"}`` at scrape
time (:meth:`DeviceLink.samples`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from gateway.broker import MqttAuth
from gateway.frontends.mqtt_answers import ROOT
from gateway.frontends.mqtt_session import CONNECT_TIMEOUT, MqttSession
from gateway.frontends.mqtt_table import MAX_ENTRIES, AnswerTable
from gateway.metrics import Sample
from gateway.resolution import AnswerCache, ResolutionNote
from proto import devicemsg, mqtt

__all__ = ["DeviceLink"]

V5 = mqtt.MQTT5
_ROOT_B = (ROOT + "/").encode()
_REQ_B = b"/req"
_RPT_B = b"/rpt"


class _ReplyTopics(dict[bytes, bytes]):
    """A request topic ``…/<key>/req`` -> the variable header (topic, no properties) of a QoS 0 PUBLISH on
    ``…/<key>/res``, encoded on first use (one per device asking). Emptied when full."""

    def __missing__(self, topic: bytes) -> bytes:
        if len(self) >= MAX_ENTRIES:
            self.clear()
        head = self[topic] = mqtt.publish_topic(topic[:-3] + b"res", version=V5)
        return head


class _AckTopics(dict[str, bytes]):
    """A topic key -> the topic ``…/<key>/ack`` as bytes, made on first use (one per device reporting). Emptied when
    full."""

    def __missing__(self, key: str) -> bytes:
        if len(self) >= MAX_ENTRIES:
            self.clear()
        topic = self[key] = f"{ROOT}/{key}/ack".encode()
        return topic


class DeviceLink:
    """The asyncio MQTT connection for the devices' requests and reports (module doc).

    ``on_report(key, payload)`` (optional: then the link subscribes to reports) takes every report,
    ``on_message(topic, payload)`` every request the table does not answer and anything else; ``limit(key)`` (optional) is the
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
        on_report: Callable[[str, bytes], None] | None = None,
    ) -> None:
        share = f"$share/{group}/" if group else ""
        filters = [(f"{share}{ROOT}/+/req", 0)] + ([(f"{share}{ROOT}/+/rpt", 1)] if on_report else [])
        self.session = MqttSession(
            url,
            filters,
            on_publish=self._serve,
            auth=auth,
            client_id=client_id,
            keepalive=keepalive,
            reconnect_max=reconnect_max,
            connect_timeout=connect_timeout,
            on_subscribed=self._subscribed,
        )
        self.address = self.session.address
        self.clock = clock
        self.table = AnswerTable(answers, note=note, clock=clock, learning=learning)
        self.learn = self.table.learn  # the slow path's answers (AnswerTable.learn)
        self._on_message = on_message
        self._on_report = on_report
        self._limit = limit
        self._limiting = limiting or (lambda: False)
        self._heads = mqtt.FixedHeaders(mqtt.PUBLISH << 4)  # answers come in few sizes
        self._replies = _ReplyTopics()
        self._ack_topics = _AckTopics()
        self.serving = True  # false: every request goes to on_message (the front end is stopping)
        # counters (samples() and the tests)
        self.answered = 0  # OK answers from the table
        self.valid = 0  # not-modified answers from the table
        self.handed_on = 0  # requests given to on_message
        self.reports = 0  # reports given to on_report
        self.dropped = 0  # answers and acks that could not be sent (not connected)

    # -- lifecycle (the session's) -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.serving = True
        await self.session.start()

    async def unsubscribe(self, timeout: float = 2.0) -> None:
        """Stop taking requests (the shared group gives new ones to other gateways); answers still go out."""
        self.serving = False
        await self.session.unsubscribe(timeout)

    async def stop(self) -> None:
        """Send DISCONNECT and close the connection."""
        self.serving = False
        await self.session.stop()

    @property
    def ready(self) -> bool:
        """Connected and subscribed."""
        return self.session.ready

    async def wait_ready(self, timeout: float | None = None) -> bool:
        return await self.session.wait_ready(timeout)

    @property
    def connects(self) -> int:
        return self.session.connects

    def _subscribed(self) -> None:
        self.serving = True

    # -- serving -----------------------------------------------------------------------------------------------
    def _serve(self, packets: list[tuple[int, bytes]]) -> bytes:
        """The answers to the PUBLISH packets of one read (hits); reports go to ``on_report``, the others to
        ``on_message``."""
        out: list[bytes] = []
        entries = self.table.entries if self.serving else None
        limiting = self._limit is not None and self._limiting()
        heads, replies, parse = self._heads, self._replies, mqtt.parse_publish
        on_report, root_len = self._on_report, len(_ROOT_B)
        now = 0.0
        answered = valid = 0
        try:
            for first, body in packets:
                topic, payload, _ = parse(first, body, version=V5)
                if on_report is not None and topic.endswith(_RPT_B) and topic.startswith(_ROOT_B):
                    self.reports += 1
                    on_report(topic[root_len:-4].decode("utf-8", "replace"), payload)
                    continue
                if entries is not None and len(payload) > 4 and payload[1] == 1:
                    tl = payload[2] - 0x40
                    entry = entries.get(payload[3 + tl :]) if 1 <= tl <= 8 else None
                    if entry is not None and entry.req_head == payload[0]:
                        if not now:
                            now = self.clock()
                        if (
                            topic.startswith(_ROOT_B)
                            and topic.endswith(_REQ_B)
                            and (now <= entry.until or self.table.refresh(entry, now))
                        ):
                            if limiting and self._limited(topic):
                                continue  # refused (and counted) by the front end's rate limit
                            reply = replies[topic]
                            out.append(heads[len(reply) + len(entry.head) + 1 + tl + len(entry.tail)])
                            out.append(reply)
                            out.append(entry.head)
                            out.append(payload[2 : 3 + tl])  # the request's token item
                            out.append(entry.tail)
                            if entry.code == devicemsg.OK:
                                answered += 1
                            else:
                                valid += 1
                            continue
                self.handed_on += 1
                self._on_message(topic.decode("utf-8", "replace"), payload)
        finally:
            if answered or valid:
                self.answered += answered
                self.valid += valid
                self.table.guard.count_hits(answered + valid)
        return b"".join(out)

    def _limited(self, topic: bytes) -> bool:
        assert self._limit is not None
        return self._limit(topic[len(_ROOT_B) : -len(_REQ_B)].decode("utf-8", "replace"))

    # -- sending ---------------------------------------------------------------------------------------------
    def publish_res(self, key: str, payload: bytes) -> bool:
        """Publish an answer on ``ida/v1/d/<key>/res`` (QoS 0); False when not connected (the answer is lost, as
        any QoS 0 message to a device whose broker went away: the device asks again)."""
        if not self.session.write(mqtt.publish(f"{ROOT}/{key}/res", payload, version=V5)):
            self.dropped += 1
            return False
        return True

    def publish_ack(self, key: str, payload: bytes) -> bool:
        """Publish a ``report_ack`` on ``ida/v1/d/<key>/ack`` (QoS 1, with the others of this turn of the loop); False
        when not connected (the device sends its report again and gets its ack then)."""
        if not self.session.publish_qos1(self._ack_topics[key], payload):
            self.dropped += 1
            return False
        return True

    # -- metrics -----------------------------------------------------------------------------------------------
    def samples(self) -> Iterable[Sample]:
        """Counts to add to the front end's (a ``Metrics`` collector with ``add=True``)."""
        for code, count in ((devicemsg.OK, self.answered), (devicemsg.NOT_MODIFIED, self.valid)):
            yield "ida_requests_total", {"frontend": "mqtt", "code": str(code)}, float(count)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.table.entries),
            "answered": self.answered,
            "valid": self.valid,
            "handed_on": self.handed_on,
            "reports": self.reports,
            "learned": self.table.learned,
            "dropped": self.dropped,
            "qos1_sent": self.session.window.sent,
            "qos1_refused": self.session.window.refused,
            "qos1_dropped": self.session.window.dropped,
            "connects": self.connects,
        }
