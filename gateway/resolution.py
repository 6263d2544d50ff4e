"""What the resolver hands to the front ends: one answer, where it came from and how long it stays fresh.

The resolver (``gateway/resolver.py``) implements :class:`Resolving`; the CoAP, MQTT and HTTP front ends and
``ida resolve`` only see this module, so they never depend on how the cache or the upstream pool work. Two more
narrow interfaces meet here:

* :class:`AnswerCache` -- what a fast path that answers from pre-encoded bytes may ask of the resolver's cache
  (is the entry behind my bytes still the current answer?). ``Resolver.answer_cache()`` gives one; the service
  hands it to the front ends.
* :data:`ResolutionNote` -- a hook called once per resolution (the status page's list of recent resolutions).
  Front ends call it through :func:`resolve_noted`; nothing wraps the resolver.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.errors import NameNotServed, UpstreamError, UpstreamTimeout
from proto import devicemsg
from proto.identifier import IdentifierError
from proto.records import Record


@dataclass(frozen=True, slots=True)
class Answer:
    """A resolution result. ``code`` is devicemsg.OK, devicemsg.NOT_FOUND or devicemsg.VALUES_NOT_FOUND (errors are raised).

    ``expires_at`` is wall-clock time (time.time()) when the answer stops being fresh; ``source`` is one of
    devicemsg.SOURCE_ZONE / SOURCE_CACHE / SOURCE_UPSTREAM / SOURCE_STALE.
    """

    code: int
    handle: str
    record: Record | None
    source: int
    expires_at: float
    etag: bytes = field(default=b"")

    def max_age(self, now: float) -> int:
        """Seconds left (the CoAP Max-Age / MQTT ttl), never negative."""
        return max(0, int(self.expires_at - now))


def etag_of(record: Record | None, code: int) -> bytes:
    """8-byte entity tag over the device form of an answer: equal content gives an equal tag."""
    h = hashlib.blake2b(digest_size=8)
    h.update(code.to_bytes(2, "big"))
    if record is not None:
        h.update(record.handle.encode())
        for v in record.values:
            h.update(v.index.to_bytes(4, "big") + v.type.encode() + b"\0" + v.data + b"\0")
    return h.digest()


class Resolving(Protocol):
    """The resolver as front ends see it.

    Raises proto.identifier.IdentifierError for a malformed identifier (-> 400), and
    gateway.errors.UpstreamError subclasses when no node answered and nothing stale is kept
    (AllUpstreamsFailed -> 503, UpstreamTimeout -> 504).
    """

    async def resolve(
        self, handle: str, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()
    ) -> Answer: ...


SOURCE_NAMES = {
    devicemsg.SOURCE_ZONE: "zone",
    devicemsg.SOURCE_CACHE: "cache",
    devicemsg.SOURCE_UPSTREAM: "upstream",
    devicemsg.SOURCE_STALE: "stale",
}


SOURCE_ERROR = "error"  # the source a failed resolution is noted with

ResolutionNote = Callable[[str, str, str, int, float], object]
"""``note(identifier, frontend, source, code, ms)``: one resolution as the status page lists it (``source`` is
a :data:`SOURCE_NAMES` value or :data:`SOURCE_ERROR`, ``code`` the wire code the front end answered)."""


def error_code(exc: BaseException) -> int:
    """The wire code a front end answers for a resolution that raised ``exc``."""
    if isinstance(exc, IdentifierError | devicemsg.WireError | ValueError):
        return devicemsg.BAD_REQUEST
    if isinstance(exc, NameNotServed):
        return devicemsg.NOT_FOUND
    if isinstance(exc, UpstreamTimeout):
        return devicemsg.UPSTREAM_TIMEOUT
    if isinstance(exc, UpstreamError):
        return devicemsg.UPSTREAM_UNAVAILABLE
    return devicemsg.INTERNAL


async def resolve_noted(
    resolver: Resolving,
    note: ResolutionNote | None,
    frontend: str,
    handle: str,
    types: tuple[str, ...] = (),
    indexes: tuple[int, ...] = (),
) -> Answer:
    """``resolver.resolve(...)``, and ``note`` told about it on the next loop turn (after the front end has sent
    its answer), failures included."""
    if note is None:
        return await resolver.resolve(handle, types, indexes)
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        answer = await resolver.resolve(handle, types, indexes)
    except Exception as e:
        loop.call_soon(note, str(handle), frontend, SOURCE_ERROR, error_code(e), _ms_since(t0))
        raise
    source = SOURCE_NAMES.get(answer.source, str(answer.source))
    loop.call_soon(note, answer.handle, frontend, source, answer.code, _ms_since(t0))
    return answer


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class CachedAnswer(Protocol):
    """The cache entry behind an answer (its identity is what a fast path checks)."""

    @property
    def expires_at(self) -> float: ...

    @property
    def stored_at(self) -> float: ...

    @property
    def prefetched(self) -> bool: ...


class AnswerCache(Protocol):
    """What a front end that pre-encodes answers may ask of the resolver's cache (``gateway/frontends/hotpath.py``).

    ``prefetch_fraction`` is the share of an entry's lifetime at whose end the resolver refreshes it in the
    background (0 when it does not prefetch). ``current`` is the entry the cache holds for a request (fresh or
    not), ``is_current`` whether ``entry`` is still the answer at ``now`` (the cache still holds that very entry,
    it has not expired, and the local zone -- which answers before the cache -- does not have the handle).
    ``count_hits`` adds answers given from pre-encoded bytes to the cache's hit counter."""

    @property
    def prefetch_fraction(self) -> float: ...

    def current(
        self, handle: str, types: tuple[str, ...], indexes: tuple[int, ...]
    ) -> CachedAnswer | None: ...

    def is_current(self, entry: CachedAnswer, now: float) -> bool: ...

    def count_hits(self, n: int) -> None: ...
