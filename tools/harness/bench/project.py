"""The project's own processes under benchmark: ``ida node`` (the recursive-node simulator) and ``ida gateway``.

    with NodeProcess(log_dir, latency_ms=5, extra_records=bench_records(100)) as node:
        with GatewayProcess(log_dir, node.url) as gw:     # waits until a CoAP GET is answered
            gw.host, gw.port, gw.child.cpu_seconds()
    node.stats          # {"udp": n, "tcp": n, "http": n}: requests the node saw, read from its exit line

Both run as real subprocesses of the ``ida`` CLI (``tools.cli.main``), exactly as an operator starts them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tools.harness.bench.anchors import coap_request
from tools.harness.bench.procs import BenchError, Child, Service
from tools.support.procs import free_port, ida_command

__all__ = [
    "GatewayProcess",
    "NodeProcess",
    "bench_records",
    "rest_record",
    "PREFIX",
    "SAMPLE_ID",
    "resolve_path",
]

PREFIX = "88.123.99"
SAMPLE_ID = "88.123.99/PUMP-0001"
_STATS = re.compile(rb"^node stats: requests ([^;]*);")


def resolve_path(ident: str) -> tuple[str, ...]:
    """Uri-Path segments of ``GET /r/<prefix>/<suffix...>``."""
    prefix, _, suffix = ident.partition("/")
    return ("r", prefix, *suffix.split("/"))


def rest_record(handle: str, url: str) -> dict[str, Any]:
    """A Handle REST record shaped like the sample PUMP record: a URL (index 1) and an EMAIL (index 2)."""
    values = [(1, "URL", url), (2, "EMAIL", "ops@example.com")]
    return {
        "handle": handle,
        "values": [
            {"index": i, "type": t, "data": {"format": "string", "value": v}, "ttl": 86400}
            for i, t, v in values
        ],
    }


def bench_records(n: int, stem: str = "BENCH", start: int = 0) -> list[dict[str, Any]]:
    """``n`` Handle REST records ``88.123.99/<stem>-00000``... shaped like the sample PUMP record."""
    return [
        rest_record(f"{PREFIX}/{stem}-{i:05d}", f"https://example.com/bench/{i}")
        for i in range(start, start + n)
    ]


class NodeProcess(Service):
    """``ida node`` on a free UDP+TCP port (REST off), with ``latency_ms`` added to every answer.

    ``extra_records`` are served in addition to the built-in sample set (written to a records file)."""

    def __init__(
        self,
        log_dir: Path,
        *,
        latency_ms: float = 0.0,
        extra_records: list[dict[str, Any]] | None = None,
        name: str = "node",
    ) -> None:
        self.log_dir = log_dir
        self.latency_ms = latency_ms
        self.extra_records = extra_records or []
        self.name = name
        self.child: Child | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.stats: dict[str, int] | None = None

    @property
    def url(self) -> str:
        return f"hdl://{self.host}:{self.port}"

    def start(self) -> NodeProcess:
        args = ["node", "--handle", f"{self.host}:0", "--http", "off", "--latency", str(self.latency_ms)]
        if self.extra_records:
            from tools.harness.node import sample_records

            recs = [r.to_rest() for r in sample_records()] + self.extra_records
            path = self.log_dir / f"{self.name}-records.json"
            path.write_text(json.dumps(recs))
            args += ["--records", str(path)]
        self.child = Child(self.name, ida_command(*args), log_dir=self.log_dir).start(stdout_pipe=True)
        try:
            m = self.child.wait_line(rb"handle udp\+tcp listening on (\S+):(\d+)", timeout=30)
        except BaseException:
            self.child.stop()
            raise
        self.port = int(m.group(2))
        return self

    def stop(self) -> dict[str, int] | None:
        """Stop the node; ``stats`` = requests per protocol from its exit line (None if it printed none)."""
        if self.child is None:
            return self.stats
        self.child.stop()
        for line in self.child.stdout_lines:
            m = _STATS.search(line)
            if m:
                pairs = (p.split(b"=") for p in m.group(1).split() if b"=" in p)
                self.stats = {k.decode(): int(v) for k, v in pairs}
        self.child = None
        return self.stats


BENCH_CONFIG = """# ida bench: a few synthetic devices send thousands of requests per second; the per-device rate limit
# ([limits] device_rate, 10/s by default) is for real devices and would drop nearly all of them.
[limits]
device_rate = 0
"""


class GatewayProcess(Service):
    """``ida gateway`` with CoAP on a free port, HTTP on any port, MQTT off unless ``mqtt`` is given, the data
    dir under ``log_dir``, and ``upstream`` as its only node. ``start()`` returns once ``probe`` (an identifier)
    resolves with 2.05 over CoAP -- which also puts it in the cache. Unless ``extra`` names a ``--config``,
    the gateway runs with :data:`BENCH_CONFIG` (no per-device rate limit)."""

    def __init__(
        self,
        log_dir: Path,
        upstream: str,
        *,
        probe: str = SAMPLE_ID,
        mqtt: str = "",
        name: str = "gateway",
        log_level: str = "warning",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.log_dir = log_dir
        self.upstream = upstream
        self.probe = probe
        self.mqtt = mqtt
        self.name = name
        self.log_level = log_level
        self.extra = extra
        self.host = "127.0.0.1"
        self.port = 0
        self.child: Child | None = None

    @property
    def data_dir(self) -> Path:
        """The gateway's data dir (its registry is ``registry.sqlite3`` there)."""
        return self.log_dir / f"{self.name}-data"

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.port = free_port()
        data = self.data_dir
        config: tuple[str, ...] = ()
        if "--config" not in self.extra and "-c" not in self.extra:
            cfg_file = self.log_dir / f"{self.name}.toml"
            cfg_file.write_text(BENCH_CONFIG)
            config = ("--config", str(cfg_file))
        args = [
            "gateway",
            "--coap",
            f"{self.host}:{self.port}",
            "--http",
            f"{self.host}:0",
            "--mqtt",
            self.mqtt,
            "--data-dir",
            str(data),
            "-u",
            self.upstream,
            "--log-level",
            self.log_level,
            *config,
            *self.extra,
        ]
        self.child = Child(self.name, ida_command(*args), log_dir=self.log_dir).start()
        deadline = time.monotonic() + timeout
        path = resolve_path(self.probe)
        try:
            while True:
                if not self.child.alive():
                    raise self.child.fail(
                        f"exited with {self.child.proc.returncode if self.child.proc else '?'}"
                    )
                try:
                    code, _, _ = coap_request(self.host, self.port, path, timeout=0.5, attempts=1)
                    if code == 0x45:
                        return self
                    raise self.child.fail(
                        f"probe {self.probe} answered {code >> 5}.{code & 31:02d}, not 2.05"
                    )
                except TimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise self.child.fail(f"no CoAP answer after {timeout:.0f} s")
                time.sleep(0.1)
        except BaseException:
            self.child.stop()
            raise

    def get(self, ident: str) -> tuple[int, list[tuple[int, bytes]], bytes]:
        return coap_request(self.host, self.port, resolve_path(ident))

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(grace=10)
            self.child = None


def require_gateway() -> None:
    """BenchError naming what is missing when the gateway or the node simulator is not in the tree."""
    missing = []
    for mod in ("gateway.service", "gateway.frontends.coap", "tools.harness.node"):
        try:
            __import__(mod)
        except ImportError as e:
            missing.append(f"{mod} ({e})")
    from tools.cli import SUBCOMMANDS

    names = {name for name, _, _ in SUBCOMMANDS}
    missing += [f"`ida {n}`" for n in ("gateway", "node") if n not in names]
    if missing:
        raise BenchError("not in the tree yet: " + ", ".join(missing))
