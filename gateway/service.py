"""The gateway process: resolver + registry + outbox + front ends, assembled from a :class:`GatewayConfig`.

    gw = Gateway(config)
    await gw.start()          # binds CoAP and HTTP (and MQTT when [mqtt] url is set), logs each address
    ...
    await gw.stop()           # graceful: stop accepting, answer what is in flight, flush cache and SQLite

Start order: data dir, resolver, outbox + registry (one SQLite file, ``registry.sqlite3``), outbox delivery, then
the front ends (CoAP, HTTP, MQTT). Stop runs the other way round: front ends first (each stops accepting and
answers its requests in flight), then outbox delivery, then the resolver (flushes the cache to SQLite), then the
SQLite files are closed. ``run()`` does both around a SIGTERM/SIGINT wait (``ida gateway``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gateway.cache import CacheConfig
from gateway.config import ConfigError, GatewayConfig
from gateway.frontends.coap import CoapFrontEnd
from gateway.frontends.coap_security import PLAIN_WARNING, CoapSecurity, secure_frontend
from gateway.frontends.http import HttpFrontEnd
from gateway.logfmt import kv
from gateway.metrics import HistogramSample, Metrics, Sample
from gateway.outbox import Outbox
from gateway.ratelimit import Limits, RateLimiter
from gateway.registry import Registry
from gateway.resolution import Resolving
from gateway.resolver import ZONE_FILE, Resolver, ResolverConfig, default_upstreams
from gateway.sinks import Sink, make_sink
from gateway.status import board_for

if TYPE_CHECKING:
    from gateway.frontends.mqtt import MqttFrontEnd
    from gateway.shared_cache import RedisSharedCache

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"
STOP_TIMEOUT = 5.0  # seconds each front end gets to answer its requests in flight


class FrontEnd(Protocol):
    async def stop(self, timeout: float = ...) -> None: ...


# [cache] keys that are gateway.cache.CacheConfig's settings under the same names
CACHE_KEYS = (
    "max_entries",
    "max_bytes",
    "min_ttl",
    "max_ttl",
    "negative_ttl",
    "negative_max_ttl",
    "max_stale",
    "prefetch_fraction",
    "flush_interval",
)


def resolver_config(cfg: GatewayConfig) -> ResolverConfig:
    """The resolver's settings from the [upstream], [cache] and [zone] sections and the data dir."""
    up, c = cfg.upstream, cfg.cache
    data_dir = cfg.data_dir if c.persist else None
    zone = Path(cfg.zone.file) if cfg.zone.file else cfg.data_dir / ZONE_FILE
    return ResolverConfig(
        upstreams=list(up.urls) or default_upstreams(),
        timeout=up.timeout,
        attempt_timeout=up.attempt_timeout,
        hedge_delay=up.hedge or None,
        failure_threshold=up.failure_threshold,
        cooldown=up.cooldown,
        max_cooldown=up.max_cooldown,
        stale_answer_after=c.stale_answer_after,
        stale_reply_ttl=c.stale_reply_ttl,
        cache=CacheConfig(**{k: getattr(c, k) for k in CACHE_KEYS}),
        data_dir=data_dir,
        zone_file=zone,
    )


