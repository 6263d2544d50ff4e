"""Gateway configuration: TOML file (``tomllib``) -> :class:`GatewayConfig`, plus command-line overrides.

Every option is a field of one of the section dataclasses below; the field's ``metadata`` carries the check
that turns the TOML value into the field value (or says what was expected). Unknown sections or keys and
badly typed values raise :class:`ConfigError` naming the key, e.g.
``[coap] port: expected a port number 0-65535 (0 = any free port), got "x"``. docs/gateway.md and gateway.example.toml document
every option; ``tests/unit/gateway/test_gateway_config.py`` checks that they name each one.

Precedence, lowest first: built-in defaults, ``$IDA_DATA`` (data dir only), the TOML file, command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import GatewayError
from gateway.upstream.pool import parse_upstream_url

MQTT_SCHEMES = ("mqtt", "mqtts")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(GatewayError, ValueError):
    """A configuration the gateway cannot run with; the message names the section and key."""


class _Bad(Exception):
    """Raised by a check: what was expected (the loader adds the key and the value)."""


Check = Callable[[Any], Any]


def _got(value: Any) -> str:
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _host(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad("expected a host name or IP address")
    return v.strip()


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad("expected a string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("expected true or false")
    return v


def _finite(v: Any) -> bool:
    """An int, or a float that is not nan or inf (TOML has both; nan passes every < and <= check)."""
    return isinstance(v, int) or math.isfinite(v)


def _integer(low: int, high: float = math.inf, expected: str = "") -> Check:
    """An int (not a bool) from ``low`` to ``high``."""
    expected = expected or f"expected an integer >= {low}"

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise _Bad(expected)
        return v

    return check


def _number(expected: str, *, positive: bool = False, below: float = math.inf) -> Check:
    """An int or float (not a bool, nan or inf) >= 0 (> 0 when ``positive``) and < ``below``, as a float."""

    def check(v: Any) -> float:
        bad = isinstance(v, bool) or not isinstance(v, int | float) or not _finite(v)
        if bad or v < 0 or (positive and v == 0) or v >= below:
            raise _Bad(expected)
        return float(v)

    return check


_port = _integer(0, 65535, "expected a port number 0-65535 (0 = any free port)")
_positive_int = _integer(1)
_seconds = _number("expected a number of seconds >= 0")
_positive_seconds = _number("expected a number of seconds > 0", positive=True)
_rate = _number("expected a number of requests per second >= 0 (0 = no limit)")
_fraction = _number("expected a number from 0 up to (not including) 1", below=1)


def _url(schemes: tuple[str, ...], allow_empty: bool) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise _Bad(f"expected a URL ({'/'.join(s + '://' for s in schemes)})")
        if allow_empty and v == "":
            return v
        return _check_url(v, schemes)

    return check


def _check_url(v: str, schemes: tuple[str, ...]) -> str:
    expected = f"expected a URL with scheme {', '.join(s + '://' for s in schemes)}"
    try:
        parts = urlsplit(v)
        _ = parts.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError:
        raise _Bad(expected) from None
    if parts.scheme not in schemes or not parts.hostname:
        raise _Bad(expected)
    return v


REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")


def _redis_url(v: Any) -> str:
    expected = "expected a URL redis://host:port/db, rediss://, unix:///path or redis+cluster://host:port (empty = off)"
    if not isinstance(v, str):
        raise _Bad(expected)
    if v == "":
        return v
    try:
        parts = urlsplit(v)
        _ = parts.port
    except ValueError:
        raise _Bad(expected) from None
    if parts.password is not None:
        raise _Bad("no password in the URL (URLs are logged); use [cache] redis_password_file")
    if (parts.scheme in REDIS_SCHEMES and parts.hostname) or (parts.scheme == "unix" and parts.path):
        return v
    raise _Bad(expected)


def _upstream_urls(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Bad("expected a list of URL strings")
    for url in v:
        try:
            parse_upstream_url(url)
        except ValueError as e:
            raise _Bad(str(e)) from None
    return tuple(v)


def _level(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in LOG_LEVELS:
        raise _Bad(f"expected one of {', '.join(LOG_LEVELS)}")
    return v.lower()


def _security_mode(v: Any) -> str:
    if v not in ("plain", "oscore"):
        raise _Bad('expected "plain" (factory bench, unauthenticated) or "oscore"')
    return str(v)


def _opt(default: Any, check: Check, doc: str) -> Any:
    """A config field: default, check (TOML value -> field value) and a one-line description."""
    if isinstance(default, list | dict):
        raise TypeError("mutable defaults are not allowed")
    return field(default=default, metadata={"check": check, "doc": doc})


# -- sections ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CoapConfig:
    host: str = _opt("127.0.0.1", _host, "address the CoAP server binds (UDP)")
    port: int = _opt(5683, _port, "UDP port of the CoAP server")
    security: str = _opt(
        "plain",
        _security_mode,
        '"oscore": devices must OSCORE-protect requests with their key; '
        '"plain": unauthenticated (factory bench only, logged and flagged in /healthz)',
    )
    keystore: str = _opt("", _text, "per-device keys written by ida flash; empty = <data dir>/keystore.json")
    plain_resolve: bool = _opt(
        False, _bool, "with oscore: still answer unprotected GET /r/ (resolution data is public)"
    )


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = _opt("127.0.0.1", _host, "address of the HTTP API (Handle REST, devices, /healthz, /metrics)")
    port: int = _opt(8080, _port, "TCP port of the HTTP API")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    url: str = _opt("", _url(MQTT_SCHEMES, True), "broker the MQTT front end connects to; empty = MQTT off")
    group: str = _opt("ida-gw", _text, "MQTT v5 shared-subscription group ($share/<group>/...)")
    username: str = _opt(
        "", _text, "this gateway's broker username (ida broker config --gateway NAME); empty = none"
    )
    password_file: str = _opt(
        "", _text, "file holding the gateway's broker password (first line); empty = none"
    )
    ca_file: str = _opt(
        "", _text, "CA (PEM) the broker's certificate must chain to, for mqtts://; empty = system CAs"
    )


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    urls: tuple[str, ...] = _opt(
        (),
        _upstream_urls,
        "recursive nodes (hdl://, hdl+tcp://, http://, https://); "
        "empty = $IDA_UPSTREAM or hdl://127.0.0.1:2641",
    )
    timeout: float = _opt(5.0, _positive_seconds, "one resolution, all nodes and retries together (s)")
    attempt_timeout: float = _opt(2.0, _positive_seconds, "one request to one node (s)")
    hedge: float = _opt(0.0, _seconds, "ask a second node when the first is silent this long (s); 0 = never")
    failure_threshold: int = _opt(3, _positive_int, "consecutive failures before a node is put in cooldown")
    cooldown: float = _opt(1.0, _positive_seconds, "first cooldown of a failing node, doubling each time (s)")
    max_cooldown: float = _opt(30.0, _positive_seconds, "longest cooldown (s)")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = _opt(100_000, _positive_int, "most answers kept (least recently used out first)")
    max_bytes: int = _opt(64 << 20, _positive_int, "most bytes of answers kept")
    min_ttl: float = _opt(0.0, _seconds, "lower clamp of an answer's lifetime (s)")
    max_ttl: float = _opt(3600.0, _seconds, "upper clamp of an answer's lifetime (s)")
    negative_ttl: float = _opt(60.0, _seconds, "lifetime of a not-found answer (s)")
    negative_max_ttl: float = _opt(300.0, _seconds, "upper clamp of a not-found answer's lifetime (s)")
    max_stale: float = _opt(86400.0, _seconds, "how long past expiry an answer may still be served stale (s)")
    stale_answer_after: float = _opt(
        1.8, _seconds, "with a stale answer at hand, wait this long for upstream (s)"
    )
    stale_reply_ttl: float = _opt(30.0, _seconds, "Max-Age / ttl of a stale answer (s)")
    prefetch_fraction: float = _opt(
        0.1, _fraction, "refresh entries hit in this last part of their lifetime; 0 = never"
    )
    persist: bool = _opt(True, _bool, "keep the cache in <data dir>/cache.sqlite3 so a restart starts warm")
    flush_interval: float = _opt(0.5, _positive_seconds, "how often cache changes are written to SQLite (s)")
    redis_url: str = _opt(
        "",
        _redis_url,
        "shared cache tier under the local cache (redis://host:6379/0, rediss://, "
        "unix:///path, redis+cluster://seed:port); empty = local cache only",
    )
    redis_password_file: str = _opt("", _text, "file whose first line is the Redis password; empty = none")
    redis_lock_wait: float = _opt(
        1.0, _seconds, "longest wait for another gateway's upstream answer to the same key (s)"
    )
    redis_timeout: float = _opt(
        0.25, _positive_seconds, "one Redis call; slower or failing = local-only for a while (s)"
    )


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    file: str = _opt(
        "", _text, "local zone (records answered before the cache); empty = <data dir>/zone.json"
    )


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    mqtt_url: str = _opt(
        "", _url(MQTT_SCHEMES, True), "broker for the northbound report topic; empty = [mqtt] url"
    )
    mqtt_topic: str = _opt("", _text, "topic accepted reports are published to; empty = no MQTT sink")
    webhook_url: str = _opt(
        "", _url(("http", "https"), True), "URL accepted reports are POSTed to; empty = none"
    )


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    queue_max: int = _opt(
        10_000,
        _positive_int,
        "reports waiting for their commit before more are refused (CoAP 5.03 + Max-Age)",
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    device_rate: float = _opt(
        10.0, _rate, "requests per second per device (CoAP /d/<id>, MQTT topic key); 0 = no limit"
    )
    device_burst: int = _opt(
        20, _positive_int, "requests a device may send at once before device_rate applies"
    )
    source_rate: float = _opt(
        0.0, _rate, "requests per second per source IP address (CoAP, HTTP /api); 0 = no limit"
    )
    source_burst: int = _opt(100, _positive_int, "requests a source address may send at once")
    max_buckets: int = _opt(
        100_000, _positive_int, "most devices and most addresses tracked (least recently used out)"
    )


@dataclass(frozen=True, slots=True)
class DataConfig:
    dir: Path = _opt(
        Path("data"),
        lambda v: Path(_text(v) or "."),
        "runtime state (SQLite files); default $IDA_DATA or ./data",
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = _opt("info", _level, "debug, info, warning or error")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    coap: CoapConfig = field(default_factory=CoapConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    zone: ZoneConfig = field(default_factory=ZoneConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def data_dir(self) -> Path:
        return self.data.dir


def options() -> list[tuple[str, str, Any, str]]:
    """Every option as (section, key, default, description), in file order: what the docs must list."""
    out = []
    for sec in dataclasses.fields(GatewayConfig):
        for f in dataclasses.fields(_section_type(sec.name)):
            out.append((sec.name, f.name, f.default, f.metadata["doc"]))
    return out


def _section_type(name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(GatewayConfig)}[name]
    assert callable(f.default_factory)
    return f.default_factory


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("IDA_DATA") or "data")


def from_mapping(doc: Mapping[str, Any], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Build a config from a parsed TOML document, checking every section and key."""
    sections: dict[str, Any] = {}
    known = [f.name for f in dataclasses.fields(GatewayConfig)]
    for name, table in doc.items():
        if name not in known:
            raise ConfigError(f"[{name}]: unknown section (known: {', '.join(known)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a [{name}] table, got {_got(table)}")
        sections[name] = _section(name, table)
    if "data" not in sections or "dir" not in doc["data"]:
        base = sections.get("data", DataConfig())
        sections["data"] = dataclasses.replace(base, dir=default_data_dir(env))
    cfg = GatewayConfig(**sections)
    check(cfg)
    return cfg


