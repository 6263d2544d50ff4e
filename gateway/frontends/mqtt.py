"""MQTT front end (MQTT v5): the ``ida/v1/d/<dev>/…`` topic tree of docs/protocol.md, on two broker connections.

Subscriptions (renewed on every connect; the broker forgets them when it restarts):

    $share/<group>/ida/v1/d/+/req     resolve_request  -> resolver -> …/res (QoS 0, the request's token; on the
                                      device link)
    $share/<group>/ida/v1/d/+/rpt     report (QoS 1)   -> registry  -> …/ack (QoS 1 after the commit, also for
                                      duplicates; on the device link)
    $share/<group>/ida/v1/d/+/cfgack  config_ack       -> registry
    ida/v1/d/+/status                 status (retained, last will) -> registry (every gateway sees it)

Several gateways in one group split requests, reports and acks between them (MQTT v5 shared subscriptions):
each message goes to one member. Desired config goes the other way: on every registry change and on every
(re)connect, each device's desired config is published retained at QoS 1 on ``…/cfg``.

This module puts the front end together; the work is done by its parts:

    gateway/frontends/mqtt_link.py       the device link (asyncio, proto/mqtt framing): resolve requests and
                                         answers (QoS 0), repeated requests answered from pre-encoded answers,
                                         reports and their acks (QoS 1)
    gateway/paholink.py                  the paho link (paho's thread, QoS 1, retained): config acks, status,
                                         desired config
    gateway/frontends/mqtt_requests.py   requests the device link hands on: decode, resolver, answer
    gateway/frontends/mqtt_reports.py    reports: decode, check, commit, ack after the commit
    gateway/frontends/mqtt_devices.py    config acks, status, desired config
    gateway/frontends/mqtt_answers.py    what they share: answer fields and bytes, counting

``fast_path=False`` leaves out the device link: requests and reports then come and go on the paho link with the
rest. The two connections do not keep one device's messages in order with each other (the protocol never promised
that). A payload that does not decode is never fatal: it is counted (``metrics.count_request("mqtt", 400)``) and
answered with an error when a token (resolve) or boot/seq (report) can be read from it, else dropped with a log
line. Replies go to the topic key the request came in on (not one recomputed from the identifier), so a device
always hears back on the subtree it subscribed to.

Rate limit (``limiter``, per topic key): requests, reports and config acks over the limit are dropped unanswered
and counted (``ida_ratelimited_total{frontend="mqtt"}``); the device's own retry timers bring them back later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.aio import cancel_all
from gateway.broker import MqttAuth, default_client_id
from gateway.frontends.mqtt_answers import ROOT, RequestCounter, Tally
from gateway.frontends.mqtt_devices import DeviceMessages
from gateway.frontends.mqtt_reports import Reports
from gateway.frontends.mqtt_requests import Requests
from gateway.logfmt import kv
from gateway.paholink import MqttError, PahoLink
from gateway.ratelimit import RateLimiter
from gateway.registry import Registry
from gateway.resolution import AnswerCache, ResolutionNote, Resolving
from proto import devicemsg

if TYPE_CHECKING:
    from gateway.frontends.mqtt_link import DeviceLink

__all__ = ["MqttFrontEnd", "subscriptions", "RequestCounter", "LEAVES_SHARED"]

log = logging.getLogger(__name__)

LEAVES_SHARED = ("req", "rpt", "cfgack")
LEAVES_LINKED = ("req", "rpt")  # the device link's, when there is one


def subscriptions(group: str | None, leaves: tuple[str, ...] = LEAVES_SHARED) -> list[str]:
    """The topic filters a gateway subscribes to (``group`` None or "" = plain, unshared subscriptions)."""
    share = f"$share/{group}/" if group else ""
    return [f"{share}{ROOT}/+/{leaf}" for leaf in leaves] + [f"{ROOT}/+/status"]


def _link_client_id(client_id: str) -> str:
    """The device link's client id: the paho link's with "-r", within the 23 characters of MQTT 3.1.1."""
    return client_id[:21] + "-r"


class MqttFrontEnd:
    def __init__(
        self,
        url: str,
        resolver: Resolving,
        registry: Registry,
        metrics: RequestCounter | None = None,
        group: str | None = "ida-gw",
        client_id: str | None = None,
        *,
        max_inflight: int = 512,
        keepalive: int = 30,
        reconnect_max: int = 30,
        ready_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        auth: MqttAuth | None = None,
        limiter: RateLimiter | None = None,
        fast_path: bool = True,
        answers: AnswerCache | None = None,
        note: ResolutionNote | None = None,
    ) -> None:
        self.limiter = limiter
        self.registry = registry
        self.group = group
        # the paho link's filters: without the requests and reports when the device link takes them
        self.topics = subscriptions(
            group, tuple(leaf for leaf in LEAVES_SHARED if leaf not in LEAVES_LINKED or not fast_path)
        )
        self._ready_timeout = ready_timeout
        client_id = client_id or default_client_id("ida-gw")
        self._link = PahoLink(
            url,
            client_id=client_id,
            keepalive=keepalive,
            reconnect_max=reconnect_max,
            on_connect=self._on_connect,
            on_message=self._on_message,
            name="devices",
            auth=auth,
        )
        self.tally = Tally(metrics)
        self.counters = self.tally.counters
        self._tasks: set[asyncio.Task[None]] = set()
        self.fast: DeviceLink | None = None
        if fast_path:
            # Imported here, as coap.py imports its fast path: the rest of the front end does not need it.
            from gateway.frontends.mqtt_link import DeviceLink

            self.fast = DeviceLink(
                url,
                on_message=self._on_link_message,
                on_report=self._on_link_report,
                answers=answers,
                note=note,
                auth=auth,
                group=group,
                client_id=_link_client_id(client_id),
                keepalive=keepalive,
                reconnect_max=reconnect_max,
                limit=self._limit_request,
                limiting=self._device_limiting,
                clock=clock,
            )
            add = getattr(metrics, "add_collector", None)
            if add is not None:
                add(self.fast.samples, add=True)
        self.requests = Requests(
            resolver,
            self.tally,
            send=self._send_answer,
            spawn=self._spawn,
            learn=self.fast.learn if self.fast is not None else None,
            note=note,
            clock=clock,
            max_inflight=max_inflight,
        )
        self.reports = Reports(registry, self.tally, send=self._send_ack)
        self.devices = DeviceMessages(registry, self.tally, publish=self._link.publish)
        self._ready = asyncio.Event()
        self._started = False

    @property
    def client_id(self) -> str:
        return self._link.client_id

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and subscribe; waits up to ``ready_timeout`` for the first SUBACK, then returns anyway
        (paho keeps retrying in the background; ``ready`` tells whether we are subscribed)."""
        if self._started:
            return
        self._started = True
        self.requests.closing = False
        self.registry.on_config_change(self.devices.publish_config)
        await self._link.start()
        if self.fast is not None:
            await self.fast.start()
        if not await self.wait_ready(self._ready_timeout):
            log.warning(
                "mqtt front end not ready yet %s", kv(broker=self._link.address, waited=self._ready_timeout)
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Unsubscribe (the shared group sends new requests to other gateways), answer what is in flight
        (up to ``timeout``), then disconnect."""
        if not self._started:
            return
        self._started = False
        self.requests.closing = True
        self.registry.off_config_change(self.devices.publish_config)
        if self._link.connected:
            self._link.unsubscribe(self.topics)
        if self.fast is not None:
            await self.fast.unsubscribe(min(timeout, 2.0))
        if not await self.requests.inflight.drain(timeout):
            log.warning("mqtt stop with requests in flight %s", kv(count=self.requests.inflight.count))
        if not await self.reports.inflight.drain(timeout):  # their acks go out once they are committed
            log.warning("mqtt stop with reports in flight %s", kv(count=self.reports.inflight.count))
        await cancel_all(self._tasks)
        if self.fast is not None:
            await self.fast.stop()
        await self._link.stop()
        self._ready.clear()

    @property
    def ready(self) -> bool:
        """Connected and subscribed (both links)."""
        return self._ready.is_set() and self._link.connected and (self.fast is None or self.fast.ready)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            if self.fast is not None:
                await asyncio.wait_for(self.fast.wait_ready(), timeout)
        except TimeoutError:
            return False
        return True

    # -- connection events (on the asyncio loop) -------------------------------------------------------
    def _on_connect(self) -> None:
        self._ready.clear()
        # The configs go out before the SUBSCRIBE: the broker handles one connection's packets in order, so by the
        # SUBACK (ready) every desired config is retained there, and a device subscribing after that gets it.
        self.devices.publish_all_configs()
        fut = self._link.subscribe(self.topics, qos=1)
        self._spawn(self._await_suback(fut))

    async def _await_suback(self, fut: asyncio.Future[list[Any]]) -> None:
        try:
            codes = await asyncio.wait_for(fut, self._ready_timeout)
        except (MqttError, TimeoutError) as e:
            log.warning("mqtt subscribe failed %s", kv(error=e))  # the next reconnect subscribes again
            return
        bad = [f"{t}={c}" for t, c in zip(self.topics, codes, strict=False) if c.is_failure]
        if bad:
            log.error("mqtt broker refused subscriptions %s", kv(refused=",".join(bad)))
            return
        self._ready.set()
        log.info(
            "mqtt subscribed %s",
            kv(group=self.group or "-", topics=len(self.topics), connects=self._link.connects),
        )

    # -- messages (on the asyncio loop) ----------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        parts = topic.split("/")
        if len(parts) != 5 or "/".join(parts[:3]) != ROOT:
            self._drop(topic, "unexpected topic")
            return
        key, leaf = parts[3], parts[4]
        if leaf in LEAVES_SHARED and self._limited(key, leaf):
            return
        try:
            if leaf == "req":
                self.requests.handle(key, payload)
            elif leaf == "rpt":
                self.reports.handle(key, payload)
            elif leaf == "cfgack":
                self.devices.config_ack(key, payload)
            elif leaf == "status":
                self.devices.status(key, payload)
            else:
                self._drop(topic, "unexpected topic")
                return
            self.counters[leaf] += 1
        except Exception:  # a bug must not stop the front end: log it and go on with the next message
            log.exception("mqtt message handling failed %s", kv(topic=topic, bytes=len(payload)))
            self.tally.code(devicemsg.INTERNAL)

    def _on_link_message(self, topic: str, payload: bytes) -> None:
        """A request the device link did not answer itself (or another message it does not know)."""
        self._on_message(topic, payload, False)

    def _on_link_report(self, key: str, payload: bytes) -> None:
        """A report from the device link: ``_on_message``'s work for one leaf, without taking the topic apart."""
        limiter = self.limiter
        if limiter is not None and limiter.device is not None and self._limited(key, "rpt"):
            return
        try:
            self.reports.handle(key, payload)
            self.counters["rpt"] += 1
        except Exception:  # a bug must not stop the front end: log it and go on with the next message
            log.exception("mqtt report handling failed %s", kv(key=key, bytes=len(payload)))
            self.tally.code(devicemsg.INTERNAL)

    def _send_answer(self, key: str, payload: bytes) -> None:
        if self.fast is not None:
            self.fast.publish_res(key, payload)
        else:
            self._link.publish(f"{ROOT}/{key}/res", payload, qos=0)

    def _send_ack(self, key: str, payload: bytes) -> None:
        if self.fast is not None:
            self.fast.publish_ack(key, payload)
        else:
            self._link.publish(f"{ROOT}/{key}/ack", payload, qos=1)

    def _limited(self, key: str, leaf: str) -> bool:
        """Check the rate limit for a message of ``key``; True when refused (and counted)."""
        if self.limiter is not None and self.limiter.check(device=key).limited:
            self.tally.ratelimited(key, leaf)
            return True
        return False

    def _limit_request(self, key: str) -> bool:
        """The rate limit for a request the device link answers from its table (``fast.answered`` counts those;
        ``counters`` the messages this module handled)."""
        return self._limited(key, "req")

    def _device_limiting(self) -> bool:
        return self.limiter is not None and getattr(self.limiter, "device", None) is not None

    def _drop(self, topic: str, why: str) -> None:
        self.tally.dropped()
        log.info("mqtt message dropped %s", kv(topic=topic, reason=why))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
