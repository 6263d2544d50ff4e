"""The resolver's settings (:class:`ResolverConfig`), its counters (:class:`ResolverStats`) and where its files
and default upstream come from. ``gateway/resolver.py`` uses them; ``gateway/config.py`` builds the config from
the gateway's TOML file."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.cache import CacheConfig, CacheStats
from gateway.upstream.pool import NodeStats

__all__ = [
    "CACHE_FILE",
    "DEFAULT_UPSTREAM",
    "ZONE_FILE",
    "ResolverConfig",
    "ResolverStats",
    "default_upstreams",
]

DEFAULT_UPSTREAM = "hdl://127.0.0.1:2641"
CACHE_FILE = "cache.sqlite3"
ZONE_FILE = "zone.json"


@dataclass
class ResolverConfig:
    """Everything the resolver needs; the TOML loader fills it (field names = config keys).

    Times are seconds; the cache's own settings are ``cache`` (:class:`gateway.cache.CacheConfig`). ``data_dir`` None keeps the cache in memory only; otherwise the cache lives in
    ``<data_dir>/cache.sqlite3`` and the zone in ``zone_file`` (default ``<data_dir>/zone.json``).
    """

    upstreams: list[str] = field(default_factory=lambda: [DEFAULT_UPSTREAM])
    timeout: float = 5.0  # one resolution, all nodes together
    attempt_timeout: float = 2.0  # one request to one node
    hedge_delay: float | None = None  # ask a second node when the first is silent this long (None/0 = off)
    failure_threshold: int = 3  # consecutive failures before a node is put in cooldown
    cooldown: float = 1.0  # first cooldown, doubling up to max_cooldown
    max_cooldown: float = 30.0
    stale_answer_after: float = 1.8  # with a stale entry, wait this long for upstream, then answer stale
    stale_reply_ttl: float = 30.0  # max-age of a stale answer
    cache: CacheConfig = field(
        default_factory=CacheConfig
    )  # bounds, lifetimes, prefetch window, write-behind
    prefetch: bool = True  # refresh entries hit in the last cache.prefetch_fraction of their lifetime
    persist: bool = True  # with a data_dir: keep the cache in SQLite
    purge_interval: float = 300.0  # drop entries more than max_stale past expiry this often
    data_dir: Path | None = None
    zone_file: Path | None = None

    def cache_path(self) -> Path | None:
        return None if self.data_dir is None or not self.persist else Path(self.data_dir) / CACHE_FILE

    def zone_path(self) -> Path | None:
        if self.zone_file is not None:
            return Path(self.zone_file)
        return None if self.data_dir is None else Path(self.data_dir) / ZONE_FILE


@dataclass(frozen=True)
class ResolverStats:
    """Counters for metrics: cache counters, per-node upstream counters, resolver-level counters."""

    cache: CacheStats
    upstream: dict[str, NodeStats]
    zone_hits: int
    upstream_fetches: int  # upstream requests started by the resolver (after single-flight)
    coalesced: int  # callers that joined a request already in flight
    upstream_errors: int  # fetches that failed
    stale_answers: int
    inflight: int
    zone_records: int
    not_served_answers: int = 0  # resolutions refused from the table of prefixes no node serves

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["upstream"] = {name: asdict(s) for name, s in self.upstream.items()}
        return out


def default_upstreams() -> list[str]:
    """Upstream URLs when none are configured: ``$IDA_UPSTREAM`` (space or comma separated), else
    ``hdl://127.0.0.1:2641``."""
    env = os.environ.get("IDA_UPSTREAM", "").replace(",", " ").split()
    return env or [DEFAULT_UPSTREAM]
