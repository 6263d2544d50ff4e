"""Typed errors of the gateway, by who is at fault. CLI and front ends map them to exit codes and CoAP/HTTP codes."""

from __future__ import annotations

from proto.handle.numbers import RC_ERROR, RC_SERVER_NOT_RESP, RC_SERVICE_REFERRAL


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class UpstreamError(GatewayError):
    """A recursive node could not give an answer (never cached; may fall back to a stale answer)."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class UpstreamTimeout(UpstreamError):
    """No answer within the configured time."""


class UpstreamBusy(UpstreamError):
    """The node answered RC_SERVER_BUSY (3)."""


class UpstreamRefused(UpstreamError):
    """The node answered with an error code (RC_ERROR, not responsible, auth needed, ...).

    Whether that is the node's fault (RC_ERROR) or an answer about the name or the request (301 not
    responsible, 402 authentication needed, ...) is :func:`gateway.upstream.base.outcome_of`'s call."""

    def __init__(self, message: str, node: str | None = None, code: int = int(RC_ERROR)) -> None:
        super().__init__(message, node)
        self.code = code


class UpstreamReferral(UpstreamError):
    """The node referred us elsewhere (RC_SERVICE_REFERRAL 302 / RC_PREFIX_REFERRAL 303)."""

    def __init__(
        self,
        message: str,
        node: str | None = None,
        code: int = int(RC_SERVICE_REFERRAL),
        referral: bytes = b"",
    ) -> None:
        super().__init__(message, node)
        self.code = code
        self.referral = referral


class ProtocolError(UpstreamError):
    """Bytes from a node that do not parse: truncated, oversized, wrong lengths, garbage."""


class AllUpstreamsFailed(UpstreamError):
    """Every configured node failed; carries the last error of each."""

    def __init__(self, errors: dict[str, UpstreamError]) -> None:
        detail = "; ".join(f"{n}: {e}" for n, e in errors.items()) or "no upstream configured"
        super().__init__(f"all upstreams failed ({detail})")
        self.errors = errors


class NameNotServed(AllUpstreamsFailed):
    """Every node asked answered that the name is not served there: 301 (not responsible for it) or a
    referral elsewhere (302 service referral, 303 prefix referral). An answer about the name's prefix -- the
    nodes are healthy -- that the resolver may negative-cache per prefix (:attr:`prefix`).

    ``code`` is 302/303 when some node referred elsewhere (``referral`` = that node's referral body: the
    service handle and its values, :func:`proto.handle.decode_referral`), else 301. An AllUpstreamsFailed
    too: a caller that does not know it answers as for any other resolution no node could answer.
    """

    def __init__(self, handle: str, errors: dict[str, UpstreamError]) -> None:
        super().__init__(errors)
        self.handle = handle
        referrals = [e for e in errors.values() if isinstance(e, UpstreamReferral)]
        first = referrals[0] if referrals else None
        self.code = first.code if first is not None else int(RC_SERVER_NOT_RESP)
        self.referral = first.referral if first is not None else b""

    @property
    def prefix(self) -> str:
        """The prefix of the handle (``88.123.99`` of ``88.123.99/PUMP-0001``)."""
        return self.handle.partition("/")[0]


class StorageError(GatewayError):
    """The gateway's SQLite could not be written (disk full, I/O error, file size limit): nothing was stored;
    the front ends answer 5.00 / 500 with this message (the device keeps the report and sends it again)."""
