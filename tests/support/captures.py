"""The real HANDLE.NET 7.3.1 traffic in tests/vectors/handle-native (see its README): one file per exchange,
``# REQUEST`` then ``# RESPONSE`` sections of hex datagrams."""

from __future__ import annotations

from tests.support.vecload import VECTORS

CAPTURES = VECTORS / "handle-native"
NAMES = ("capture_found.hex", "capture_notfound.hex", "capture_many.hex", "capture_ttl.hex")


def load_capture(name: str) -> tuple[bytes, list[bytes]]:
    """(request datagram, response datagrams) of one capture file: `#` lines are comments, others hex."""
    request: bytes | None = None
    responses: list[bytes] = []
    direction = ""
    for line in (CAPTURES / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            direction = line[1:].split()[0]
            continue
        if not line:
            continue
        data = bytes.fromhex(line)
        if direction == "REQUEST":
            assert request is None, f"{name}: two requests"
            request = data
        else:
            assert direction == "RESPONSE", f"{name}: a datagram outside REQUEST / RESPONSE"
            responses.append(data)
    assert request is not None, f"{name}: no request"
    return request, responses


ADMIN = VECTORS / "handle-admin"


def load_exchange(name: str) -> list[tuple[str, bytes]]:
    """(``REQUEST`` | ``RESPONSE``, message) of every message of a tests/vectors/handle-admin file, in order."""
    out: list[tuple[str, bytes]] = []
    direction = ""
    for line in (ADMIN / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            words = line[1:].split()
            if words and words[0] in ("REQUEST", "RESPONSE"):
                direction = words[0]
            continue
        if line:
            assert direction, f"{name}: a message before any REQUEST / RESPONSE line"
            out.append((direction, bytes.fromhex(line)))
    return out
