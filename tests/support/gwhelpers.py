"""Test helpers for the gateway service tests: a controllable resolver, a clock, a Handle REST upstream node,
libcoap's command-line client, a gateway config on loopback."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import config as gwconfig
from gateway.resolution import Answer, etag_of
from proto import devicemsg, identifier
from proto.records import HandleValue, Record, rest_error
from tests.support.webapp import LoopbackApp

if TYPE_CHECKING:
    from gateway.service import Gateway

PUMP = "88.123.99/PUMP-0001"
BIG = "88.123.99/BIG-0001"
POSITIVE_TTL = 300
NEGATIVE_TTL = 60


def sample_records() -> dict[str, Record]:
    pump = Record(
        PUMP,
        (
            HandleValue(1, "URL", b"https://example.com/pumps/0001", ttl=POSITIVE_TTL, timestamp=1700000000),
            HandleValue(2, "EMAIL", b"service@example.com", ttl=POSITIVE_TTL, timestamp=1700000000),
            HandleValue(3, "SERIAL", b"\x00\x01\xfe\xff", ttl=POSITIVE_TTL, timestamp=1700000000),
        ),
    )
    big = Record(
        BIG,
        tuple(
            HandleValue(
                i, f"PART{i}", f"https://example.com/parts/{i:04d}/datasheet.pdf".encode(), ttl=POSITIVE_TTL
            )
            for i in range(1, 101)
        ),
    )
    return {PUMP: pump, BIG: big}


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeResolver:
    """Implements gateway.resolution.Resolving over a dict of records: lifetimes are POSITIVE_TTL /
    NEGATIVE_TTL from the (fake) clock; ``errors[handle]`` is raised for that handle; ``gates[handle]`` (an
    asyncio.Event) holds the answer until set. Records every call in ``calls``."""

    def __init__(self, records: dict[str, Record] | None = None, clock: Clock | None = None) -> None:
        self.records = sample_records() if records is None else records
        self.clock = clock or Clock()
        self.errors: dict[str, Exception] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.calls: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []

    async def resolve(
        self, handle: str, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()
    ) -> Answer:
        name = identifier.normalise(handle)
        self.calls.append((name, tuple(types), tuple(indexes)))
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        if name in self.errors:
            raise self.errors[name]
        now = self.clock()
        rec = self.records.get(name)
        if rec is None:
            return Answer(
                devicemsg.NOT_FOUND,
                name,
                None,
                devicemsg.SOURCE_UPSTREAM,
                now + NEGATIVE_TTL,
                etag_of(None, devicemsg.NOT_FOUND),
            )
        sel = rec.select(types, indexes)
        if not sel.values:
            return Answer(
                devicemsg.VALUES_NOT_FOUND,
                name,
                None,
                devicemsg.SOURCE_UPSTREAM,
                now + NEGATIVE_TTL,
                etag_of(None, devicemsg.VALUES_NOT_FOUND),
            )
        return Answer(
            devicemsg.OK, name, sel, devicemsg.SOURCE_UPSTREAM, now + POSITIVE_TTL, etag_of(sel, devicemsg.OK)
        )


class RestNode(LoopbackApp):
    """A Handle REST upstream on loopback (what a HANDLE.NET proxy answers), counting requests per handle."""

    def __init__(self, records: dict[str, Record] | None = None) -> None:
        super().__init__()
        self.records = sample_records() if records is None else records
        self.requests: list[str] = []

    async def _get(self, request: web.Request) -> web.Response:
        handle = request.match_info["handle"]
        self.requests.append(handle)
        rec = self.records.get(identifier.normalise(handle))
        if rec is None:
            return web.json_response(rest_error(100, handle), status=404)
        sel = rec.select(
            tuple(request.query.getall("type", [])), tuple(int(i) for i in request.query.getall("index", []))
        )
        body: dict[str, Any] = sel.to_rest()
        return web.json_response(body)

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/handles/{handle:.*}", self._get)


def loopback_config(data_dir: Path, **flags: Any) -> gwconfig.GatewayConfig:
    """The default config (the environment ignored) with CoAP and HTTP on free loopback ports and its data in
    ``data_dir``; ``flags`` are further command-line overrides (``upstream=[...]``, ``mqtt=...``)."""
    return gwconfig.with_overrides(
        gwconfig.load(None, env={}), coap="127.0.0.1:0", http="127.0.0.1:0", data_dir=str(data_dir), **flags
    )


def http_base(gw: Gateway) -> str:
    """The base URL of a started gateway's HTTP front end."""
    assert gw.addresses.http is not None
    return f"http://127.0.0.1:{gw.addresses.http[1]}"


def report_fields(ident: str = PUMP, boot: int = 1, seq: int = 1, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": ident,
        "boot": boot,
        "seq": seq,
        "uptime": 120,
        "heap": 81234,
        "rssi": -61,
        "queue": 0,
        "board": "esp32-devkitc",
        "fw": "0.1.0",
    }
    fields.update(extra)
    return fields


async def eventually(cond: Any, timeout: float = 10.0, step: float = 0.01) -> None:
    """Wait until ``cond()`` is true (AssertionError after ``timeout`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


COAP_CLIENT = shutil.which("coap-client-notls")


async def coap_client(*args: str) -> tuple[int, bytes, bytes]:
    """Run libcoap's ``coap-client-notls`` (skip the test when ``COAP_CLIENT`` is None): (exit code, out, err)."""
    assert COAP_CLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        COAP_CLIENT, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out, err
