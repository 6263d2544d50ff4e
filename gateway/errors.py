"""Typed errors of the gateway, by who is at fault. CLI and front ends map them to exit codes and CoAP/HTTP codes."""

from __future__ import annotations


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
    """The node answered with an error code (RC_ERROR, not responsible, auth needed, ...)."""

    def __init__(self, message: str, node: str | None = None, code: int = 2) -> None:
        super().__init__(message, node)
        self.code = code


class UpstreamReferral(UpstreamError):
    """The node referred us elsewhere (RC_SERVICE_REFERRAL 302 / RC_PREFIX_REFERRAL 303)."""

    def __init__(self, message: str, node: str | None = None, code: int = 302, referral: bytes = b"") -> None:
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


class StorageError(GatewayError):
    """The gateway's SQLite could not be written (disk full, I/O error, file size limit): nothing was stored;
    the front ends answer 5.00 / 500 with this message (the device keeps the report and sends it again)."""


class Overloaded(GatewayError):
    """More reports wait for their commit than the registry commits in a bounded time: this one was refused at
    once and nothing of it was stored. Front ends answer CoAP 5.03 with ``Max-Age = retry_after`` (MQTT: no
    acknowledgement); the device keeps the report and sends it again later."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
