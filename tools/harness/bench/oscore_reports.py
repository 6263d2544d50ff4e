"""P6's OSCORE figure: report ingest when every report is protected with OSCORE (RFC 8613), as devices send them
in the gateway's ``[coap] security = "oscore"`` mode.

A protected report cannot take the fast report path (its bytes are encrypted; the OSCORE site wrapper of
``gateway/frontends/coap_security.py`` verifies and decrypts it inside aiocoap, and the answer is protected again),
so this measures that path at saturation:

* each of ``devices`` devices holds an OSCORE security context with the key the gateway's keystore holds;
* one report per device goes through an aiocoap client first (it answers the gateway's Echo challenge, which sets
  up the gateway's replay state for the device, RFC 8613 B.1.2);
* then every device's next reports are protected ahead of time (aiocoap's protect is as dear as the gateway's
  unprotect: done inside the load, the client would be the limit), and a closed loop sends them over
  :class:`proto.coap.Client` -- one report in flight per device, the next after its 2.04, the same one again after
  anything else;
* the gateway's CPU time over the window per acknowledged report.

``measure_oscore_reports`` returns the figures under ``oscore_`` names for P6.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

import aiocoap
from aiocoap import oscore
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code

from gateway.frontends import coap_credentials as cs
from proto import devicemsg
from proto.coap import Client, RequestTemplate
from proto.coap.client import Response
from tools.harness.bench.loadresult import percentile
from tools.harness.bench.procs import BenchError, cpu_seconds
from tools.harness.bench.project import GatewayProcess, NodeProcess
from tools.harness.bench.scenario import BenchOptions

__all__ = ["measure_oscore_reports", "DEVICES"]

DEVICES = 256
KEY = bytes(range(16))
REPORT = {"uptime": 3600, "heap": 41000, "rssi": -60, "queue": 0, "board": "esp32-devkitc", "fw": "bench"}
SECURE_CONFIG = """[coap]
security = "oscore"
plain_resolve = true
[limits]
device_rate = 0
"""
CHANGED = int(Code.CHANGED)


def _ident(n: int) -> str:
    return f"88.123.99/OSC-{n:04d}"


def _context(work: Path, ident: str) -> oscore.FilesystemSecurityContext:
    d = work / f"ctx-{ident.replace('/', '_')}"
    d.mkdir(parents=True)
    settings = {
        "sender-id_hex": cs.kid_of(ident).hex(),
        "recipient-id_hex": cs.GATEWAY_ID.hex(),
        "secret_hex": KEY.hex(),
        "salt_hex": cs.SALT.hex(),
        "algorithm": cs.ALGORITHM,
    }
    (d / "settings.json").write_text(json.dumps(settings))
    return oscore.FilesystemSecurityContext(str(d))


def _report(ident: str, boot: int, seq: int, port: int) -> aiocoap.Message:
    prefix, _, suffix = ident.partition("/")
    body = devicemsg.encode("report", {**REPORT, "id": ident, "boot": boot, "seq": seq})
    msg = aiocoap.Message(
        code=Code.POST, uri=f"coap://127.0.0.1:{port}/d/{prefix}/{suffix}/rpt", payload=body
    )
    msg.opt.content_format = 60
    return msg


def _protected(ctx: oscore.FilesystemSecurityContext, msg: aiocoap.Message) -> RequestTemplate:
    """``msg`` protected with ``ctx`` (its next sequence number), as a template: everything but MID and token."""
    msg.direction = Direction.OUTGOING
    outer, _ = ctx.protect(msg)
    outer.mtype, outer.mid, outer.token = aiocoap.CON, 0, b""
    raw = outer.encode()
    return RequestTemplate(0x40 | 2, raw[1], raw[4:])  # CON, 2-byte tokens


class _Devices(asyncio.DatagramProtocol):
    """The closed loop: each device's protected reports in order, one in flight (module doc)."""

    def __init__(self, queues: list[deque[RequestTemplate]], sock: socket.socket) -> None:
        self.queues = queues
        self.sock = sock
        self.client = Client(token_prefix=b"", mid=1)
        self.counting = False
        self.acked = 0
        self.errors = 0
        self.latencies: list[int] = []
        self.sent: dict[bytes, tuple[int, int]] = {}  # token -> (device, send time ns)

    def send_next(self, dev: int) -> None:
        q = self.queues[dev]
        if q:
            ex = self.client.request(q[0], time.monotonic(), context=dev)
            self.sent[ex.token] = (dev, time.perf_counter_ns())
            self.sock.send(ex.datagram)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        ev = self.client.receive(data, time.monotonic())
        if type(ev) is not Response:
            return
        if ev.reply:
            self.sock.send(ev.reply)
        dev, t0 = self.sent.pop(ev.exchange.token, (cast(int, ev.exchange.context), 0))
        if ev.code == CHANGED:
            self.queues[dev].popleft()
            if self.counting:
                self.acked += 1
                self.latencies.append(time.perf_counter_ns() - t0)
        elif self.counting:
            self.errors += 1
        self.send_next(dev)

    def tick(self) -> None:
        again, gone = self.client.timeouts(time.monotonic())
        for datagram in again:
            self.sock.send(datagram)
        for ex in gone:
            self.errors += self.counting
            self.send_next(cast(int, ex.context))


