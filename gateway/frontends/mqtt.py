"""MQTT front end (paho-mqtt 2.x, MQTT v5): the ``ida/v1/d/<dev>/…`` topic tree of docs/protocol.md.

Subscriptions (renewed on every connect; the broker forgets them when it restarts):

    $share/<group>/ida/v1/d/+/req     resolve_request  -> resolver -> …/res (QoS 0, the request's token; on the
                                      resolve link)
    $share/<group>/ida/v1/d/+/rpt     report           -> registry  -> …/ack (QoS 1, also for duplicates)
    $share/<group>/ida/v1/d/+/cfgack  config_ack       -> registry
    ida/v1/d/+/status                 status (retained, last will) -> registry (every gateway sees it)

Several gateways in one group split requests, reports and acks between them (MQTT v5 shared subscriptions):
each message goes to one member. Desired config goes the other way: on every registry change and on every
(re)connect, each device's desired config is published retained at QoS 1 on ``…/cfg`` (re-publishing it at
connect restores it after a broker restart without persistence; the device ignores a cfgver it already has).

Resolve requests and their answers (QoS 0) travel on a connection of their own, driven by the asyncio loop: the
resolve link of ``gateway/frontends/mqtt_fast.py``, which answers repeated requests from pre-encoded answers and
hands the rest to this module (``fast_path=False`` puts them on the paho link with the rest). Reports, config
acks, status and desired config use the paho link: paho's network loop runs in paho's thread (see
gateway/mqttlink.py for why); its messages are handed to the asyncio loop, where this module does all its work.
The two connections do not keep one device's requests and reports in order with each other (the protocol never
promised that). A payload that does not decode is never fatal: it is counted
(``metrics.count_request("mqtt", 400)``) and answered with an error when a token (resolve) or boot/seq (report)
can be read from it, else dropped with a log line.

Replies go to the topic key the request came in on (not one recomputed from the identifier), so a device
always hears back on the subtree it subscribed to.

Identity: with the broker configuration of ``ida broker config`` (docs/security-mqtt.md) a device can publish
only under its own topic key (its username), so the topic key *is* the authenticated device. A report, config
ack or status whose payload ``id`` names another device is refused (report: ack code 403; config ack: counted
403 and ignored; status: dropped). Rate limit (``limiter``, per topic key): requests, reports and config acks
over the limit are dropped unanswered and counted (``ida_ratelimited_total{frontend="mqtt"}``); the device's
own retry timers bring them back later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.frontends.common import InFlight, failure
from gateway.frontends.mqtt_fast import ResolveLink, answer_fields, reply_name
from gateway.logfmt import kv
from gateway.mqttlink import MqttAuth, MqttError, MqttLink, default_client_id
from gateway.ratelimit import RateLimiter
from gateway.registry import Registry
from gateway.resolution import AnswerCache, ResolutionNote, Resolving, resolve_noted
from proto import devicemsg, identifier

log = logging.getLogger(__name__)

ROOT = devicemsg.TOPIC_ROOT  # "ida/v1/d"
LEAVES_SHARED = ("req", "rpt", "cfgack")
FRONTEND = "mqtt"
TRANSPORT = "mqtt"


class RequestCounter(Protocol):
    """What the front end needs of gateway.metrics.Metrics."""

    def count_request(self, frontend: str, code: int) -> None: ...


def subscriptions(group: str | None, leaves: tuple[str, ...] = LEAVES_SHARED) -> list[str]:
    """The topic filters a gateway subscribes to (``group`` None or "" = plain, unshared subscriptions)."""
    share = f"$share/{group}/" if group else ""
    return [f"{share}{ROOT}/+/{leaf}" for leaf in leaves] + [f"{ROOT}/+/status"]


def _peek_token(payload: bytes) -> bytes | None:
    """The token of a request that did not decode, if it can be read (so the error can still be matched)."""
    try:
        obj = devicemsg.loads(payload)
    except devicemsg.WireError:
        return None
    tok = obj.get(devicemsg.KEYS["token"]) if isinstance(obj, dict) else None
    return tok if isinstance(tok, bytes) and 1 <= len(tok) <= 8 else None


def _peek_boot_seq(payload: bytes) -> tuple[int, int] | None:
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
        self.url = url
        self.note = note
        self.limiter = limiter
        self.resolver = resolver
        self.registry = registry
        self.metrics = metrics
        self.group = group
        # the paho link's filters: without the requests when the resolve link takes them
        self.topics = subscriptions(
            group, tuple(leaf for leaf in LEAVES_SHARED if leaf != "req" or not fast_path)
        )
        self._max_inflight = max_inflight
        self._ready_timeout = ready_timeout
        self._clock = clock
        client_id = client_id or default_client_id("ida-gw")
        self._link = MqttLink(
            url,
            client_id=client_id,
            keepalive=keepalive,
            reconnect_max=reconnect_max,
            on_connect=self._on_connect,
            on_message=self._on_message,
            name="devices",
            auth=auth,
        )
        self.fast: ResolveLink | None = None
        if fast_path:
            self.fast = ResolveLink(
                url,
                on_message=self._on_request_message,
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
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = InFlight()
        self._closing = False
        self._started = False
        self.counters: dict[str, int] = {
            "req": 0,
            "rpt": 0,
            "cfgack": 0,
            "status": 0,
            "dropped": 0,
            "ratelimited": 0,
        }

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
        self._closing = False
        self.registry.on_config_change(self._config_changed)
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
        self._closing = True
        self.registry.off_config_change(self._config_changed)
        if self._link.connected:
            self._link.unsubscribe(self.topics)
        if self.fast is not None:
            await self.fast.unsubscribe(min(timeout, 2.0))
        if not await self._inflight.drain(timeout):
            log.warning("mqtt stop with requests in flight %s", kv(count=self._inflight.count))
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
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
        fut = self._link.subscribe(self.topics, qos=1)
        self._spawn(self._await_suback(fut))
        self._publish_all_configs()

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

    def _publish_all_configs(self) -> None:
        try:
            configs = self.registry.desired_configs()
        except Exception:
            log.exception("mqtt could not read desired configs")
            return
        for ident, cfg in configs:
            self._publish_config(ident, cfg)
        if configs:
            log.info("mqtt desired configs published %s", kv(devices=len(configs)))

    def _config_changed(self, ident: str, cfg: dict[str, Any]) -> None:
        # Called in the thread that changed the config; paho's publish is thread-safe.
        self._publish_config(ident, cfg)

    def _publish_config(self, ident: str, cfg: dict[str, Any]) -> None:
        try:
            payload = devicemsg.encode("config", cfg) if cfg else b""
        except devicemsg.WireError as e:
            log.error("mqtt desired config not encodable %s", kv(device=ident, error=e))
            return
        self._link.publish(devicemsg.topic(ident, "cfg"), payload, qos=1, retain=True)
        log.debug("mqtt config published %s", kv(device=ident, cfgver=cfg.get("cfgver"), clear=not cfg))

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
                self._request(key, payload)
            elif leaf == "rpt":
                self._report(key, payload)
            elif leaf == "cfgack":
                self._config_ack(key, payload)
            elif leaf == "status":
                self._status(key, payload)
            else:
                self._drop(topic, "unexpected topic")
                return
            self.counters[leaf] += 1
        except Exception:  # a bug must not stop the front end: log it and go on with the next message
            log.exception("mqtt message handling failed %s", kv(topic=topic, bytes=len(payload)))
            self._count(devicemsg.INTERNAL)

    def _on_request_message(self, topic: str, payload: bytes) -> None:
        """A request the resolve link did not answer itself."""
        self._on_message(topic, payload, False)

    def _limited(self, key: str, leaf: str) -> bool:
        """Check the rate limit for a message of ``key``; True when refused (and counted)."""
        if self.limiter is not None and self.limiter.check(device=key).limited:
            self._ratelimited(key, leaf)
            return True
        return False

    def _limit_request(self, key: str) -> bool:
        """The rate limit for a request the resolve link answers from its table (``fast.answered`` counts those;
        ``counters`` the messages this module handled)."""
        return self._limited(key, "req")

    def _device_limiting(self) -> bool:
        return self.limiter is not None and getattr(self.limiter, "device", None) is not None

    def _ratelimited(self, key: str, leaf: str) -> None:
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

    def _drop(self, topic: str, why: str) -> None:
        self.counters["dropped"] += 1
        log.info("mqtt message dropped %s", kv(topic=topic, reason=why))

    def _count(self, code: int) -> None:
        if self.metrics is not None:
            try:
                self.metrics.count_request(FRONTEND, code)
            except Exception:
                log.exception("metrics.count_request failed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, key: str, fields: dict[str, Any]) -> None:
        """Publish an answer on the requester's ``res`` topic and count it."""
        name = reply_name(fields["code"])
        try:
            payload = devicemsg.encode(name, fields)
        except devicemsg.WireError:  # an answer we cannot express is our bug; the device still gets a reply
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
        if self.fast is not None:
            self.fast.publish_res(key, payload)
        else:
            self._link.publish(f"{ROOT}/{key}/res", payload, qos=0)
        self._count(fields["code"])

    # resolve -------------------------------------------------------------------------------------------
    def _request(self, key: str, payload: bytes) -> None:
        try:
            fields = devicemsg.decode("resolve_request", payload)
        except devicemsg.WireError as e:
            token = _peek_token(payload)
            log.info("mqtt bad resolve request %s", kv(key=key, error=e, answered=token is not None))
            if token is None:
                self.counters["dropped"] += 1
                self._count(devicemsg.BAD_REQUEST)
            else:
                self._reply(key, {"token": token, "code": devicemsg.BAD_REQUEST, "msg": str(e)})
            return
        token = fields["token"]
        if self._closing:
            self._reply(
                key,
                {"token": token, "code": devicemsg.UPSTREAM_UNAVAILABLE, "msg": "gateway is shutting down"},
            )
            return
        if self._inflight.count >= self._max_inflight:
            self._reply(
                key,
                {
                    "token": token,
                    "code": devicemsg.RATE_LIMITED,
                    "ttl": 1,
                    "msg": "too many requests in flight",
                },
            )
            return
        # Counted from now (not from when the task first runs), so a burst of requests sees the limit.
        self._inflight.__enter__()
        self._spawn(self._resolve(key, fields, payload))

    async def _resolve(self, key: str, fields: dict[str, Any], payload: bytes = b"") -> None:
        token: bytes = fields["token"]
        try:
            try:
                handle = identifier.normalise(fields["id"])
                types, indexes = tuple(fields.get("types", ())), tuple(fields.get("indexes", ()))
                answer = await resolve_noted(self.resolver, self.note, "mqtt", handle, types, indexes)
                reply = answer_fields(token, answer, fields.get("etag"), self._clock())
                if self.fast is not None and payload:
                    self.fast.learn(payload, answer, types, indexes, fields.get("etag"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code, msg = failure(e)
                reply = {"token": token, "code": code, "msg": msg}
                if code == devicemsg.BAD_REQUEST and len(fields["id"]) <= 255:
                    reply["id"] = fields["id"]
            self._reply(key, reply)
        finally:
            self._inflight.__exit__(None, None, None)

    # reports -------------------------------------------------------------------------------------------
    def _ack(self, key: str, boot: int, seq: int, code: int, device: str | None = None) -> None:
        fields = {"boot": boot, "seq": seq, "code": code}
        cfgver = self.registry.desired_cfgver(device) if device is not None and code == devicemsg.OK else None
        if cfgver is not None:  # the device fetches it when it holds an older one
            fields["cfgver"] = cfgver
        payload = devicemsg.encode("report_ack", fields)
        self._link.publish(f"{ROOT}/{key}/ack", payload, qos=1)
        self._count(code)

    def _device_of(self, key: str) -> str:
        """The normalised identifier named by a topic key (WireError / IdentifierError when it names none)."""
        return identifier.normalise(devicemsg.identifier_from_topic_key(key))

    def _report(self, key: str, payload: bytes) -> None:
        try:
            fields = devicemsg.decode("report", payload)
            device = self._device_of(key)
            claimed = identifier.normalise(fields["id"])
        except ValueError as e:  # WireError, IdentifierError
            bs = _peek_boot_seq(payload)
            log.info("mqtt bad report %s", kv(key=key, error=e, answered=bs is not None))
            if bs is None:
                self.counters["dropped"] += 1
                self._count(devicemsg.BAD_REQUEST)
            else:  # a report that can never be stored: tell the device, so it can drop it from its queue
                self._ack(key, bs[0], bs[1], devicemsg.BAD_REQUEST)
            return
        boot, seq = fields["boot"], fields["seq"]
        if claimed != device:
            log.warning("mqtt report for another device %s", kv(topic_device=device, payload_id=claimed))
            self._ack(key, boot, seq, devicemsg.FORBIDDEN)
            return
        self._spawn(self._store_report(key, device, fields))

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
            self._count(devicemsg.INTERNAL)
            return
        log.debug("mqtt report %s", kv(device=device, boot=boot, seq=seq, new=new))
        self._ack(key, boot, seq, devicemsg.OK, device)

    # config acks and status ----------------------------------------------------------------------------
    def _config_ack(self, key: str, payload: bytes) -> None:
        try:
            fields = devicemsg.decode("config_ack", payload)
            device = self._device_of(key)
            claimed = identifier.normalise(fields["id"])
        except ValueError as e:
            log.info("mqtt bad config ack %s", kv(key=key, error=e))
            self.counters["dropped"] += 1
            self._count(devicemsg.BAD_REQUEST)
            return
        if claimed != device:
            log.warning("mqtt config ack for another device %s", kv(topic_device=device, payload_id=claimed))
            self._count(devicemsg.FORBIDDEN)
            return
        self.registry.record_config_ack(device, fields["cfgver"], fields["code"], fields.get("msg"))
        self._count(devicemsg.OK)

    def _status(self, key: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status
            return
        try:
            fields = devicemsg.decode("status", payload)
            device = self._device_of(key)
            claimed = identifier.normalise(fields["id"])
        except ValueError as e:
            log.info("mqtt bad status %s", kv(key=key, error=e))
            self.counters["dropped"] += 1
            return
        if claimed != device:
            log.warning("mqtt status for another device %s", kv(topic_device=device, payload_id=claimed))
            self.counters["dropped"] += 1
            return
        self.registry.set_status(device, fields["online"], TRANSPORT)
        log.debug("mqtt status %s", kv(device=device, online=fields["online"]))


def _link_client_id(client_id: str) -> str:
    """The resolve link's client id: the paho link's with "-r", within the 23 characters of MQTT 3.1.1."""
    return client_id[:21] + "-r"
