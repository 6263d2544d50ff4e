"""A raw CoAP client for the front-end tests: hand-made datagrams over a loopback UDP socket, and the replies
parsed with :class:`proto.coap.Message` (tests of the fast path, of reports from the socket)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from proto.coap.message import Message
from tests.support.gwhelpers import PUMP

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST = 1, 2
OPT_ETAG, OPT_OBSERVE, OPT_URI_PATH, OPT_CF, OPT_MAX_AGE, OPT_URI_QUERY, OPT_ACCEPT = 4, 6, 11, 12, 14, 15, 17
OPT_URI_HOST, OPT_BLOCK2 = 3, 23


def path_opts(ident: str = PUMP, prefix: str = "r") -> list[tuple[int, bytes]]:
    head, _, rest = ident.partition("/")
    return [(OPT_URI_PATH, s.encode()) for s in (prefix, head, *rest.split("/"))]


def request(
    mid: int,
    token: bytes,
    ident: str = PUMP,
    *,
    mtype: int = CON,
    code: int = GET,
    extra: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"",
) -> bytes:
    opts = sorted(path_opts(ident) + (extra or []), key=lambda o: o[0])
    return Message(mtype, code, mid, token, tuple(opts), payload).encode()


@dataclass
class Reply:
    raw: bytes
    mtype: int
    code: int
    mid: int
    token: bytes
    options: dict[int, list[bytes]]
    payload: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Reply:
        m = Message.decode(raw)
        grouped: dict[int, list[bytes]] = {}
        for n, v in m.options:
            grouped.setdefault(n, []).append(v)
        return cls(raw, m.mtype, m.code, m.mid, m.token, grouped, m.payload)

    def opt(self, n: int) -> bytes | None:
        vals = self.options.get(n)
        return vals[0] if vals else None

    @property
    def max_age(self) -> int | None:
        v = self.opt(OPT_MAX_AGE)
        return None if v is None else int.from_bytes(v, "big")


class RawClient:
    """A UDP socket on loopback sending hand-made datagrams."""

    def __init__(self, port: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, data, self.addr)

    async def recv(self, timeout: float = 3.0) -> Reply:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65535), timeout)
        return Reply.parse(data)

    async def ask(self, data: bytes, timeout: float = 3.0) -> Reply:
        await self.send(data)
        return await self.recv(timeout)

    async def nothing(self, timeout: float = 0.3) -> bool:
        try:
            await self.recv(timeout)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()