def shared_cache(cfg: GatewayConfig) -> RedisSharedCache | None:
    """The Redis tier under the local cache ([cache] redis_url), or None (docs/reliability.md)."""
    c = cfg.cache
    if not c.redis_url:
        return None
    from gateway.shared_cache import RedisSharedCache  # redis stays out of a gateway that does not use it

    password = None
    if c.redis_password_file:
        try:
            password = Path(c.redis_password_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise ConfigError(
                f"[cache] redis_password_file: cannot read a password from {c.redis_password_file!r}: "
                f"{getattr(e, 'strerror', None) or 'empty or not UTF-8'}"
            ) from None
    try:
        return RedisSharedCache(
            c.redis_url,
            max_stale=c.max_stale,
            lock_wait=c.redis_lock_wait,
            lock_ttl=cfg.upstream.timeout + 1.0,
            timeout=c.redis_timeout,
            password=password,
        )
    except ValueError as e:
        raise ConfigError(f"[cache] redis_url: {e}") from None


def rate_limiter(cfg: GatewayConfig) -> RateLimiter:
    """The [limits] token buckets, shared by the front ends (a device is one device on every transport)."""
    lim = cfg.limits
    return RateLimiter(
        Limits(lim.device_rate, lim.device_burst, lim.source_rate, lim.source_burst, lim.max_buckets)
    )


def mqtt_auth(cfg: GatewayConfig) -> Any:
    """The gateway's broker credentials ([mqtt] username, password_file, ca_file) as a gateway.broker.MqttAuth."""
    from gateway.broker import MqttAuth

    m = cfg.mqtt
    try:
        return MqttAuth.from_files(m.username, m.password_file, m.ca_file)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def outbox_sinks(cfg: GatewayConfig) -> list[Sink]:
    """Northbound sinks from [outbox]: the MQTT topic (on [outbox] mqtt_url, else [mqtt] url, with the [mqtt]
    credentials) and the webhook."""
    out: list[Sink] = []
    ob = cfg.outbox
    if ob.mqtt_topic:
        same_broker = not ob.mqtt_url or ob.mqtt_url == cfg.mqtt.url
        auth = mqtt_auth(cfg) if same_broker and (cfg.mqtt.username or cfg.mqtt.ca_file) else None
        out.append(make_sink(ob.mqtt_url or cfg.mqtt.url, ob.mqtt_topic, auth=auth))
    if ob.webhook_url:
        out.append(make_sink(ob.webhook_url))
    return out


@dataclass(frozen=True, slots=True)
class Addresses:
    coap: tuple[str, int] | None = None
    http: tuple[str, int] | None = None


class Gateway:
    """One gateway process. ``resolver`` may be injected (tests); otherwise built from the config."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        resolver: Resolving | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self._clock = clock
        self._given_resolver = resolver
        self._own_resolver: Resolver | None = None  # built here, so closed here
        self.shared: RedisSharedCache | None = (
            None  # [cache] redis_url: the shared tier of the resolver built here
        )
        self.resolver: Resolving | None = None
        self.outbox: Outbox | None = None
        self.registry: Registry | None = None
        self.coap: CoapFrontEnd | None = None
        self.coap_security: CoapSecurity | None = None
        self.http: HttpFrontEnd | None = None
        self.mqtt: MqttFrontEnd | None = None  # only when [mqtt] url is set
        self.limiter = rate_limiter(config)
        self._started_at = time.monotonic()
        self._running = False

    @property
    def addresses(self) -> Addresses:
        return Addresses(
            coap=self.coap.address if self.coap else None,
            http=self.http.address if self.http else None,
        )

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build and start everything; on failure, stop what already started and re-raise."""
        cfg = self.config
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"[data] dir: cannot create {str(cfg.data_dir)!r}: {e.strerror}") from None
        self._running = True
        try:
            await self._start(cfg)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, cfg: GatewayConfig) -> None:
        resolver = self._given_resolver
        if resolver is None:
            rcfg = resolver_config(cfg)
            self.shared = shared_cache(cfg)
            if self.shared is not None:
                up = await self.shared.ping()
                log.info(
                    "shared cache %s %s",
                    "at" if up else "not answering (local-only until it does) at",
                    kv(redis=_redact(cfg.cache.redis_url)),
                )
            try:
                resolver = self._own_resolver = Resolver(rcfg, clock=self._clock, shared=self.shared)
            except ValueError as e:  # settings the resolver refuses (e.g. a zone file that does not parse)
                raise ConfigError(f"resolver: {e}") from None
            log.info(
                "resolver ready %s",
                kv(upstreams=",".join(rcfg.upstreams), cache=rcfg.cache_path() or "memory"),
            )
        self.resolver = resolver
        db = cfg.data_dir / REGISTRY_FILE
        self.outbox = Outbox(db, outbox_sinks(cfg))
        self.registry = Registry(db, self.outbox, queue_max=cfg.registry.queue_max)
        self._add_collectors()
        await self.outbox.start()

        answers = resolver.answer_cache() if isinstance(resolver, Resolver) else None
        note = board_for(resolver).recent.add  # the status page's list of recent resolutions
        self.coap = CoapFrontEnd(
            cfg.coap.host,
            cfg.coap.port,
            resolver,
            self.registry,
            self.metrics,
            clock=self._clock,
            answers=answers,
            note=note,
        )
        self._secure_coap(cfg)
        await self._listen("coap", self.coap, cfg.coap.host, cfg.coap.port)

        self.http = HttpFrontEnd(
            cfg.http.host,
            cfg.http.port,
            resolver,
            self.registry,
            self.metrics,
            health=self.health,
            clock=self._clock,
            shutdown_timeout=STOP_TIMEOUT,
            note=note,
        )
        await self._listen("http", self.http, cfg.http.host, cfg.http.port)

        if cfg.mqtt.url:
            # Imported here so that paho stays out of a gateway that does not use MQTT.
            from gateway.frontends.mqtt import MqttFrontEnd

            self.mqtt = MqttFrontEnd(
                cfg.mqtt.url,
                resolver,
                self.registry,
                self.metrics,
                group=cfg.mqtt.group or None,
                auth=mqtt_auth(cfg),
                limiter=self.limiter,
                answers=answers,
                note=note,
            )
            await self.mqtt.start()  # returns after its ready timeout even when the broker is not there yet
            log.info(
                "mqtt %s %s", "subscribed at" if self.mqtt.ready else "still connecting to", cfg.mqtt.url
            )

    async def _listen(self, name: str, fe: CoapFrontEnd | HttpFrontEnd, host: str, port: int) -> None:
        """Start ``fe`` on its configured ``host``:``port`` and give it the rate limiter; an error to bind names the
        front end and the address (``coap: cannot listen on 127.0.0.1:5683: address already in use``)."""
        try:
            bound = await fe.start()
        except OSError as e:
            raise OSError(
                e.errno, f"{name}: cannot listen on {_hostport(host, port)}: {e.strerror}"
            ) from None
        fe.limiter = self.limiter
        log.info("%s listening on %s", name, _hostport(*bound))

    async def stop(self) -> None:
        """Graceful stop; safe to call twice and after a failed start."""
        if not self._running:
            return
        self._running = False
        frontends: list[tuple[str, FrontEnd | None]] = [
            ("http", self.http),
            ("coap", self.coap),
            ("mqtt", self.mqtt),
        ]
        for name, fe in frontends:
            if fe is not None:
                await _quietly(name, fe.stop(STOP_TIMEOUT))
        if self.outbox is not None:
            await _quietly("outbox", self.outbox.stop(STOP_TIMEOUT))
        if self._own_resolver is not None:
            await _quietly("resolver", self._own_resolver.close())
        if self.shared is not None:
            await _quietly("shared cache", self.shared.close())
        for name, closer in (("registry", self.registry), ("outbox", self.outbox)):
            if closer is not None:
                try:
                    closer.close()
                except Exception:
                    log.exception("%s close failed", name)
        log.info("gateway stopped %s", kv(uptime=round(time.monotonic() - self._started_at, 1)))

    async def run(self, stop: asyncio.Event | None = None, *, freeze_gc: bool = False) -> None:
        """Start, wait for SIGTERM/SIGINT (or ``stop``), stop.

        ``freeze_gc`` (for a process that is only this gateway, as ``ida gateway``): once started, move every object
        alive so far (modules, config, the started services) out of the garbage collector's reach, so its
        collections during traffic walk only what traffic allocates (``gc.freeze``)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            await self.start()
            if freeze_gc:
                gc.collect()
                gc.freeze()
            log.info("gateway running %s", kv(data=str(self.config.data_dir)))
            await stop.wait()
            log.info("gateway stopping")
        finally:
            await self.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _secure_coap(self, cfg: GatewayConfig) -> None:
        """OSCORE (docs/security.md) in front of the CoAP site. In plain mode with no keystore there is no key
        to verify anything with: the site stays unwrapped (the fast path keeps learning) and the mode is flagged."""
        assert self.coap is not None
        keystore = Path(cfg.coap.keystore) if cfg.coap.keystore else cfg.data_dir / "keystore.json"
        if cfg.coap.security == "oscore" or keystore.exists():
            self.coap_security = secure_frontend(
                self.coap, cfg.coap.security, keystore, cfg.data_dir, plain_resolve=cfg.coap.plain_resolve
            )
        else:
            log.warning(
                "coap security is PLAIN: unauthenticated requests are served (factory bench only) %s",
                kv(keystore="none"),
            )

    # -- health and metrics ----------------------------------------------------------------------------------
    def health(self) -> dict[str, str]:
        """Component -> state, for /healthz. "down" marks the gateway degraded."""
        out: dict[str, str] = {
            "coap": "listening" if self.coap and self.coap.address else "off",
            "http": "listening" if self.http and self.http.address else "off",
            "mqtt": "off" if self.mqtt is None else ("ready" if self.mqtt.ready else "down"),
            "outbox": "off" if self.outbox is None or not self.outbox.active else "delivering",
        }
        if isinstance(self.resolver, Resolver):
            nodes = self.resolver.pool.stats()
            healthy = sum(1 for n in nodes.values() if n.healthy)
            out["upstream"] = "down" if nodes and not healthy else f"{healthy}/{len(nodes)} healthy"
        if self.shared is not None:
            out["shared_cache"] = "up" if self.shared.up else "down"
        if self.coap is not None:
            out["coap_security"] = self.coap_security.label() if self.coap_security else PLAIN_WARNING
        return out

    def _add_collectors(self) -> None:
        if isinstance(self.resolver, Resolver):
            self.metrics.add_collector(_resolver_samples(self.resolver))
        if self.shared is not None:
            self.metrics.add_collector(_shared_samples(self.metrics, self.shared))
        registry = self.registry
        if registry is not None:

            def registry_samples() -> Iterable[Sample]:
                s = registry.stats()
                yield "ida_devices_online", {}, s["devices_online"]
                yield "ida_outbox_depth", {}, s["outbox_depth"]
                yield "ida_reports_total", {}, s["reports_total"]
                yield "ida_reports_duplicate_total", {}, s["duplicates_total"]

            self.metrics.add_collector(registry_samples)


def _resolver_samples(resolver: Resolver) -> Callable[[], Iterable[Sample]]:
    def collect() -> Iterable[Sample]:
        st = resolver.stats()
        c = st.cache
        yield "ida_cache_hits_total", {}, c.hits
        yield "ida_cache_misses_total", {}, c.misses
        yield "ida_cache_stale_total", {}, st.stale_answers
        yield "ida_cache_prefetches_total", {}, c.prefetches
        yield "ida_cache_evictions_total", {}, c.evictions
        yield "ida_cache_entries", {}, c.entries
        for node, n in st.upstream.items():
            yield "ida_upstream_requests_total", {"node": node}, n.requests
            cumulative = tuple((le, cnt) for le, cnt in n.latency.cumulative() if le != float("inf"))
            yield (
                "ida_upstream_latency_seconds",
                {"node": node},
                HistogramSample(cumulative, n.latency.sum, n.latency.count),
            )

    return collect


def _shared_samples(metrics: Metrics, shared: RedisSharedCache) -> Callable[[], Iterable[Sample]]:
    for name, kind, text, labels in SHARED_METRICS:
        metrics.declare(name, kind, text, labels)

    def collect() -> Iterable[Sample]:
        s = shared.stats
        for result, n in (("hit", s.hits), ("stale", s.stale), ("miss", s.misses), ("skipped", s.skipped)):
            yield "ida_shared_cache_lookups_total", {"result": result}, n
        yield "ida_shared_cache_locks_total", {}, s.locks
        for result, n in (("hit", s.wait_hits), ("fallback", s.wait_fallbacks)):
            yield "ida_shared_cache_waits_total", {"result": result}, n
        yield "ida_shared_cache_writes_total", {}, s.writes
        yield "ida_shared_cache_errors_total", {}, s.errors
        yield "ida_shared_cache_up", {}, s.up

    return collect


SHARED_METRICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "ida_shared_cache_lookups_total",
        "counter",
        "Local misses looked up in the shared tier, by result (hit, stale, miss, skipped while Redis is down).",
        ("result",),
    ),
    (
        "ida_shared_cache_locks_total",
        "counter",
        "Cross-gateway locks taken: upstream requests made for every gateway.",
        (),
    ),
    (
        "ida_shared_cache_waits_total",
        "counter",
        "Waits for another gateway's upstream answer, by result (hit, fallback to an own request).",
        ("result",),
    ),
    ("ida_shared_cache_writes_total", "counter", "Answers written to the shared tier.", ()),
    (
        "ida_shared_cache_errors_total",
        "counter",
        "Redis calls that failed or timed out (each opens the local-only circuit).",
        (),
    ),
    ("ida_shared_cache_up", "gauge", "1 while Redis answers, 0 while resolving local-only.", ()),
)


def _redact(url: str) -> str:
    from gateway.shared_cache import redact_url

    return redact_url(url)


async def _quietly(name: str, aw: Any) -> None:
    try:
        await aw
    except Exception:
        log.exception("%s stop failed", name)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
