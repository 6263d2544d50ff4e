"""What the fast paths (CoAP: ``coap_fast.py``, MQTT: ``mqtt_table.py``) share: keeping a pre-encoded answer equal
to the resolver's.

A fast path answers a repeated request with bytes it encoded once, without asking the resolver. That is only right
while the resolver would give the same answer, so each table entry is a :class:`HotEntry` watched by a
:class:`CacheGuard`:

* an entry is admitted only for an OK answer from the cache or the upstream (zone answers can change at any
  time; stale answers are short-lived stand-ins) and, when the front end has the resolver's
  :class:`gateway.resolution.AnswerCache`, only when the answer is the very entry the cache holds;
* it expires with the resolver's answer (its absolute expiry);
* at most once per second per entry (whenever the fast path re-renders it: TTLs count down in whole seconds) the
  guard checks that the cache still holds that same entry and that the local zone does not have the handle: a
  refreshed, evicted or zone-overridden answer drops the entry within a second;
* prefetch: the first hit in the last ``prefetch_fraction`` of the entry's lifetime is handed to the slow path once
  (:data:`ONCE`), so the resolver starts its background refresh exactly as for a hit of its own.

The status page's list of recent resolutions (a :data:`gateway.resolution.ResolutionNote` hook) sees a fast hit
at most once per entry per second, when the guard checks it. The guard knows the resolver only through these two
interfaces.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

from gateway.resolution import Answer, AnswerCache, CachedAnswer, ResolutionNote
from proto import devicemsg

__all__ = ["HotEntry", "CacheGuard", "SERVE", "DROP", "ONCE"]

DEFAULT_PREFETCH_FRACTION = 0.1  # without an AnswerCache: hand on the first request in the last 10 %
SERVE, DROP, ONCE = 0, 1, 2  # CacheGuard.check: answer from the entry / forget it / hand this one request on


class HotEntry(abc.ABC):
    """The part of a fast-path entry the guard looks after (the fast paths subclass it with their bytes)."""

    __slots__ = ("answer", "expires", "refresh_at", "refreshing", "ref")

    def __init__(self, answer: Answer, refresh_at: float, ref: CachedAnswer | None) -> None:
        self.answer = answer
        self.expires = answer.expires_at
        self.refresh_at = refresh_at
        self.refreshing = math.isinf(refresh_at)  # the prefetch window was handed to the slow path already
        self.ref = ref  # the cache entry this answer is (None: no AnswerCache, trusted up to its expiry)

    @abc.abstractmethod
    def render(self, now: float) -> bool:
        """Encode the entry's bytes for ``now``; False when the answer no longer fits."""

    def hold_until(self, age: int, now: float, dynamic: bool) -> float:
        """Until when bytes rendered at ``now`` with the remaining lifetime ``age`` (= int(expires - now)) hold:
        ``age`` stays the same up to expires - age, the entry is fresh while now < expires, the prefetch window
        opens at refresh_at, and ``dynamic`` (value TTLs that count down) content changes on whole seconds."""
        until = min(self.expires - age, math.nextafter(self.expires, -math.inf))
        if not self.refreshing and self.refresh_at <= until:
            until = math.nextafter(self.refresh_at, -math.inf)
        if dynamic:
            until = min(until, math.nextafter(math.floor(now) + 1.0, -math.inf))
        return until


class CacheGuard:
    """Admits answers into a fast path and tells whether an entry still holds (module doc).

    ``answers`` is the resolver's :class:`gateway.resolution.AnswerCache` (``Resolver.answer_cache()``): with it
    an entry is admitted only for the answer the cache holds and dropped when the cache or the zone moves on;
    without it (a resolver with no cache of its own) an answer is trusted up to its expiry. ``note`` is the
    status page's :data:`gateway.resolution.ResolutionNote` (fast hits are noted as ``frontend`` cache hits, at
    most once a second per entry). ``prefetch_fraction`` overrides the cache's."""

    def __init__(
        self,
        answers: AnswerCache | None,
        *,
        frontend: str,
        note: ResolutionNote | None = None,
        prefetch_fraction: float | None = None,
    ) -> None:
        self.answers = answers
        self.prefetch = answers is None or answers.prefetch_fraction > 0
        if prefetch_fraction is None:
            prefetch_fraction = (
                answers.prefetch_fraction if answers is not None else DEFAULT_PREFETCH_FRACTION
            )
        self.prefetch_fraction = float(prefetch_fraction or 0.0)
        self.note = note
        self.frontend = frontend

    def admit(
        self,
        answer: Answer,
        types: tuple[str, ...],
        indexes: tuple[int, ...],
        now: float,
        old: HotEntry | None = None,
    ) -> tuple[CachedAnswer | None, float] | None:
        """(cache entry, prefetch time) for an answer a fast path may serve from now on, else None.

        ``old`` is the entry the table holds for the same request (if any): when it is the same answer and its
        prefetch window was handed on already, it is not handed on again."""
        if answer.code != devicemsg.OK or answer.record is None:
            return None
        if answer.source not in (devicemsg.SOURCE_CACHE, devicemsg.SOURCE_UPSTREAM):
            return None
        if answer.expires_at <= now:
            return None
        fraction = self.prefetch_fraction if self.prefetch else 0.0
        if self.answers is not None:
            ref = self.answers.current(answer.handle, types, indexes)
            if ref is None or ref.expires_at != answer.expires_at:
                return None  # not what the cache holds (e.g. too big to cache): every request asks again
            life = ref.expires_at - ref.stored_at
            refresh_at = (
                math.inf if ref.prefetched or life <= 0 or fraction <= 0 else ref.expires_at - fraction * life
            )
            return ref, refresh_at
        life = answer.expires_at - now
        refresh_at = answer.expires_at - fraction * life if fraction > 0 else math.inf
        if old is not None and old.expires == answer.expires_at and old.refreshing:
            refresh_at = math.inf  # the prefetch window was handed on already for this answer
        return None, refresh_at

    def check(self, entry: HotEntry, now: float) -> int:
        """SERVE while ``entry`` is the resolver's answer at ``now``; DROP when it is not any more; ONCE for the
        first request in the prefetch window (the slow path answers it and the resolver refreshes)."""
        if now >= entry.expires:
            return DROP
        if entry.ref is not None and self.answers is not None and not self.answers.is_current(entry.ref, now):
            return DROP  # refreshed, evicted or dropped by the cache, or the local zone answers it now
        if not entry.refreshing and now >= entry.refresh_at:
            entry.refreshing = True
            return ONCE
        return SERVE

    def refresh(self, entry: HotEntry, now: float, forget: Callable[[Any], None]) -> bool:
        """Bring ``entry`` up to ``now`` (check, then render); False when the slow path must answer instead
        (``forget(entry)`` called when the entry is of no more use)."""
        verdict = self.check(entry, now)
        if verdict != SERVE:
            if verdict == DROP:
                forget(entry)
            return False  # ONCE: the resolver sees this request and starts its prefetch
        if not entry.render(now):
            forget(entry)
            return False
        self.seen(entry)  # the status page sees the identifier in use, once a second at most
        return True

    def seen(self, entry: HotEntry) -> None:
        """Tell the status page the entry's identifier is in use (call at most once a second per entry)."""
        if self.note is not None:
            self.note(entry.answer.handle, self.frontend, "cache", devicemsg.OK, 0.0)

    def count_hits(self, n: int) -> None:
        """Add fast answers to the resolver cache's hit counter (once per batch, never per request)."""
        if self.answers is not None:
            self.answers.count_hits(n)
