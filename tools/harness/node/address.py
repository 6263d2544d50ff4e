"""Where a simulated node listens: ``HOST:PORT`` parsing and printing, and the error for a node that cannot."""

from __future__ import annotations

import asyncio
import socket

__all__ = ["Address", "NodeError", "format_hostport", "parse_hostport", "resolve_host"]

Address = tuple[str, int]


class NodeError(RuntimeError):
    """The node cannot start (an address in use, a host that does not resolve)."""


def parse_hostport(text: str, default_port: int, default_host: str = "127.0.0.1") -> Address:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (port 0 = any free port); ValueError otherwise."""
    s = text.strip()
    if not s:
        raise ValueError("empty address (expected HOST:PORT)")
    host, port_text = default_host, ""
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or (end + 1 < len(s) and s[end + 1] != ":"):
            raise ValueError(f"address {text!r}: expected [IPv6]:PORT")
        host, port_text = s[1:end], s[end + 2 :]
    elif s.count(":") == 1:
        h, port_text = s.split(":")
        host = h or default_host
    elif ":" in s:
        raise ValueError(f"address {text!r}: put an IPv6 address in brackets, e.g. [::1]:{default_port}")
    elif s.isdigit():
        port_text = s
    else:
        host = s
    if not host:
        raise ValueError(f"address {text!r}: empty host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {text!r}: port must be a number 0-65535")
    return host, int(port_text)


def format_hostport(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_host(host: str, port: int) -> str:
    """The first address ``host`` resolves to (for a TCP socket); NodeError when it does not resolve."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise NodeError(f"cannot resolve {host!r}: {e}") from None
    return str(infos[0][4][0])
