"""`NodeServer`: a local recursive Handle node, in-process (tests, benchmarks, demo) or behind `ida node`.

It serves a :class:`RecordStore` over the Handle native protocol -- UDP **and** TCP on one port, as
HANDLE.NET does (:mod:`tools.harness.node.listener`) -- and over the Handle REST API (aiohttp,
:mod:`tools.harness.node.rest`), with the fault knobs of :mod:`tools.harness.node.faults`. It is administered
as a HANDLE.NET primary is (:attr:`NodeServer.admin`: sessions, challenges, ``HS_ADMIN`` permissions); with
``store_file`` its records are read from that file when it exists and written to it after every change. Use::

    async with NodeServer(handle="127.0.0.1:0", http="127.0.0.1:0") as node:
        client = HandleClient(*node.handle_address)
        node.knobs.busy_rate = 1.0          # from now on every request is answered "busy"
        node.remove_record("88.123.99/PUMP-0001")

Counters are in :attr:`NodeServer.stats` (:class:`tools.harness.node.stats.NodeStats`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.logfmt import kv
from proto.handle.numbers import DEFAULT_PORT
from proto.records import Record
from tools.harness.node.address import Address, NodeError, format_hostport, parse_hostport, resolve_host
from tools.harness.node.admin import AdminSide
from tools.harness.node.adminops import AdminOps
from tools.harness.node.faults import DropConnection, Fault, Knobs
from tools.harness.node.listener import NativeListener
from tools.harness.node.rest import make_app
from tools.harness.node.stats import NodeStats
from tools.harness.node.store import RecordStore, load_records, sample_records

__all__ = ["NodeServer", "NodeStats", "NodeError", "parse_hostport", "format_hostport", "DEFAULT_HTTP_PORT"]

log = logging.getLogger("tools.harness.node")

DEFAULT_HTTP_PORT = 8000  # HANDLE.NET's default HTTP interface port
HTTP_SHUTDOWN_TIMEOUT = 0.5  # seconds stop() lets REST requests in flight finish


class NodeServer:
    """A simulated recursive node. ``records`` defaults to the built-in sample set; ``handle`` / ``http``
    are ``"HOST:PORT"`` or ``(host, port)`` bind addresses (port 0 = any free port; None = that side off).
    ``prefixes`` are hosted in addition to those of the records. ``seed`` makes the fault dice repeatable.
    ``log_requests`` logs one line per request (logger ``tools.harness.node``, INFO). ``store_file``: the
    records are loaded from it when it exists (instead of ``records``) and saved to it after every change an
    administrator makes.
    """

    def __init__(
        self,
        records: Iterable[Record | dict[str, Any]] | None = None,
        *,
        handle: str | Address | None = "127.0.0.1:0",
        http: str | Address | None = "127.0.0.1:0",
        knobs: Knobs | None = None,
        prefixes: Iterable[str] = (),
        seed: int | None = None,
        log_requests: bool = False,
        store_file: str | Path | None = None,
    ) -> None:
        self.store_file = Path(store_file) if store_file is not None else None
        if self.store_file is not None and self.store_file.exists():
            records = load_records(self.store_file)
        self.store = RecordStore(sample_records() if records is None else records, prefixes)
        self.admin = AdminSide(AdminOps(self.store, on_change=self.save))
        self.knobs = knobs if knobs is not None else Knobs()
        self.knobs.check()
        self.stats = NodeStats()
        self.log_requests = log_requests
        self._handle_bind = parse_hostport(handle, DEFAULT_PORT) if isinstance(handle, str) else handle
        self._http_bind = parse_hostport(http, DEFAULT_HTTP_PORT) if isinstance(http, str) else http
        self._rng = random.Random(seed)
        self._native = NativeListener(self)
        self._runner: web.AppRunner | None = None
        self.handle_address: Address | None = None
        self.http_address: Address | None = None
        self._started = False
        self._stopping = False

    # -- records -------------------------------------------------------------------------------------
    def add_record(self, record: Record | dict[str, Any]) -> Record:
        """Add or replace a record (Record or Handle REST JSON); served from the next request on."""
        return self.store.add(record)

    def remove_record(self, handle: str) -> bool:
        """Remove a record; the handle is then "not found" (100). False if it was not there."""
        return self.store.remove(handle)

    def get_record(self, handle: str) -> Record | None:
        return self.store.get(handle)

    def save(self) -> None:
        """Write the records to ``store_file`` (nothing without one)."""
        if self.store_file is not None:
            self.store.save(self.store_file)

    # -- silence -------------------------------------------------------------------------------------
    @property
    def silent(self) -> bool:
        return self.knobs.silent

    def set_silent(self, on: bool) -> None:
        """Drop every request from now on (``True``) or answer again (``False``)."""
        if on != self.knobs.silent:
            log.info("node.silent %s", kv(on=on))
        self.knobs.silent = on

    def toggle_silent(self) -> bool:
        """Flip silence (SIGUSR1 in the CLI); returns the new state."""
        self.set_silent(not self.knobs.silent)
        return self.knobs.silent

    # -- addresses -----------------------------------------------------------------------------------
    @property
    def handle_url(self) -> str:
        """``hdl://host:port`` of the native side (after :meth:`start`)."""
        if self.handle_address is None:
            raise RuntimeError("the native side is not listening")
        return f"hdl://{format_hostport(self.handle_address)}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the REST side (after :meth:`start`)."""
        if self.http_address is None:
            raise RuntimeError("the REST side is not listening")
        return f"http://{format_hostport(self.http_address)}"

    def listening_lines(self) -> list[str]:
        """What ``ida node`` prints on start, one line per listener."""
        out = []
        if self.handle_address is not None:
            out.append(f"handle udp+tcp listening on {format_hostport(self.handle_address)}")
        if self.http_address is not None:
            out.append(f"http listening on {format_hostport(self.http_address)}")
        return out

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            raise RuntimeError("node already started")
        self._started = True
        try:
            if self._handle_bind is not None:
                self.handle_address = await self._native.start(*self._handle_bind)
            if self._http_bind is not None:
                await self._start_http(*self._http_bind)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "node.started %s",
            kv(
                handle=format_hostport(self.handle_address) if self.handle_address else None,
                http=format_hostport(self.http_address) if self.http_address else None,
                records=len(self.store),
            ),
        )

    async def stop(self) -> None:
        """Close every listener and connection; requests in flight are dropped."""
        self._stopping = True
        await self._native.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> NodeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start_http(self, host: str, port: int) -> None:
        host = await resolve_host(host, port)
        runner = web.AppRunner(
            make_app(self),
            access_log=None,  # log_request() logs each request
            shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise NodeError(
                f"cannot listen on {format_hostport((host, port))} (http): {e.strerror or e}"
            ) from None
        sockname = runner.addresses[0]
        self.http_address = (host, int(sockname[1]))

    # -- decisions shared by the protocols -------------------------------------------------------------
    def decide(self) -> tuple[Fault, float]:
        """The fault for one request and the delay before answering it (from :attr:`knobs`)."""
        return self.knobs.fault(self._rng), self.knobs.delay(self._rng)

    def log_request(
        self,
        proto: str,
        peer: Any,
        rid: int | None,
        handle: str,
        outcome: str,
        values: int,
        fault: Fault,
        t0: float,
    ) -> None:
        """One ``node.request`` line (when ``log_requests``); ``t0`` is ``time.perf_counter()`` at arrival."""
        if not self.log_requests:
            return
        host_port = format_hostport((str(peer[0]), int(peer[1]))) if isinstance(peer, tuple) else str(peer)
        log.info(
            "node.request %s",
            kv(
                proto=proto,
                peer=host_port,
                id=f"{rid:08x}" if rid is not None else None,
                handle=handle or None,
                answer=outcome,
                values=values,
                fault=fault.value,
                ms=f"{(time.perf_counter() - t0) * 1000:.2f}",
            ),
        )

    # -- REST (called by tools.harness.node.rest) --------------------------------------------------------------
    async def http_gate(self) -> Fault:
        """Apply silence, latency and the dice to one REST request. Returns the fault to answer with
        (NONE, ERROR, BUSY); silence and DROP raise :class:`DropConnection`."""
        self.stats.requests["http"] += 1
        await self._hold_while_silent()
        fault, delay = self.decide()
        if delay > 0:
            await asyncio.sleep(delay)
        await self._hold_while_silent()
        if fault is Fault.DROP:
            self.stats.dropped["failure"] += 1
            raise DropConnection("failure")
        return fault

    async def _hold_while_silent(self) -> None:
        if not self.knobs.silent:
            return
        self.stats.dropped["silent"] += 1
        while self.knobs.silent and not self._stopping:
            await asyncio.sleep(0.05)
        raise DropConnection()
