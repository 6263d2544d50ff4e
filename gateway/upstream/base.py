"""The interface between the upstream pool and one client of one recursive node.

A client resolves a handle and either returns a result carrying ``(code, handle, values)`` with ``code``
RC_SUCCESS (1), RC_HANDLE_NOT_FOUND (100) or RC_VALUES_NOT_FOUND (200) -- "not found" is an *answer* --
or raises one of the :mod:`gateway.errors` types (UpstreamTimeout, UpstreamBusy, UpstreamRefused,
UpstreamReferral, ProtocolError, or plain UpstreamError for a connection that could not be made).
:class:`gateway.upstream.native.HandleClient` and :class:`gateway.upstream.rest.RestClient` both fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proto.records import RC_HANDLE_NOT_FOUND, RC_SUCCESS, RC_VALUES_NOT_FOUND, HandleValue

ANSWER_CODES = (RC_SUCCESS, RC_HANDLE_NOT_FOUND, RC_VALUES_NOT_FOUND)


class UpstreamResult(Protocol):
    """What a client returns: an answer of the node (success or not found)."""

    @property
    def code(self) -> int: ...

    @property
    def handle(self) -> str: ...

    @property
    def values(self) -> tuple[HandleValue, ...]: ...


class Upstream(Protocol):
    """One recursive node. ``close`` may be a coroutine function or a plain function."""

    async def resolve(
        self, handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()
    ) -> UpstreamResult: ...

    def close(self) -> object: ...


@dataclass(frozen=True, slots=True)
class Result:
    """A plain :class:`UpstreamResult` (what the REST client and test fakes return)."""

    code: int
    handle: str
    values: tuple[HandleValue, ...] = ()
