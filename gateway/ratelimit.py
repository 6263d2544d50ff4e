"""Rate limits per device and per source address: token buckets, bounded in memory (docs/security-mqtt.md).

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens per second; a request takes one. The gateway keeps
one bucket per device (CoAP: the identifier in ``/d/<id>/…`` or the OSCORE-authenticated device; MQTT: the topic
key, which the broker's ACL ties to the authenticated username) and one per source IP address (CoAP, HTTP).
Buckets live in an LRU map of at most ``max_buckets`` entries per kind, so a flood of new keys costs bounded
memory: the least recently used bucket goes first (it has usually refilled, so nothing is lost by forgetting it).

    limiter = RateLimiter(Limits(device_rate=5, device_burst=20, source_rate=50, source_burst=100))
    v = limiter.check(device="88.123.99/PUMP-0001", source="10.0.0.7")
    if v.limited:
        ...  # CoAP 4.29 + Max-Age = retry_after(v.wait); MQTT: drop and count; HTTP 429 + Retry-After

What each front end does with a refusal: CoAP answers 4.29 with ``Max-Age`` = seconds until a token is there;
HTTP answers 429 with ``Retry-After``; MQTT drops the message (answering would cost the broker the bandwidth the
limit protects) -- all count ``ida_ratelimited_total{frontend, limit}``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import NamedTuple

DEVICE = "device"
SOURCE = "source"


@dataclass(frozen=True, slots=True)
class Limits:
    """Rates in requests per second (0 = no limit of that kind); bursts in requests."""

    device_rate: float = 0.0
    device_burst: float = 0.0
    source_rate: float = 0.0
    source_burst: float = 0.0
    max_buckets: int = 100_000

    def __post_init__(self) -> None:
        for name in ("device_rate", "device_burst", "source_rate", "source_burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_buckets < 1:
            raise ValueError("max_buckets must be >= 1")


class Verdict(NamedTuple):
    wait: float  # 0 = allowed (a token was taken); else seconds until a token is there (nothing taken)
    limit: str | None = None  # which limit refused: "device" or "source"

    @property
    def limited(self) -> bool:
        return self.wait > 0


ALLOWED = Verdict(0.0)


def retry_after(wait: float) -> int:
    """Whole seconds a client should wait (CoAP Max-Age, HTTP Retry-After): rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


class TokenBuckets:
    """Token buckets by key, at most ``max_keys`` of them (least recently used out first). Thread-safe."""

    def __init__(
        self, rate: float, burst: float, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))  # a bucket must hold at least one request
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()  # key -> [tokens, updated]
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: Hashable, now: float) -> list[float]:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
            b = self._buckets[key] = [self.burst, now]
        else:
            self._buckets.move_to_end(key)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        return b

    def wait(self, key: Hashable) -> float:
        """Seconds until ``key`` has a token (0 = now); takes nothing."""
        with self._lock:
            b = self._tokens(key, self._clock())
            return 0.0 if b[0] >= 1.0 else (1.0 - b[0]) / self.rate

    def take(self, key: Hashable) -> float:
        """Take a token: 0 when there was one, else the seconds until there is (and nothing is taken)."""
        with self._lock:
            b = self._tokens(key, self._clock())
            if b[0] >= 1.0:
                b[0] -= 1.0
                return 0.0
            return (1.0 - b[0]) / self.rate

    def give_back(self, key: Hashable) -> None:
        with self._lock:
            b = self._buckets.get(key)
            if b is not None:
                b[0] = min(self.burst, b[0] + 1.0)


class RateLimiter:
    """Per-device and per-source token buckets; :meth:`check` takes from both or from neither."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.device = (
            TokenBuckets(limits.device_rate, limits.device_burst, limits.max_buckets, clock)
            if limits.device_rate > 0
            else None
        )
        self.source = (
            TokenBuckets(limits.source_rate, limits.source_burst, limits.max_buckets, clock)
            if limits.source_rate > 0
            else None
        )
        self.refused = {DEVICE: 0, SOURCE: 0}

    @property
    def enabled(self) -> bool:
        return self.device is not None or self.source is not None

    def check(self, *, device: str | None = None, source: str | None = None) -> Verdict:
        """One request of ``device`` (None = not known) from ``source`` (an IP address; None = not known)."""
        src = self.source if source else None
        dev = self.device if device else None
        if src is not None:
            wait = src.take(source)
            if wait:
                self.refused[SOURCE] += 1
                return Verdict(wait, SOURCE)
        if dev is not None:
            wait = dev.take(device)
            if wait:
                if src is not None:
                    src.give_back(source)  # refused anyway: the source keeps its token
                self.refused[DEVICE] += 1
                return Verdict(wait, DEVICE)
        return ALLOWED


def source_of_sockaddr(host: str | None) -> str | None:
    """The key of a source address: the IP, with an IPv4-mapped IPv6 address shown as IPv4."""
    if not host:
        return None
    return host[7:] if host.startswith("::ffff:") and "." in host else host
