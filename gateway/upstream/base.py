"""The interface between the upstream pool and one client of one recursive node, and what an outcome means.

A client resolves a handle and either returns a :class:`Result` carrying ``(code, handle, values)`` with
``code`` RC_SUCCESS (1), RC_HANDLE_NOT_FOUND (100) or RC_VALUES_NOT_FOUND (200) -- "not found" is an *answer*
-- or raises one of the :mod:`gateway.errors` types (UpstreamTimeout, UpstreamBusy, UpstreamRefused,
UpstreamReferral, ProtocolError, or plain UpstreamError for a connection that could not be made).
:class:`gateway.upstream.native.HandleClient` and :class:`gateway.upstream.rest.RestClient` both fit.

:func:`outcome_of` sorts what a client raised into an :class:`Outcome`: only a :attr:`Outcome.NODE_FAILURE`
(no answer, a transport error, an answer that does not parse, a server-side failure: busy, RC_ERROR ...)
says anything about the node's health. A node that answers "not responsible" (301) or refers elsewhere
(302/303) has answered about the *name*; one that refuses the request (authentication needed, invalid handle,
...) has answered about the *request*. Both are healthy.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.errors import UpstreamBusy, UpstreamError, UpstreamReferral, UpstreamRefused
from proto.handle.numbers import (
    RC_HANDLE_NOT_FOUND,
    RC_SERVER_BUSY,
    RC_SERVER_NOT_RESP,
    RC_SUCCESS,
    RC_VALUES_NOT_FOUND,
    ResponseCode,
)
from proto.records import HandleValue, Record

__all__ = [
    "ANSWER_CODES",
    "NAME_CODES",
    "REQUEST_REFUSAL_CODES",
    "Outcome",
    "Result",
    "Upstream",
    "UpstreamResult",
    "error_for_code",
    "outcome_of",
]

ANSWER_CODES = (int(RC_SUCCESS), int(RC_HANDLE_NOT_FOUND), int(RC_VALUES_NOT_FOUND))

# "This name is not served here": not responsible, service referral, prefix referral.
NAME_CODES = frozenset(
    {int(RC_SERVER_NOT_RESP), int(ResponseCode.SERVICE_REFERRAL), int(ResponseCode.PREFIX_REFERRAL)}
)

# The node refused this request, not every request: about the name or the asker, not the node's health.
# Every other code (RC_ERROR, busy, protocol error, backup, session failures, the non-final 9xx, codes no
# version defines) is a server-side failure.
REQUEST_REFUSAL_CODES = frozenset(
    int(c)
    for c in (
        ResponseCode.OPERATION_DENIED,
        ResponseCode.RECUR_LIMIT_EXCEEDED,
        ResponseCode.HANDLE_ALREADY_EXIST,
        ResponseCode.INVALID_HANDLE,
        ResponseCode.VALUE_ALREADY_EXIST,
        ResponseCode.VALUE_INVALID,
        ResponseCode.EXPIRED_SITE_INFO,
        ResponseCode.NOT_AUTHORIZED,
        ResponseCode.ACCESS_DENIED,
        ResponseCode.AUTHEN_NEEDED,
        ResponseCode.AUTHEN_FAILED,
        ResponseCode.INVALID_CREDENTIAL,
        ResponseCode.AUTHEN_TIMEOUT,
        ResponseCode.UNABLE_TO_AUTHEN,
    )
)


class Outcome(enum.Enum):
    """What one request to one node came to (the pool counts only NODE_FAILURE against the node)."""

    ANSWER = "answer"  # 1 / 100 / 200: a record or a negative answer
    NOT_SERVED = "not-served"  # 301 / 302 / 303: the name is not served at this node
    REFUSED = "refused"  # the node refused this request (see REQUEST_REFUSAL_CODES)
    NODE_FAILURE = "node-failure"  # no answer, transport error, unparsable answer, server-side failure


def error_for_code(code: int, detail: str, node: str | None, referral: bytes = b"") -> UpstreamError:
    """The error for a node's response code that is not an answer (neither 1 nor 100 / 200), as both clients
    raise it: RC_SERVER_BUSY -> UpstreamBusy; 302/303 -> UpstreamReferral (with the referral body); any
    other code -> UpstreamRefused(code)."""
    if code == RC_SERVER_BUSY:
        return UpstreamBusy(detail, node)
    if ResponseCode.is_referral(code):
        return UpstreamReferral(detail, node, code=code, referral=referral)
    return UpstreamRefused(detail, node, code=code)


def outcome_of(error: BaseException) -> Outcome:
    """The :class:`Outcome` of a request that raised ``error`` (a client's error or a bug in it)."""
    if isinstance(error, UpstreamReferral | UpstreamRefused):
        if error.code in NAME_CODES:
            return Outcome.NOT_SERVED
        if error.code in REQUEST_REFUSAL_CODES:
            return Outcome.REFUSED
    return Outcome.NODE_FAILURE


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
    """A plain :class:`UpstreamResult`: what the native and REST clients (and test fakes) return.

    ``code`` is RC_SUCCESS with the values, or RC_HANDLE_NOT_FOUND / RC_VALUES_NOT_FOUND with none;
    ``handle`` is the handle as it was asked for."""

    code: int
    handle: str
    values: tuple[HandleValue, ...] = ()

    @property
    def found(self) -> bool:
        return self.code == RC_SUCCESS

    def record(self) -> Record:
        return Record(self.handle, self.values)