def check(cfg: GatewayConfig) -> None:
    """Rules that involve more than one key."""
    if cfg.cache.min_ttl > cfg.cache.max_ttl:
        raise ConfigError(
            f"[cache] min_ttl: must not exceed max_ttl ({cfg.cache.max_ttl:g}), got {cfg.cache.min_ttl:g}"
        )
    if cfg.outbox.mqtt_topic and not (cfg.outbox.mqtt_url or cfg.mqtt.url):
        raise ConfigError("[outbox] mqtt_topic: needs a broker: set [outbox] mqtt_url or [mqtt] url")
    if cfg.outbox.mqtt_url and not cfg.outbox.mqtt_topic:
        raise ConfigError(
            "[outbox] mqtt_url: set [outbox] mqtt_topic too (the topic reports are published to)"
        )
    for where, url in (("[mqtt] url", cfg.mqtt.url), ("[outbox] mqtt_url", cfg.outbox.mqtt_url)):
        if url and urlsplit(url).password is not None:
            raise ConfigError(
                f"{where}: no password in the URL (URLs are logged); use [mqtt] username and password_file"
            )
    if cfg.mqtt.password_file and not cfg.mqtt.username:
        raise ConfigError("[mqtt] password_file: set [mqtt] username too")


def _section(name: str, table: Mapping[str, Any]) -> Any:
    cls = _section_type(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"[{name}] {key}: unknown key (known: {', '.join(fields)})")
        try:
            values[key] = f.metadata["check"](raw)
        except _Bad as e:
            raise ConfigError(f"[{name}] {key}: {e}, got {_got(raw)}") from None
    return cls(**values)


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read a TOML file (None: defaults only)."""
    if path is None:
        return from_mapping({}, env)
    p = Path(path)
    try:
        with p.open("rb") as fp:
            doc = tomllib.load(fp)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # tomllib decodes the bytes itself
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid TOML: arrays or tables nested too deeply") from None
    try:
        return from_mapping(doc, env)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {p})") from None


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` (``HOST`` alone keeps nothing: the port is required)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{what}: expected HOST:PORT, got {_got(text)}")
    try:
        return _host(host), _port(int(port))
    except _Bad as e:
        raise ConfigError(f"{what}: {e}, got {_got(text)}") from None


def _flag(flag: str, check: Check, value: Any) -> Any:
    """``check(value)`` for a command-line flag; a bad value is a ConfigError naming the flag."""
    try:
        return check(value)
    except _Bad as e:
        raise ConfigError(f"{flag}: {e}, got {_got(value)}") from None


def with_overrides(
    cfg: GatewayConfig,
    *,
    upstream: Sequence[str] | None = None,
    coap: str | None = None,
    http: str | None = None,
    mqtt: str | None = None,
    data_dir: str | None = None,
    log_level: str | None = None,
) -> GatewayConfig:
    """Apply command-line flags (None = not given) on top of a loaded config."""
    changes: dict[str, Any] = {}
    if upstream:
        changes["upstream"] = dataclasses.replace(
            cfg.upstream, urls=_flag("--upstream", _upstream_urls, list(upstream))
        )
    if coap is not None:
        host, port = parse_hostport(coap, "--coap")
        changes["coap"] = dataclasses.replace(cfg.coap, host=host, port=port)
    if http is not None:
        host, port = parse_hostport(http, "--http")
        changes["http"] = dataclasses.replace(cfg.http, host=host, port=port)
    if mqtt is not None:
        changes["mqtt"] = dataclasses.replace(cfg.mqtt, url=_flag("--mqtt", _url(MQTT_SCHEMES, True), mqtt))
    if data_dir is not None:
        changes["data"] = dataclasses.replace(cfg.data, dir=Path(data_dir))
    if log_level is not None:
        changes["log"] = dataclasses.replace(cfg.log, level=_flag("--log-level", _level, log_level))
    out = dataclasses.replace(cfg, **changes)
    check(out)
    return out
