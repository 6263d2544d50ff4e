"""What the resolver hands to the front ends: one answer, where it came from and how long it stays fresh.

The resolver (``gateway/resolver.py``) implements :class:`Resolving`; the CoAP, MQTT and HTTP front ends and
``ida resolve`` only see this module, so they never depend on how the cache or the upstream pool work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from proto import devicemsg
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
