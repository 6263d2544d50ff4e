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

Health counts node failures only (:func:`gateway.upstream.base.outcome_of`): no answer in time, a transport
error, an answer that does not parse, a server-side failure (busy, RC_ERROR, ...). A node that answers --
records, "not found", "not responsible for this prefix" (301), a referral (302/303), a refusal of this
request (authentication needed, invalid handle, ...) -- is healthy, whatever the name asked: a flood of
foreign names cannot put it in cooldown.

One resolution: ask the best node; on an error ask the next one at once (failover); if ``hedge_delay`` is
set (None or 0 = off) and the request in flight has not answered after that long, ask the next node too (one
hedge per resolution) -- the first *answer* wins and the other request is cancelled. Each request is bounded
by ``attempt_timeout``, the whole resolution by ``timeout``. "Handle not found" and "values not found" are
answers (they win like a success). A node that is not responsible for the name or refers elsewhere is asked
no more for this resolution; the next node is (another one may serve the prefix).

Errors: :class:`AllUpstreamsFailed` (``errors`` maps node -> its error; a node skipped because it is sick
maps to its last error) when every eligible node was asked and none answered, or every node is sick; its
subclass :class:`NameNotServed` when every node asked said the name is not served there (301/302/303) --
an answer about the prefix, which the resolver may negative-cache; :class:`UpstreamTimeout` when the
overall ``timeout`` expires with requests still in flight. A node that times out on its own
``attempt_timeout`` counts as a failed node (its error in ``AllUpstreamsFailed.errors`` is an
UpstreamTimeout).

Counters per node (:meth:`UpstreamPool.stats`): requests sent, answers (anything the node answered that is
not a node failure), failures, cancelled (lost a hedge race), and a latency histogram with Prometheus-style
buckets, observed for every request that completed (answer or error, not cancelled).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypedDict, Unpack

from gateway.errors import AllUpstreamsFailed, NameNotServed, UpstreamError, UpstreamRefused, UpstreamTimeout
from gateway.upstream.base import ANSWER_CODES, Outcome, Upstream, outcome_of
from gateway.upstream.stats import LATENCY_BUCKETS, Histogram, NodeStats
from gateway.upstream.urls import UpstreamSpec, make_client, parse_upstream_url
from proto.records import HandleValue

__all__ = [
    "LATENCY_BUCKETS",
    "Histogram",
    "NodeStats",
    "PoolAnswer",
    "PoolOptions",
    "UpstreamPool",
    "UpstreamSpec",
    "make_client",
    "parse_upstream_url",
]

log = logging.getLogger(__name__)

DEFAULT_ATTEMPT_TIMEOUT = 2.0


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
class PoolOptions(TypedDict, total=False):
    """The keyword arguments of :class:`UpstreamPool` (and :meth:`UpstreamPool.from_urls`)."""

    timeout: float
    attempt_timeout: float
    hedge_delay: float | None
    failure_threshold: int
    cooldown: float
    max_cooldown: float
    ewma_alpha: float
    clock: Callable[[], float]


class UpstreamPool:
    """Resolves through several nodes; see the module docstring for the policy."""

    def __init__(
        self,
        nodes: Iterable[tuple[str, Upstream]],
        *,
        timeout: float = 5.0,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
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
        factory: Callable[[UpstreamSpec, float], Upstream] = make_client,
        **options: Unpack[PoolOptions],
    ) -> UpstreamPool:
        """Parse every URL first (ValueError naming the bad one), then build one client per node, each
        answering within ``attempt_timeout``; ``options`` are the pool's keyword arguments."""
        specs = [parse_upstream_url(u) for u in urls]
        if not specs:
            raise ValueError("at least one upstream URL is needed")
        seen: set[str] = set()
        for s in specs:
            if s.url in seen:
                raise ValueError(f"upstream URL {s.url!r} is given twice")
            seen.add(s.url)
        attempt_timeout = options.get("attempt_timeout", DEFAULT_ATTEMPT_TIMEOUT)
        return cls([(s.url, factory(s, attempt_timeout)) for s in specs], **options)

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
        if errors and all(outcome_of(e) is Outcome.NOT_SERVED for e in errors.values()):
            log.info("upstream.not_served handle=%s nodes=%d", handle, len(errors))
            raise NameNotServed(handle, errors)
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
            self._answered(node, elapsed)
            return PoolAnswer(code, handle, values, node.name, elapsed)
        if outcome_of(err) is Outcome.NODE_FAILURE:
            self._failed(node, self._clock() - t0, err)
        else:  # an answer about the name or the request: the node is up and well
            self._answered(node, self._clock() - t0)
            log.debug("upstream.no_answer_here node=%s handle=%s error=%r", node.name, handle, str(err))
        raise err

    def _answered(self, node: _Node, elapsed: float) -> None:
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
