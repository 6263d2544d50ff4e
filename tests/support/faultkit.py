"""Real processes for the fault and scale-out tests (tests/integration/test_faults.py, tests/unit/gateway/test_shared_cache.py).

* :class:`RedisServer` -- ``redis-server`` on a free loopback port, no persistence; ``stop()``/``start()`` again
  on the same port (an outage), ``kill()`` (SIGKILL).
* :class:`GatewayProc` -- ``python -m tools.cli gateway --config <toml>`` as a child process, with its log
  captured; ``kill9()``, ``terminate()``, ``start()`` again on the same data dir (and the same CoAP port);
  ``limit_file_size`` sets RLIMIT_FSIZE in the child (the disk-full substitute when tmpfs cannot be mounted).
* :class:`NodeProc` -- ``python -m tools.cli node`` (the simulated recursive node) as a child process.
* :class:`Consumer` -- the northbound side: an HTTP webhook (aiohttp, in the test process) that counts every
  raw delivery and de-duplicates by ``(id, boot, seq)`` (the ``Idempotency-Key``), as a real consumer must.
* :class:`MqttFleet` -- light devices over MQTT (paho, as tests/brokers.Device) that retry like the firmware:
  resolves with a new token after a timeout, reports until their ``report_ack`` arrives.
* ``integrity(path)`` -- ``PRAGMA integrity_check`` of a SQLite file, read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from proto import devicemsg
from tests.support.brokers import Device, free_port
from tests.support.procs import stop_process
from tools.harness.bench.procs import free_port as free_udp_port  # UDP, 127.0.0.1

ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = os.environ.get("IDA_REDIS_SERVER", "/usr/bin/redis-server")
LISTENING = re.compile(r"(coap|http) listening on (\S+):(\d+)")


def redis_binary() -> str | None:
    import shutil

    if Path(REDIS_SERVER).exists():
        return REDIS_SERVER
    return shutil.which("redis-server")


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not accept on {port} within {timeout} s") from None
            time.sleep(0.02)


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of a SQLite file ("ok" when sound)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def sql(path: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


# -- Redis --------------------------------------------------------------------------------------------------
class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = redis_binary()
        assert binary, "redis-server is not installed (make setup installs it)"
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 -- handed to the child
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                *self.extra,
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        _wait_port("127.0.0.1", self.port, self.proc, timeout, "redis-server")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()


def _cluster_port() -> int:
    """A free port p <= 55535 whose cluster bus port p + 10000 is free too (Redis Cluster needs both)."""
    import random

    for _ in range(200):
        p = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterServers:
    """``n`` redis-server nodes joined into a Redis Cluster (masters only, no replicas) with ``redis-cli --cluster
    create``; ``url`` is a ``redis+cluster://`` seed."""

    def __init__(self, workdir: Path, n: int = 3) -> None:
        self.nodes = [
            RedisServer(
                Path(workdir) / f"node{i}",
                port=_cluster_port(),
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ),
            )
            for i in range(n)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # the nodes already running
            raise

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        r = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0 or "All 16384 slots covered" not in r.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in self.nodes[0].cli("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster never reached cluster_state:ok")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# -- gateway and node processes ---------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, doc: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class GatewayProc:
    """One ``ida gateway`` process. ``config`` is the TOML document (dict of sections); the data dir and the
    CoAP port are fixed at construction, so a restart serves the same devices from the same files."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, dict[str, Any]],
        *,
        name: str = "gw",
        coap_port: int | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.data_dir = data_dir or self.workdir / "data"
        self.coap_port = coap_port or free_udp_port()
        cfg = {k: dict(v) for k, v in config.items()}
        cfg.setdefault("coap", {}).update(host="127.0.0.1", port=self.coap_port)
        cfg.setdefault("http", {}).update(host="127.0.0.1", port=0)
        cfg.setdefault("data", {})["dir"] = str(self.data_dir)
        self.config_path = write_toml(self.workdir / f"{name}.toml", cfg)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.lines: list[str] = []
        self.starts = 0
        self.fsize_limit: int | None = None  # RLIMIT_FSIZE soft limit for the next start (bytes)

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("IDA_DATA", "IDA_UPSTREAM")}
        limit = self.fsize_limit

        def preexec() -> None:
            if limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "gateway", "--config", str(self.config_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec if limit is not None else None,
        )
        self.starts += 1
        got: dict[str, int] = {}
        ready = threading.Event()
        proc = self.proc

        def pump() -> None:
            assert proc.stderr is not None
            for raw in iter(proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(f"[{self.name}#{self.starts}] {line}")
                m = LISTENING.search(line)
                if m:
                    got[m.group(1)] = int(m.group(3))
                if "gateway running" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or proc.poll() is not None:
            raise RuntimeError(f"gateway {self.name} did not start:\n" + self.log_tail())
        self.http_port = got["http"]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def set_file_size_limit(self, limit: int | None) -> None:
        """Change RLIMIT_FSIZE of the running gateway (None = unlimited: "space is back")."""
        value = resource.RLIM_INFINITY if limit is None else limit
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (value, resource.RLIM_INFINITY))

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int | None:
        return stop_process(self.proc, timeout)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    @property
    def registry(self) -> Path:
        return self.data_dir / "registry.sqlite3"

    @property
    def cache_db(self) -> Path:
        return self.data_dir / "cache.sqlite3"


class NodeProc:
    """``ida node`` (native Handle protocol, UDP+TCP, no REST) with a records file; ``extra`` = more flags
    (``--latency 20``). ``terminate()`` returns how many requests it answered (its exit summary)."""

    def __init__(
        self,
        workdir: Path,
        records: Path | None = None,
        *,
        port: int | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.records = records
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.out: list[str] = []

    @property
    def url(self) -> str:
        return f"hdl://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        args = [
            sys.executable,
            "-m",
            "tools.cli",
            "node",
            "--handle",
            f"127.0.0.1:{self.port}",
            "--http",
            "off",
            *self.extra,
        ]
        if self.records is not None:
            args += ["--records", str(self.records)]
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if "listening" in line:

                def pump(proc: subprocess.Popen[bytes] = self.proc) -> None:
                    assert proc.stdout is not None
                    for raw in iter(proc.stdout.readline, b""):
                        self.out.append(raw.decode("utf-8", "replace").rstrip("\n"))

                threading.Thread(target=pump, daemon=True).start()
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError("ida node did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def terminate(self) -> int | None:
        """Stop (SIGTERM) and return the number of requests it served (None if it did not say)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.terminate()
        self.proc.wait(10)
        time.sleep(0.1)  # the pump thread reads the last line
        for line in self.out:
            m = re.search(r"node stats: requests (.*?);", line)
            if m:
                return sum(int(p.split("=")[1]) for p in m.group(1).split() if "=" in p)
        return None


