"""Upstream URLs: which client speaks to which node.

``hdl://host[:2641]`` (native Handle protocol, UDP first with TCP fallback; ``hdl+udp://`` too),
``hdl+tcp://host[:2641]`` (native over TCP only), ``http(s)://host[:port][/base]`` (Handle REST API).
:func:`make_client` makes the resolution client of a URL, :func:`make_admin_client` its administration client.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.upstream.base import Upstream
from proto.handle.numbers import DEFAULT_PORT
from proto.records import parse_value_ref

if TYPE_CHECKING:
    from gateway.upstream.admin import AdminClient
    from gateway.upstream.admin_rest import RestAdminClient
    from proto.handle.keys import PrivateKey

__all__ = ["HANDLE_PORT", "UpstreamSpec", "make_admin_client", "make_client", "parse_upstream_url"]

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


def make_admin_client(
    url: str,
    auth: str,
    *,
    key: PrivateKey | None = None,
    secret: bytes | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> AdminClient | RestAdminClient:
    """The administration client for the node at ``url`` as the admin ``auth`` (``INDEX:HANDLE``): native
    (needs ``key``) or REST (``secret`` for basic authentication, else ``key`` for a client certificate).
    ValueError (naming the problem) for a bad URL or admin, or a missing credential."""
    spec = parse_upstream_url(url)
    handle, index = parse_value_ref(auth)
    if spec.kind == "native":
        from gateway.upstream.admin import AdminAuth, AdminClient

        if key is None:
            raise ValueError("a hdl:// upstream needs the admin's private key (--key FILE)")
        return AdminClient(spec.host, spec.port, AdminAuth(handle, index, key), timeout=timeout)
    from gateway.upstream.admin_rest import RestAdminClient

    return RestAdminClient(
        spec.base, handle, index, key=None if secret else key, secret=secret, timeout=timeout, tls=tls
    )