async def _measure(
    port: int, pid: int, devices: int, per_device: int, warmup: float, window: float
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ida-oscore-"))
    client = await aiocoap.Context.create_client_context()
    contexts = []
    boot = int(time.time())
    try:
        for n in range(devices):  # the first report of each: the Echo exchange, through aiocoap
            ident = _ident(n)
            ctx = _context(work, ident)
            prefix, _, suffix = ident.partition("/")
            client.client_credentials[f"coap://127.0.0.1:{port}/d/{prefix}/{suffix}/*"] = ctx
            resp = await asyncio.wait_for(client.request(_report(ident, boot, 1, port)).response, 20)
            if resp.code != Code.CHANGED:
                raise BenchError(f"OSCORE report of {ident} answered {resp.code}")
            contexts.append(ctx)
    finally:
        await client.shutdown()
    queues = [
        deque(_protected(ctx, _report(_ident(n), boot, seq, port)) for seq in range(2, 2 + per_device))
        for n, ctx in enumerate(contexts)
    ]
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    proto = _Devices(queues, sock)
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
    try:
        for dev in range(devices):
            proto.send_next(dev)
        end = loop.time() + warmup + window
        t_start = loop.time() + warmup
        c0 = w0 = None
        while loop.time() < end:
            await asyncio.sleep(0.05)
            proto.tick()
            if c0 is None and loop.time() >= t_start:
                proto.counting = True
                c0, w0 = cpu_seconds(pid), time.monotonic()
        c1, w1 = cpu_seconds(pid), time.monotonic()
        proto.counting = False
    finally:
        transport.close()
    assert c0 is not None and w0 is not None
    n = proto.acked
    lat = sorted(proto.latencies)
    return {
        "reports_per_s": round(n / (w1 - w0), 1),
        "cpu_us_per_report": round((c1 - c0) / n * 1e6, 1) if n else None,
        "p50_ms": round(percentile(lat, 50), 3) if lat else None,
        "p99_ms": round(percentile(lat, 99), 3) if lat else None,
        "server_cpu": round((c1 - c0) / (w1 - w0), 3),
        "acked": n,
        "errors": proto.errors,
        "ran_dry": sum(1 for q in queues if not q),
    }


def measure_oscore_reports(opts: BenchOptions, devices: int = DEVICES) -> dict[str, Any]:
    """The OSCORE figures (module doc), under ``oscore_`` names for P6."""
    log_dir = opts.logs()
    window, warmup = (1.5, 0.5) if opts.quick else (5.0, 1.0)
    per_device = (
        40 if opts.quick else 120
    )  # enough protected reports for the window at a few thousand per second
    from tools.commands.flash.keystore import Keystore

    name = "p6-oscore-gateway"
    data = log_dir / f"{name}-data"
    data.mkdir(parents=True, exist_ok=True)
    keys = Keystore.in_dir(data)
    for n in range(devices):
        keys.put(_ident(n), KEY)
    cfg = log_dir / f"{name}.toml"
    cfg.write_text(SECURE_CONFIG)
    with (
        NodeProcess(log_dir, name="p6-oscore-node") as node,
        GatewayProcess(log_dir, node.url, name=name, extra=("--config", str(cfg))) as gw,
    ):
        assert gw.child is not None
        r = asyncio.run(_measure(gw.port, gw.child.pid, devices, per_device, warmup, window))
    if not r["acked"]:
        raise BenchError("OSCORE reports: none acknowledged in the window")
    out = {f"oscore_{k}": v for k, v in r.items()}
    out["oscore_devices"] = devices
    return out