# -- the northbound consumer ------------------------------------------------------------------------------
class Consumer:
    """Webhook sink consumer: counts raw deliveries, keeps the de-duplicated set of (id, boot, seq)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = (
            delay  # seconds before answering 200 (widens the crash window between delivery and delete)
        )
        self.raw = 0
        self.keys: Counter[tuple[str, int, int]] = Counter()
        self.by_transport: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = (str(body["id"]), int(body["boot"]), int(body["seq"]))
        assert request.headers.get("Idempotency-Key") == f"{key[0]}|{key[1]}|{key[2]}"
        self.raw += 1
        if key not in self.keys:
            self.by_transport[str(body.get("transport"))] += 1
        self.keys[key] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"ok": True})

    @property
    def unique(self) -> int:
        return len(self.keys)

    @property
    def duplicates(self) -> int:
        return self.raw - len(self.keys)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/reports", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/reports"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# -- light MQTT devices ---------------------------------------------------------------------------------------
@dataclass
class FleetStats:
    resolves_sent: int = 0  # resolve requests published (retries included)
    resolves_answered: int = 0  # distinct resolves that got an answer
    resolve_retries: int = 0
    resolve_codes: Counter[int] = field(default_factory=Counter)
    reports: int = 0  # distinct reports made
    reports_sent: int = 0  # publishes (retries included)
    reports_acked: int = 0
    report_retries: int = 0
    failures: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # longest time a device waited for any answer


class MqttFleet:
    """``n`` devices on the broker at ``url``; each runs ``cycles`` rounds of (one resolve, one report), retrying
    every request until it is answered (resolve: a new token after ``resolve_timeout``; report: the same report
    after ``report_timeout``), as the firmware does. ``boot`` is the boot number of every device's reports."""

    def __init__(
        self,
        url: str,
        idents: list[str],
        handles: list[str],
        *,
        boot: int = 1,
        cycles: int = 10,
        pause: float = 0.05,
        resolve_timeout: float = 1.0,
        report_timeout: float = 1.5,
        give_up: float = 40.0,
    ) -> None:
        self.url = url
        self.idents = idents
        self.handles = handles
        self.boot = boot
        self.cycles = cycles
        self.pause = pause
        self.resolve_timeout = resolve_timeout
        self.report_timeout = report_timeout
        self.give_up = give_up
        self.devices: list[Device] = []
        self.stats = FleetStats()
        self.sent_keys: set[tuple[str, int, int]] = set()
        self.progress = 0  # answered requests, all devices together (the test watches it move)

    async def connect(self) -> None:
        self.devices = [Device(self.url, ident) for ident in self.idents]
        await asyncio.gather(*(d.connect(10) for d in self.devices))

    def close(self) -> None:
        for d in self.devices:
            with contextlib.suppress(Exception):
                d.disconnect()

    async def run(self) -> FleetStats:
        await asyncio.gather(*(self._device(i, d) for i, d in enumerate(self.devices)))
        return self.stats

    async def _await(
        self, q: asyncio.Queue[tuple[bytes, bool]], match: Callable[[dict[int, Any]], bool], timeout: float
    ) -> dict[int, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                payload, _ = await asyncio.wait_for(q.get(), left)
            except TimeoutError:
                return None
            try:
                obj = devicemsg.loads(payload)
            except devicemsg.WireError:
                continue
            if isinstance(obj, dict) and match(obj):
                return obj

    async def _device(self, i: int, dev: Device) -> None:
        st = self.stats
        tok_n = 0
        res_q, ack_q = dev.queue("res"), dev.queue("ack")
        for cycle in range(self.cycles):
            handle = self.handles[(i + cycle) % len(self.handles)]
            t0 = time.monotonic()
            while True:  # resolve until answered
                tok_n += 1
                token = i.to_bytes(2, "big") + tok_n.to_bytes(4, "big")
                dev.resolve(token, handle)
                st.resolves_sent += 1
                ans = await self._await(
                    res_q, lambda o, t=token: o.get(devicemsg.KEYS["token"]) == t, self.resolve_timeout
                )  # type: ignore[misc]
                if ans is not None:
                    st.resolves_answered += 1
                    st.resolve_codes[int(ans.get(devicemsg.KEYS["code"], 0))] += 1
                    self.progress += 1
                    break
                st.resolve_retries += 1
                if time.monotonic() - t0 > self.give_up:
                    st.failures.append(f"{dev.identifier} resolve {handle} never answered")
                    break
            gap = time.monotonic() - t0
            seq = cycle + 1
            self.sent_keys.add((dev.identifier, self.boot, seq))
            st.reports += 1
            t1 = time.monotonic()
            while True:  # report until acknowledged
                dev.report(self.boot, seq)
                st.reports_sent += 1
                ack = await self._await(
                    ack_q,
                    lambda o, s=seq: (
                        o.get(devicemsg.KEYS["boot"]) == self.boot and o.get(devicemsg.KEYS["seq"]) == s
                    ),  # type: ignore[misc]
                    self.report_timeout,
                )
                if ack is not None:
                    st.reports_acked += 1
                    self.progress += 1
                    break
                st.report_retries += 1
                if time.monotonic() - t1 > self.give_up:
                    st.failures.append(f"{dev.identifier} report {seq} never acknowledged")
                    break
            st.gaps.append(max(gap, time.monotonic() - t1))
            await asyncio.sleep(self.pause)


async def until(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Wait until ``pred()``; returns the seconds it took; AssertionError naming ``what`` on timeout."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - t0


def try_mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``path`` (root only); False when this sandbox does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=10
    )
    return r.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(path: Path, keep: int = 0) -> int:
    """Write zeros into ``path`` until the file system is full (leaving about ``keep`` bytes); bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    n = 0
    try:
        st = os.statvfs(path.parent)
        budget = max(0, st.f_bavail * st.f_frsize - keep)
        chunk = b"\0" * 65536
        while n < budget:
            try:
                n += os.write(fd, chunk[: min(len(chunk), budget - n)])
            except OSError:
                break
        if keep == 0:  # the last partial blocks
            with contextlib.suppress(OSError):
                while True:
                    n += os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    return n
