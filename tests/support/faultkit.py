"""Real processes for the fault and scale-out tests (tests/integration/test_faults.py, tests/unit/gateway/test_shared_cache.py).

* :class:`RedisServer` -- ``redis-server`` on a free loopback port, no persistence; ``stop()``/``start()`` again
  on the same port (an outage), ``kill()`` (SIGKILL).
* :class:`GatewayProc` -- ``ida gateway --config <toml>`` as a child process, with its log captured; ``kill9()``, ``terminate()``, ``start()`` again on the same data dir (and the same CoAP port);
  ``limit_file_size`` sets RLIMIT_FSIZE in the child (the disk-full substitute when tmpfs cannot be mounted).
* :class:`NodeProc` -- ``ida node`` (the simulated recursive node) as a child process.

Each is a :class:`tools.support.procs.Process` (SIGKILLed if pytest dies).
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.brokers import free_port
from tools.support.procs import Process, ida_command
from tools.support.procs import free_port as free_udp_port  # UDP, 127.0.0.1

ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = os.environ.get("IDA_REDIS_SERVER", "/usr/bin/redis-server")
LISTENING = re.compile(r"(coap|http) listening on (\S+):(\d+)")


def redis_binary() -> str | None:
    import shutil

    if Path(REDIS_SERVER).exists():
        return REDIS_SERVER
    return shutil.which("redis-server")


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
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = redis_binary()
        assert binary, "redis-server is not installed (make setup installs it)"
        self.process = Process(
            "redis-server",
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
            log=self.workdir / "redis.log",
            new_session=False,
        ).start()
        self.process.wait_port(self.port, timeout=timeout)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process is not None else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
        self.process = None

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
        self.process: Process | None = None
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

        self.process = Process(
            f"gateway {self.name}",
            ida_command("gateway", "--config", str(self.config_path)),
            env=env,
            stderr=True,
            new_session=False,
            preexec=preexec if limit is not None else None,
        ).start()
        self.starts += 1
        got: dict[str, int] = {}
        ready = threading.Event()
        proc = self.process.proc
        assert proc is not None

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
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process is not None else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def set_file_size_limit(self, limit: int | None) -> None:
        """Change RLIMIT_FSIZE of the running gateway (None = unlimited: "space is back")."""
        value = resource.RLIM_INFINITY if limit is None else limit
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (value, resource.RLIM_INFINITY))

    def kill9(self) -> None:
        if self.process is not None:
            self.process.kill()

    def terminate(self, timeout: float = 15.0) -> int | None:
        return self.process.stop(timeout) if self.process is not None else None

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
        self.process: Process | None = None
        self.out: list[str] = []

    @property
    def url(self) -> str:
        return f"hdl://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process is not None else None

    def start(self, timeout: float = 20.0) -> None:
        args = ["node", "--handle", f"127.0.0.1:{self.port}", "--http", "off", *self.extra]
        if self.records is not None:
            args += ["--records", str(self.records)]
        self.process = Process("ida node", ida_command(*args), stdout=True, new_session=False).start()
        proc = self.process.proc
        assert proc is not None
        listening = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.out.append(line)
                if "listening" in line:
                    listening.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not listening.wait(0.05):
            if not self.process.alive() or time.monotonic() > deadline:
                raise RuntimeError("ida node did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def terminate(self) -> int | None:
        """Stop (SIGTERM) and return the number of requests it served (None if it did not say)."""
        if self.process is None or not self.process.alive():
            return None
        self.process.stop(10)
        time.sleep(0.1)  # the pump thread reads the last line
        for line in self.out:
            m = re.search(r"node stats: requests (.*?);", line)
            if m:
                return sum(int(p.split("=")[1]) for p in m.group(1).split() if "=" in p)
        return None


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
