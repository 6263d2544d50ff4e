"""Upstream URLs: which client speaks to which node.

``hdl://host[:2641]`` (native Handle protocol, UDP first with TCP fallback; ``hdl+udp://`` too),
``hdl+tcp://host[:2641]`` (native over TCP only), ``http(s)://host[:port][/base]`` (Handle REST API).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.upstream.base import Upstream
from proto.handle.numbers import DEFAULT_PORT

__all__ = ["HANDLE_PORT", "UpstreamSpec", "make_client", "parse_upstream_url"]

HANDLE_PORT = int(DEFAULT_PORT)
_SCHEMES = {
    "hdl": ("native", "udp"),
    "hdl+udp": ("native", "udp"),
    "hdl+tcp": ("native", "tcp"),
    "http": ("rest", ""),
    "https": ("rest", ""),
}


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
