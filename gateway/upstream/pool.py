"""A pool of recursive nodes: health, latency, failover, hedging, one overall timeout.

URLs (:func:`parse_upstream_url`):

* ``hdl://host[:2641]``      native Handle protocol, UDP first with TCP fallback (``hdl+udp://`` too)
* ``hdl+tcp://host[:2641]``  native Handle protocol over TCP only
* ``http://host[:80][/base]``, ``https://host[:443][/base]``  Handle REST API

Per node the pool keeps the count of consecutive failures, a cooldown and a latency EWMA. Nodes are tried
healthy first (fewest consecutive failures), then fastest first (EWMA; a node never measured counts as
fastest so it gets measured). After ``failure_threshold`` consecutive failures a node is *sick*: it is not
asked for ``cooldown * 2**(failures - failure_threshold)`` seconds (capped at ``max_cooldown``); the
first request after that probes it. When every node is sick the pool fails at once, without sending
anything, with :class:`AllUpstreamsFailed` carrying each node's last error: that is what makes a
resolution with all nodes known to be down fail fast.

One resolution: ask the best node; on an error ask the next one at once (failover); if ``hedge_delay`` is
set (None or 0 = off) and the request in flight has not answered after that long, ask the next node too (one hedge per
resolution) -- the first *answer* wins and the other request is cancelled. Each request is bounded by
``attempt_timeout``, the whole resolution by ``timeout``. "Handle not found" and "values not found" are
answers (they win like a success and do not mark a node unhealthy).

Errors: :class:`AllUpstreamsFailed` (``errors`` maps node -> its error; a node skipped because it is sick
maps to its last error) when every eligible node was asked and failed, or every node is sick; :class:`UpstreamTimeout` when the overall ``timeout`` expires
with requests still in flight. A node that times out on its own ``attempt_timeout`` counts as a failed
node (its error in ``AllUpstreamsFailed.errors`` is an UpstreamTimeout).

Counters per node (:meth:`UpstreamPool.stats`): requests sent, answers, failures, cancelled (lost a hedge
race), and a latency histogram with Prometheus-style buckets, observed for every request that completed
(answer or error, not cancelled).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlsplit

from gateway.errors import AllUpstreamsFailed, UpstreamError, UpstreamRefused, UpstreamTimeout
from gateway.upstream.base import ANSWER_CODES, Upstream
from proto.records import HandleValue

__all__ = [
    "LATENCY_BUCKETS",
    "Histogram",
    "NodeStats",
    "PoolAnswer",
    "UpstreamPool",
    "UpstreamSpec",
    "make_client",
    "parse_upstream_url",
]

log = logging.getLogger(__name__)

HANDLE_PORT = 2641
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_SCHEMES = {
    "hdl": ("native", "udp"),
    "hdl+udp": ("native", "udp"),
    "hdl+tcp": ("native", "tcp"),
    "http": ("rest", ""),
    "https": ("rest", ""),
}


# -- URLs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """A parsed upstream URL. ``kind`` is "native" or "rest"; ``transport`` "udp"/"tcp" for native nodes."""

    url: str
    kind: str
    host: str
    port: int
    transport: str = ""
    base: str = ""  # REST: scheme://host:port[/path] without a trailing slash


def parse_upstream_url(url: str) -> UpstreamSpec:
    """Parse ``hdl://``, ``hdl+tcp://``, ``http://`` or ``https://`` URLs; ValueError names the URL."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError as e:  # bad port, bad IPv6 brackets
        raise ValueError(f"upstream URL {url!r}: {e}") from None
    if scheme not in _SCHEMES:
        raise ValueError(
            f"upstream URL {url!r}: scheme must be hdl://, hdl+udp://, hdl+tcp://, http:// or https://, "
            f"not {scheme or 'none'!r}"
        )
    if not host:
        raise ValueError(f"upstream URL {url!r}: no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"upstream URL {url!r}: query, fragment and user info are not supported")
    kind, transport = _SCHEMES[scheme]
    if kind == "native":
        if parts.path not in ("", "/"):
            raise ValueError(f"upstream URL {url!r}: a hdl:// URL takes no path")
        return UpstreamSpec(url, kind, host, port or HANDLE_PORT, transport)
    port = port or (443 if scheme == "https" else 80)
    netloc = f"[{host}]" if ":" in host else host
    base = f"{scheme}://{netloc}:{port}{parts.path.rstrip('/')}"
    return UpstreamSpec(url, kind, host, port, base=base)


def make_client(spec: UpstreamSpec, timeout: float) -> Upstream:
    """The client for one node, answering within ``timeout`` seconds.

    The native UDP client gets ``timeout / 2`` per transport so that UDP and its TCP fallback both fit.
    """
    if spec.kind == "rest":
        from gateway.upstream.rest import RestClient

        return RestClient(spec.base, timeout=timeout, node=spec.url)
    from gateway.upstream.native import HandleClient

    if spec.transport == "tcp":
        return HandleClient(spec.host, spec.port, transport="tcp", timeout=timeout)
    return HandleClient(spec.host, spec.port, transport="udp", timeout=timeout / 2)


# -- statistics ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class Histogram:
    """A Prometheus-style histogram: ``counts[i]`` observations <= ``buckets[i]`` (non-cumulative), the last
    count is the +Inf overflow. :meth:`cumulative` gives the ``_bucket{le=...}`` series."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1  # first bucket with value <= bound
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """[(le, count <= le), ..., (inf, total)]."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.sum, self.count)


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A snapshot of one node's counters (for ``ida_upstream_*{node=...}`` metrics)."""

    node: str
    requests: int
    answers: int
    failures: int
    cancelled: int
    consecutive_failures: int
    healthy: bool
    latency_ewma: float | None
    latency: Histogram


@dataclass(eq=False)
class _Node:
    name: str
    client: Upstream
    requests: int = 0
    answers: int = 0
    failures: int = 0
    cancelled: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0
    ewma: float | None = None
    last_error: UpstreamError | None = None
    latency: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True, slots=True)
