"""What the CoAP, MQTT and HTTP front ends share: the registry interface, what a listening front end is given
(:class:`Listener`), failure -> code mapping, query filters, the in-flight request count used for graceful
shutdown, and the representations of a resolution."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from types import TracebackType
from typing import Any, Protocol

from gateway.aio import wait_set
from gateway.errors import NameNotServed, Overloaded, StorageError, UpstreamError, UpstreamTimeout
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.resolution import Answer, ResolutionNote, Resolving
from proto import devicemsg
from proto.identifier import IdentifierError

log = logging.getLogger(__name__)

# docs/protocol.md "Codes": wire code -> HTTP status.
# fmt: off
HTTP_STATUS = {
    devicemsg.OK: 200, devicemsg.NOT_FOUND: 404, devicemsg.VALUES_NOT_FOUND: 200, devicemsg.NOT_MODIFIED: 304,
    devicemsg.BAD_REQUEST: 400, devicemsg.FORBIDDEN: 403, devicemsg.TOO_LARGE: 413, devicemsg.RATE_LIMITED: 429,
    devicemsg.INTERNAL: 500, devicemsg.UPSTREAM_UNAVAILABLE: 503, devicemsg.UPSTREAM_TIMEOUT: 504,
}
# fmt: on


class DeviceRegistry(Protocol):
    """The part of gateway.registry.Registry the front ends use (R's SQLite registry implements it)."""

    def submit_report(
        self, ident: str, report: devicemsg.Report, transport: str, peer: str | None = None
    ) -> asyncio.Future[bool]: ...

    def submit_report_then(
        self,
        ident: str,
        report: devicemsg.Report,
        transport: str,
        peer: str | None,
        done: Callable[[bool | BaseException], None],
    ) -> None: ...

    def desired_cfgver(self, identifier: str) -> int | None: ...

    def set_desired_config(
        self, identifier: str, interval: int | None = None, meta: dict[str, str] | None = None
    ) -> dict[str, Any]: ...

    def desired_config(self, identifier: str) -> dict[str, Any] | None: ...

    def record_config_ack(self, identifier: str, cfgver: int, code: int, msg: str | None = None) -> None: ...

    def on_config_change(self, callback: Callable[[str, dict[str, Any]], None]) -> None: ...

    def devices(self) -> list[dict[str, Any]]: ...

    def device(self, identifier: str) -> dict[str, Any] | None: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass(eq=False, repr=False)
class Listener:
    """What a front end that listens on an address (CoAP, HTTP) is given: ``host`` and ``port`` to bind (port 0 =
    any free port), the resolver it answers from, the device registry, the metrics it counts in; by keyword its
    clock, the rate limiter (the service sets it after start) and ``note``, the status page's hook for recent
    resolutions. A front end adds its own settings as keyword fields and builds its state in ``__post_init__``;
    ``start()`` binds and returns the bound (host, port)."""

    host: str
    port: int
    resolver: Resolving
    registry: DeviceRegistry
    metrics: Metrics
    _: KW_ONLY
    clock: Callable[[], float] = time.time
    limiter: RateLimiter | None = None
    note: ResolutionNote | None = None


def failure(exc: BaseException) -> tuple[int, str]:
    """The wire code and a message for an exception raised while answering a request.

    IdentifierError / WireError / ValueError -> 400, NameNotServed (every node said it does not serve the
    prefix: 301/302/303) -> 404, UpstreamTimeout -> 504, any other UpstreamError
    (AllUpstreamsFailed) -> 503, StorageError (disk full) -> 500 with its message, anything else -> 500 (logged
    with its traceback: that is a bug).
    """
    if isinstance(exc, IdentifierError):
        return devicemsg.BAD_REQUEST, f"bad identifier: {exc}"
    if isinstance(exc, devicemsg.WireError | FilterError):
        return devicemsg.BAD_REQUEST, str(exc)
    if isinstance(exc, NameNotServed):  # an answer about the name, not an outage: retrying will not help
        return devicemsg.NOT_FOUND, f"no configured node serves prefix {exc.prefix} (code {exc.code})"
    if isinstance(exc, UpstreamTimeout):
        return devicemsg.UPSTREAM_TIMEOUT, str(exc) or "upstream timeout"
    if isinstance(exc, UpstreamError):
        return devicemsg.UPSTREAM_UNAVAILABLE, str(exc) or "no upstream answered"
    if isinstance(exc, Overloaded):  # the registry's queue is full: nothing stored, come back later
        return devicemsg.UPSTREAM_UNAVAILABLE, str(exc)
    if isinstance(exc, StorageError):  # logged where it happened (registry), without a traceback
        return devicemsg.INTERNAL, str(exc)
    log.error("internal error answering a request", exc_info=exc)
    return devicemsg.INTERNAL, "internal error"


def json_etag(etag: bytes) -> bytes:
    """The ETag of the JSON representation (CoAP CF 50, HTTP) of an answer whose device-form tag is ``etag``:
    a different representation needs a different tag."""
    return hashlib.blake2b(b"json" + etag, digest_size=8).digest()


def resolution_payload(answer: Answer, as_json: bool, now: float, source: int) -> bytes:
    """The payload of a 2.05 resolution over CoAP (the slow path's and the fast path's): compact JSON in the
    Handle REST shape (CF 50), else the device message (CF 60) with value TTLs as at ``now`` and ``source``."""
    assert answer.record is not None
    if as_json:
        return json.dumps(answer.record.to_rest(), ensure_ascii=False, separators=(",", ":")).encode()
    return devicemsg.encode_resolve_response(
        {
            "code": devicemsg.OK,
            "id": answer.handle,
            "values": answer.record.to_device_values(now),
            "source": source,
        }
    )


class FilterError(ValueError):
    """A ``type=`` / ``index=`` query that is not usable (400)."""


def parse_filters(types: Iterable[str], indexes: Iterable[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Repeatable ``type=`` and ``index=`` query values -> resolver filters (empty values are ignored)."""
    out_types = tuple(t for t in types if t)
    out_indexes = []
    for raw in indexes:
        if not raw:
            continue
        if not raw.isdigit() or int(raw) > 0xFFFFFFFF:
            raise FilterError(f"index must be an unsigned 32-bit integer, got {raw!r}")
        out_indexes.append(int(raw))
    return out_types, tuple(out_indexes)


class InFlight:
    """Counts requests being answered, so that a stopping front end can wait until they are done.

    ``with inflight:`` around each request; ``await inflight.drain(timeout)`` after the listener closed.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    def __enter__(self) -> InFlight:
        self._count += 1
        self._idle.clear()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """True when every request finished within ``timeout`` seconds."""
        return await wait_set(self._idle, timeout)