class PoolAnswer:
    """An answer of one node: ``code`` RC_SUCCESS / RC_HANDLE_NOT_FOUND / RC_VALUES_NOT_FOUND."""

    code: int
    handle: str
    values: tuple[HandleValue, ...]
    node: str
    elapsed: float


# -- the pool ------------------------------------------------------------------------------------------
class UpstreamPool:
    """Resolves through several nodes; see the module docstring for the policy."""

    def __init__(
        self,
        nodes: Iterable[tuple[str, Upstream]],
        *,
        timeout: float = 5.0,
        attempt_timeout: float = 2.0,
        hedge_delay: float | None = None,
        failure_threshold: int = 3,
        cooldown: float = 1.0,
        max_cooldown: float = 30.0,
        ewma_alpha: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes = [_Node(name, client) for name, client in nodes]
        names = [n.name for n in self._nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"upstream nodes must be distinct: {names}")
        if timeout <= 0 or attempt_timeout <= 0:
            raise ValueError("timeout and attempt_timeout must be positive")
        if hedge_delay is not None and hedge_delay <= 0:
            hedge_delay = None  # 0 = no hedging, as in the TOML config
        if failure_threshold < 1 or cooldown < 0 or max_cooldown < cooldown:
            raise ValueError("need failure_threshold >= 1 and 0 <= cooldown <= max_cooldown")
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.hedge_delay = hedge_delay
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.ewma_alpha = ewma_alpha
        self._clock = clock

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str],
        *,
        timeout: float = 5.0,
        attempt_timeout: float = 2.0,
        hedge_delay: float | None = None,
        failure_threshold: int = 3,
        cooldown: float = 1.0,
        max_cooldown: float = 30.0,
        factory: Callable[[UpstreamSpec, float], Upstream] = make_client,
        clock: Callable[[], float] = time.monotonic,
    ) -> UpstreamPool:
        """Parse every URL first (ValueError naming the bad one), then build one client per node."""
        specs = [parse_upstream_url(u) for u in urls]
        if not specs:
            raise ValueError("at least one upstream URL is needed")
        seen: set[str] = set()
        for s in specs:
            if s.url in seen:
                raise ValueError(f"upstream URL {s.url!r} is given twice")
            seen.add(s.url)
        return cls(
            [(s.url, factory(s, attempt_timeout)) for s in specs],
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            hedge_delay=hedge_delay,
            failure_threshold=failure_threshold,
            cooldown=cooldown,
            max_cooldown=max_cooldown,
            clock=clock,
        )

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self._nodes]

    def order(self) -> list[str]:
        """Names of the nodes a resolution would try now, in order (sick nodes left out)."""
        return [n.name for n in self._eligible(self._clock())]

    def _eligible(self, now: float) -> list[_Node]:
        ok = [n for n in self._nodes if n.down_until <= now]
        return sorted(ok, key=lambda n: (n.consecutive_failures, n.ewma if n.ewma is not None else 0.0))

    async def resolve(
        self, handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()
    ) -> PoolAnswer:
        """The first answer of a node (success, not found or values not found), or raise (module doc)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeout
        nodes = self._nodes
        if len(nodes) == 1 and nodes[0].down_until <= self._clock():  # one healthy node: nothing to order
            return await self._only(nodes[0], handle, tuple(types), tuple(indexes), deadline)
        queue = self._eligible(self._clock())
        if not queue:
            last = {n.name: n.last_error or UpstreamError("node is in cooldown", n.name) for n in self._nodes}
            log.info("upstream.all_sick handle=%s nodes=%d", handle, len(self._nodes))
            raise AllUpstreamsFailed(last)
        if len(queue) == 1:  # nothing to fail over or hedge to: ask it in this task (no task, no wait)
            return await self._only(queue[0], handle, tuple(types), tuple(indexes), deadline)
        errors: dict[str, UpstreamError] = {}
        pending: dict[asyncio.Task[PoolAnswer], _Node] = {}
        hedge_at: float | None = None
        hedged = False

        def launch() -> None:
            nonlocal hedge_at
            node = queue.pop(0)
            task = asyncio.create_task(self._attempt(node, handle, tuple(types), tuple(indexes)))
            task.add_done_callback(_consume)
            pending[task] = node
            if self.hedge_delay is not None and not hedged and queue:
                hedge_at = loop.time() + self.hedge_delay

        launch()
        try:
            while pending:
                wake = deadline
                if hedge_at is not None and not hedged and queue and len(pending) == 1:
                    wake = min(wake, hedge_at)
                done, _ = await asyncio.wait(
                    pending, timeout=max(0.0, wake - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    node = pending.pop(task)
                    exc = task.exception()
                    if exc is None:
                        return task.result()
                    errors[node.name] = (
                        exc if isinstance(exc, UpstreamError) else UpstreamError(str(exc), node.name)
                    )
                now = loop.time()
                if done and queue and len(pending) < (2 if hedged else 1):
                    log.debug("upstream.failover handle=%s to=%s", handle, queue[0].name)
                    launch()
                elif (
                    not done
                    and hedge_at is not None
                    and not hedged
                    and queue
                    and now >= hedge_at
                    and now < deadline
                ):
                    hedged = True
                    log.debug("upstream.hedge handle=%s to=%s after=%.3f", handle, queue[0].name, now - start)
                    launch()
                if pending and now >= deadline:
                    names = ", ".join(n.name for n in pending.values())
                    log.info("upstream.timeout handle=%s timeout=%g waiting=%s", handle, self.timeout, names)
                    raise UpstreamTimeout(
                        f"{handle}: no upstream answered within {self.timeout:g}s (waiting for {names})"
                    )
        finally:
            for task in pending:
                task.cancel()
        self._all_failed(handle, errors)

    async def _only(
        self, node: _Node, handle: str, types: tuple[str, ...], indexes: tuple[int, ...], deadline: float
    ) -> PoolAnswer:
        """:meth:`resolve` when ``node`` is the only one eligible: the same outcome, two event-loop turns less."""
        try:
            if asyncio.get_running_loop().time() + self.attempt_timeout <= deadline:
                return await self._attempt(
                    node, handle, types, indexes
                )  # its own timeout comes first: no 2nd timer
            async with asyncio.timeout_at(deadline):
                return await self._attempt(node, handle, types, indexes)
        except TimeoutError:  # the overall timeout (an attempt's own timeout comes back as UpstreamTimeout)
            log.info("upstream.timeout handle=%s timeout=%g waiting=%s", handle, self.timeout, node.name)
            raise UpstreamTimeout(
                f"{handle}: no upstream answered within {self.timeout:g}s (waiting for {node.name})"
            ) from None
        except UpstreamError as e:
            self._all_failed(handle, {node.name: e})

    def _all_failed(self, handle: str, errors: dict[str, UpstreamError]) -> NoReturn:
        for n in self._nodes:  # nodes skipped while cooling down: their last error explains why
            if n.name not in errors and n.last_error is not None:
                errors[n.name] = n.last_error
        log.info("upstream.all_failed handle=%s errors=%d", handle, len(errors))
        raise AllUpstreamsFailed(errors)

    async def _attempt(
        self, node: _Node, handle: str, types: tuple[str, ...], indexes: tuple[int, ...]
    ) -> PoolAnswer:
        node.requests += 1
        t0 = self._clock()
        err: UpstreamError
        try:
            # asyncio.timeout(attempt_timeout), spelt out: a timer that cancels this task, the cancellation turned
            # into TimeoutError when it was the timer's (the same rules; a third of the cost on a cold miss)
            task = asyncio.current_task()
            assert task is not None
            cancelling = task.cancelling()
            fired: list[bool] = []
            timer = asyncio.get_running_loop().call_later(self.attempt_timeout, _expire, task, fired)
            try:
                res = await node.client.resolve(handle, types, indexes)
            except BaseException as e:
                timer.cancel()
                if fired and task.uncancel() <= cancelling and isinstance(e, asyncio.CancelledError):
                    raise TimeoutError from None
                raise
            timer.cancel()
            if fired:
                task.uncancel()
            code = res.code
            if code not in ANSWER_CODES:
                raise UpstreamRefused(f"{handle}: unexpected response code {code}", node.name, code=code)
            values = tuple(res.values) if code == ANSWER_CODES[0] else ()
        except asyncio.CancelledError:
            node.cancelled += 1
            raise
        except TimeoutError:
            err = UpstreamTimeout(f"{handle}: no answer within {self.attempt_timeout:g}s", node.name)
        except UpstreamError as e:
            err = e
            if err.node is None:
                err.node = node.name
        except OSError as e:  # a client that let a socket error through
            err = UpstreamError(f"{handle}: {e}", node.name)
        except Exception as e:  # a bug in a client must not take the pool down: count it as a failure
            log.exception("upstream.client_bug node=%s handle=%s", node.name, handle)
            err = UpstreamError(f"{handle}: {type(e).__name__}: {e}", node.name)
        else:
            elapsed = self._clock() - t0
            self._succeeded(node, elapsed)
            return PoolAnswer(code, handle, values, node.name, elapsed)
        self._failed(node, self._clock() - t0, err)
        raise err

    def _succeeded(self, node: _Node, elapsed: float) -> None:
        node.answers += 1
        node.latency.observe(elapsed)
        a = self.ewma_alpha
        node.ewma = elapsed if node.ewma is None else a * elapsed + (1 - a) * node.ewma
        if node.consecutive_failures:
            log.info("upstream.recovered node=%s after_failures=%d", node.name, node.consecutive_failures)
        node.consecutive_failures = 0
        node.down_until = 0.0

    def _failed(self, node: _Node, elapsed: float, err: UpstreamError) -> None:
        node.failures += 1
        node.latency.observe(elapsed)
        node.consecutive_failures += 1
        node.last_error = err
        extra = node.consecutive_failures - self.failure_threshold
        if extra >= 0:
            pause = min(self.max_cooldown, self.cooldown * (2 ** min(extra, 30)))
            node.down_until = self._clock() + pause
            log.warning(
                "upstream.sick node=%s failures=%d cooldown=%.3g error=%r",
                node.name,
                node.consecutive_failures,
                pause,
                str(err),
            )
        else:
            log.info(
                "upstream.failed node=%s failures=%d error=%r", node.name, node.consecutive_failures, str(err)
            )

    def stats(self) -> dict[str, NodeStats]:
        now = self._clock()
        return {
            n.name: NodeStats(
                node=n.name,
                requests=n.requests,
                answers=n.answers,
                failures=n.failures,
                cancelled=n.cancelled,
                consecutive_failures=n.consecutive_failures,
                healthy=n.down_until <= now,
                latency_ewma=n.ewma,
                latency=n.latency.copy(),
            )
            for n in self._nodes
        }

    async def close(self) -> None:
        for n in self._nodes:
            try:
                res = n.client.close()
                if inspect.isawaitable(res):
                    await res
            except Exception:  # closing must go on for the other nodes
                log.exception("upstream.close_failed node=%s", n.name)


def _expire(task: asyncio.Task[object], fired: list[bool]) -> None:
    """An attempt's time is up: cancel its task (the attempt turns that into TimeoutError)."""
    fired.append(True)
    task.cancel()


def _consume(task: asyncio.Task[PoolAnswer]) -> None:
    """Mark a request's outcome as retrieved (losers of a race are cancelled, not awaited)."""
    if not task.cancelled():
        task.exception()
