"""`ida demo` (what ``make demo`` runs): the whole system on loopback, narrated in plain words.

Everything runs on 127.0.0.1 on free ports, under one temporary directory (removed at the end unless
``--keep``; kept when something failed, so its logs can be read):

1. **Mosquitto** with a generated config (anonymous loopback listener, no persistence);
2. **`ida node`**, the recursive-node simulator, serving the built-in sample records over the Handle native
   protocol with some added latency (a real recursive node is a network round trip away);
3. **`ida gateway`**: CoAP, HTTP (status page, API, metrics) and its MQTT front end on that broker, a fresh data
   dir (so the cache starts cold), the node as its only upstream;
4. **three devices running the real firmware** (``firmware/main.py`` under the MicroPython unix port, provisioned
   with :mod:`tools.harness.sim.provision`): PUMP-0001 over CoAP, MOTOR-0001 over MQTT and VALVE-0001 over CoAP, which
   loses its network for a while (console ``net down``), queues its reports in flash and catches up.

The demo drives the devices through their consoles (stdin/stdout pipes, ``json on``): resolves that go to the
recursive node, resolves the gateway answers from its cache over both transports, a resolve the device
answers from its own cache, reports, the outage. Each line it prints states one event, read from what the
devices answer on their consoles and from the gateway's ``/api/status``, ``/api/devices`` and ``/metrics``;
resolution times are round trips measured at the device's console (console pipe included).

It runs until Ctrl-C (SIGINT) or SIGTERM, or for ``DEMO_SECONDS`` seconds (``--seconds``), then stops everything in
reverse order (devices: SIGINT, so the firmware flushes its queue; gateway, node, broker: SIGTERM; SIGKILL for
anything still running after a grace period) and checks that no process it started is left: none of its children,
and no process whose command line or environment names its temporary directory (each gets ``IDA_DEMO_DIR`` in its
environment); a straggler is killed and named in the output. Every process runs in its own
session (a Ctrl-C in the terminal reaches only the demo, which then stops them in order) and gets SIGKILL if the
demo itself dies (``PR_SET_PDEATHSIG``).

Exit codes: 0 a clean run (also when stopped with Ctrl-C); 1 a component failed to start or died while running
(the message names it and shows the end of its log); 2 bad arguments (e.g. ``DEMO_SECONDS=abc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tools.errors import CliError
from tools.harness.bench.procs import free_port
from tools.harness.sim.provision import die_with_parent
from tools.support import mosquitto
from tools.support.mosquitto import mosquitto_binary

__all__ = ["add_arguments", "run", "leftover_processes", "DemoError"]

REPO = Path(__file__).resolve().parents[2]
PREFIX = "88.123.99"
NODE_LATENCY_MS = 20.0  # added by `ida node` to every answer: upstream is a network round trip away
REPORT_INTERVAL = 20  # s, the devices' report interval (the firmware accepts 10-86400)
STATUS_EVERY = 1.0  # s between `status` questions to each device
STEP = 2.0  # s between two scripted steps
OUTAGE_S = 10.0  # how long VALVE-0001 stays offline
SUMMARY_EVERY = 20.0  # s between gateway summaries once the script has run
START_TIMEOUT = 45.0  # per component; the machine may be busy
DEVICE_STOP_GRACE = 3.0
SERVICE_STOP_GRACE = 10.0
# the whole stop: devices (grace + reader each) and services (grace + SIGKILL wait each) take at most ~60 s
STOP_WATCHDOG_S = 75
DEMO_DIR_ENV = "IDA_DEMO_DIR"  # set in the environment of every process the demo starts

# (identifier, transport, role)
DEVICES: tuple[tuple[str, str, str], ...] = (
    (f"{PREFIX}/PUMP-0001", "coap", "CoAP"),
    (f"{PREFIX}/MOTOR-0001", "mqtt", "MQTT"),
    (f"{PREFIX}/VALVE-0001", "coap", "CoAP, loses its network for a while"),
)

# the console's (and the firmware log's) answer sources, in words
SOURCE_WORDS = {
    "upstream": "from upstream (the gateway asked the recursive node)",
    "cache": "from the gateway cache",
    "zone": "from the gateway's local zone",
    "stale": "from the gateway cache, stale (upstream did not answer)",
    "device-cache": "from the device's own cache (no network)",
    "device-revalidated": "from the device's own cache, revalidated with the gateway",
}
_LOG_SOURCES = {
    "-2": "device-revalidated",
    "-1": "device-cache",
    "0": "zone",
    "1": "cache",
    "2": "upstream",
    "3": "stale",
}

_BOOT = re.compile(r"^I app boot=(\d+) fw=(\S+) board=(\S+)")
_STARTED = re.compile(r"^I net (\w+) started")
_NET_DOWN = re.compile(r"^W net down")
_NET_ERROR = re.compile(r"^W net (\w+) error (.*); retry in (\d+) ms")
_BOOT_RESOLVE = re.compile(r"^I app resolve id=(\S+) code=(\d+) values=(\d+) src=(\S+)")
_QUIET = re.compile(r"^(I |W mqtt INSECURE)")  # other info lines and the plain-MQTT warning are not narrated


class DemoError(Exception):
    """A component did not start or died; the message says which and why."""


# -- output ------------------------------------------------------------------------------------------------
class Narrator:
    """One line per event, ``[  12.3s] text``, flushed at once (``make`` and pipes buffer otherwise)."""

    def __init__(self, out: Callable[[str], None] | None = None) -> None:
        self.t0 = time.monotonic()
        self.out = out or (lambda s: print(s, flush=True))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self.out(f"[{self.elapsed():6.1f}s] {text}")


# -- processes ---------------------------------------------------------------------------------------------
def _ida(*args: str) -> list[str]:
    """``ida ARGS`` with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())", *args]


class Service:
    """One server process (broker, node, gateway): stdout and stderr to ``<workdir>/<name>.log``, its own session,
    SIGKILL if the demo dies; ``stop()`` sends SIGTERM, then SIGKILL after a grace period."""

    def __init__(
        self, name: str, cmd: Sequence[str], workdir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.workdir = workdir
        self.env = dict(os.environ if env is None else env)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        if shutil.which(self.cmd[0]) is None and not os.path.exists(self.cmd[0]):
            raise DemoError(f"{self.name}: {self.cmd[0]} not found")
        self.env.setdefault("PYTHONPATH", str(REPO))
        self.env[DEMO_DIR_ENV] = str(self.workdir)  # every process of the demo names its directory
        self.env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 1500) -> str:
        return self.log_text()[-n:].strip()

    def fail(self, why: str) -> DemoError:
        tail = self.log_tail()
        return DemoError(f"{self.name} {why}" + (f"\n--- end of {self.log_path} ---\n{tail}" if tail else ""))

    def wait_log(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if not self.alive():
                raise self.fail(
                    f"exited with code {self.proc.returncode if self.proc else '?'} while starting"
                )
            if time.monotonic() > deadline:
                raise self.fail(f"did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self, grace: float = SERVICE_STOP_GRACE) -> tuple[int | None, bool]:
        """(exit code, killed): SIGTERM, wait ``grace`` s, then SIGKILL."""
        p = self.proc
        if p is None:
            return None, False
        killed = False
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        return p.returncode, killed


def start_broker(workdir: Path) -> tuple[Service, int]:
    """Mosquitto on a free loopback port (tools/support/mosquitto.py: it keeps the invoking user, so the parent-death
    signal still stops it when the demo is SIGKILLed); (service, port)."""
    exe = mosquitto_binary()
    if exe is None:
        raise DemoError("mosquitto is not installed: run `make setup` as root, or apt-get install mosquitto")
    port = free_port(socket.SOCK_STREAM)
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto.config(port))
    svc = mosquitto.start(
        [exe, "-c", str(conf)],
        lambda cmd: Service("mosquitto", cmd, workdir).start(),
        "127.0.0.1",
        port,
        START_TIMEOUT,
    )
    return svc, port


def start_node(workdir: Path, latency_ms: float) -> tuple[Service, int, int]:
    """``ida node`` with the sample records; (service, records served, handle port)."""
    svc = Service(
        "node",
        _ida("node", "--handle", "127.0.0.1:0", "--http", "off", "--latency", str(latency_ms)),
        workdir,
    ).start()
    m = svc.wait_log(r"handle udp\+tcp listening on [\d.]+:(\d+)")
    n = svc.wait_log(r"ida node: (\d+) records")
    return svc, int(n.group(1)), int(m.group(1))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def start_gateway(workdir: Path, node_port: int, broker_port: int) -> tuple[Service, int, int]:
    """``ida gateway`` with CoAP and HTTP on any free port (read back from its log) and MQTT on the broker;
    returns once ``/healthz`` says the MQTT front end has subscribed. (service, coap port, http port)."""
    svc = Service(
        "gateway",
        _ida(
            "gateway",
            "--coap",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            f"mqtt://127.0.0.1:{broker_port}",
            "--data-dir",
            str(workdir / "gateway-data"),
            "-u",
            f"hdl://127.0.0.1:{node_port}",
            "--log-level",
            "info",
        ),
        workdir,
    ).start()
    coap = int(svc.wait_log(r"coap listening on [\d.]+:(\d+)").group(1))
    http = int(svc.wait_log(r"http listening on [\d.]+:(\d+)").group(1))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if not svc.alive():
            raise svc.fail("exited while starting")
        with contextlib.suppress(OSError, ValueError):
            code, body = http_get(f"http://127.0.0.1:{http}/healthz", timeout=2)
            if json.loads(body).get("components", {}).get("mqtt") == "ready":
                return svc, coap, http
        if time.monotonic() > deadline:
            raise svc.fail(f"MQTT front end not subscribed to the broker within {START_TIMEOUT:.0f} s")
        time.sleep(0.1)


def leftover_processes(workdir: Path, parent: int | None = None) -> list[tuple[int, str]]:
    """Live processes (pid, command line) that are children of ``parent`` (default: this process) or whose command
    line or environment names ``workdir``. Zombies do not count; environments we may not read are skipped."""
    parent = os.getpid() if parent is None else parent
    needle = str(workdir).encode()
    me = os.getpid()
    out: list[tuple[int, str]] = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            stat = (p / "stat").read_bytes()
            rest = stat[stat.rindex(b")") + 2 :].split()
            state, ppid = rest[0], int(rest[1])
            cmdline = (p / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if state == b"Z":
            continue
        hit = ppid == parent or needle in cmdline
        if not hit:
            with contextlib.suppress(OSError):
                hit = needle in (p / "environ").read_bytes()
        if hit:
            out.append((int(p.name), cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip()))
    return out


# -- devices -----------------------------------------------------------------------------------------------
@dataclass
class Device:
    ident: str
    transport: str
    role: str
    data_dir: Path
    proc: asyncio.subprocess.Process | None = None
    waiting: dict[str, deque[asyncio.Future[dict[str, Any]]]] = field(default_factory=dict)
    status: dict[str, Any] | None = None
    booted: asyncio.Event = field(default_factory=asyncio.Event)
    first_resolve: asyncio.Event = field(default_factory=asyncio.Event)
    catching_up: bool = False
    offline_at: float | None = None
    reader: asyncio.Task[None] | None = None
    transcript: IO[str] | None = None
    exit_code: int | None = None
    stopping: bool = False

    @property
    def name(self) -> str:
        return self.ident.split("/", 1)[1]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.transport})"

    def send(self, line: str) -> None:
        p = self.proc
        if p is None or p.returncode is not None or p.stdin is None or p.stdin.is_closing():
            raise DemoError(f"device {self.name} is not running")
        if self.transcript:
            self.transcript.write(f"> {line}\n")
        p.stdin.write(line.encode() + b"\n")

    async def ask(self, line: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a console command and wait for its JSON reply (replies to one command come in order)."""
        cmd = line.split()[0]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(cmd, deque()).append(fut)
        self.send(line)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            q = self.waiting.get(cmd)
            if q and fut in q:
                q.remove(fut)
            raise DemoError(f"device {self.name} did not answer `{line}` within {timeout:.0f} s") from None


class Demo:
    def __init__(self, workdir: Path, seconds: float | None, narrator: Narrator, latency_ms: float) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.n = narrator
        self.say = narrator.say
        self.latency_ms = latency_ms
        self.services: list[Service] = []  # in start order
        self.devices: list[Device] = []
        self.coap_port = 0
        self.http_port = 0
        self.broker_port = 0
        self.stop_event: asyncio.Event | None = None
        self.failure: str | None = None
        self.stopped_by: str | None = None
        self.node_records = 0

    # ---- start
    def start_services(self) -> None:
        say = self.say
        say(f"working directory {self.workdir} (logs, the gateway's data, the devices' flash)")
        broker, self.broker_port = start_broker(self.workdir)
        self.services.append(broker)
        say(f"Mosquitto (MQTT broker) listening on 127.0.0.1:{self.broker_port}")
        node, self.node_records, node_port = start_node(self.workdir, self.latency_ms)
        self.services.append(node)
        say(
            f"recursive node (ida node) serving {self.node_records} sample records under {PREFIX} on "
            f"hdl://127.0.0.1:{node_port} (Handle native protocol, {self.latency_ms:g} ms added latency)"
        )
        gw, self.coap_port, self.http_port = start_gateway(self.workdir, node_port, self.broker_port)
        self.services.append(gw)
        say(
            f"gateway (ida gateway) up: CoAP on 127.0.0.1:{self.coap_port}, MQTT front end subscribed on the broker, "
            f"HTTP on 127.0.0.1:{self.http_port}, cache empty"
        )
        say(
            f"status page: http://127.0.0.1:{self.http_port}/  (devices, cache hit ratio, upstream, recent resolutions)"
        )

    async def start_devices(self) -> None:
        from proto import devicemsg
        from tools.harness.sim.config import SimError
        from tools.harness.sim.provision import (
            device_command,
            device_env,
            micropython_binary,
            provision,
            uid_for,
        )

        try:
            mp = micropython_binary()
        except SimError as e:
            raise DemoError(str(e)) from None
        for i, (ident, transport, role) in enumerate(DEVICES, start=1):
            d = Device(ident, transport, role, self.workdir / "devices" / devicemsg.topic_key(ident))
            try:
                provision(
                    d.data_dir,
                    ident,
                    transport=transport,
                    coap=f"coap://127.0.0.1:{self.coap_port}" if transport == "coap" else None,
                    mqtt=f"mqtt://127.0.0.1:{self.broker_port}" if transport == "mqtt" else None,
                )
            except SimError as e:
                raise DemoError(f"cannot provision {ident}: {e}") from None
            env = device_env(d.data_dir, uid=uid_for(i), interval=REPORT_INTERVAL)
            env[DEMO_DIR_ENV] = str(self.workdir)
            d.transcript = open(d.data_dir / "console.log", "w", encoding="utf-8")  # noqa: SIM115 -- closed in stop
            with open(d.data_dir / "stderr.log", "ab") as err:
                d.proc = await asyncio.create_subprocess_exec(
                    *device_command(mp),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    env=env,
                    cwd=str(d.data_dir),
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            self.devices.append(d)
            d.reader = asyncio.ensure_future(self._read(d))
            d.send("json on")
            self.say(
                f"device {d.name} started: real firmware under micropython, {role}, provisioned as {ident}"
            )
        try:
            await asyncio.wait_for(asyncio.gather(*(d.booted.wait() for d in self.devices)), START_TIMEOUT)
            await asyncio.wait_for(
                asyncio.gather(*(d.first_resolve.wait() for d in self.devices)), START_TIMEOUT
            )
        except TimeoutError:
            late = [d.name for d in self.devices if not d.first_resolve.is_set()]
            raise DemoError(
                f"devices {', '.join(late)} did not come online within {START_TIMEOUT:.0f} s "
                f"(see {self.workdir}/devices/*/console.log)"
            ) from None

    # ---- device output
    async def _read(self, d: Device) -> None:
        assert d.proc is not None and d.proc.stdout is not None
        while True:
            try:
                raw = await d.proc.stdout.readline()
            except (ValueError, OSError):
                continue
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if d.transcript:
                d.transcript.write(line + "\n")
                d.transcript.flush()
            self._line(d, line)
        rc = await d.proc.wait()
        d.exit_code = rc
        if not d.stopping:
            self.failure = f"device {d.name} exited with code {rc} (see {d.data_dir}/stderr.log)"
            self.say(self.failure)
            if self.stop_event:
                self.stop_event.set()

    def _line(self, d: Device, line: str) -> None:
        obj: Any = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
        if isinstance(obj, dict):
            if isinstance(obj.get("log"), str):
                self._log(d, obj["log"])
                return
            cmd = obj.get("cmd")
            q = d.waiting.get(cmd) if isinstance(cmd, str) else None
            while q:
                fut = q.popleft()
                if not fut.done():
                    fut.set_result(obj)
                    break
            return
        if line.strip():
            self._log(d, line.strip())

    def _log(self, d: Device, text: str) -> None:
        if m := _BOOT.match(text):
            d.booted.set()
            self.say(
                f"device {d.label} booted: boot #{m.group(1)}, firmware {m.group(2)}, board {m.group(3)}"
            )
        elif m := _STARTED.match(text):
            target = (
                f"127.0.0.1:{self.coap_port}"
                if d.transport == "coap"
                else f"the broker 127.0.0.1:{self.broker_port}"
            )
            self.say(f"{d.name} network up: {m.group(1)} client started towards {target}")
        elif m := _BOOT_RESOLVE.match(text):
            ident, code, nvalues, src = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            source = _LOG_SOURCES.get(src, src)
            when = "after reconnecting" if d.first_resolve.is_set() else "at boot"
            if code == 1:
                self.say(
                    f"{d.label} resolved its own identifier {ident} {when}: {nvalues} values "
                    f"{SOURCE_WORDS.get(source, 'from ' + source)}"
                )
            else:
                self.say(f"{d.label} could not resolve its own identifier {when}: code {code}")
            d.first_resolve.set()
        elif _NET_DOWN.match(text):
            d.offline_at = time.monotonic()
            self.say(f"{d.name} lost its network: its reports now wait in its flash queue")
        elif m := _NET_ERROR.match(text):
            self.say(f"{d.name}: {m.group(1)} error ({m.group(2)}), retrying in {int(m.group(3)) / 1000:g} s")
        elif text.startswith(("W ", "E ")) and not _QUIET.match(text):
            self.say(f"{d.name} log: {text}")

    # ---- status: reports made, queued, delivered
    async def status_loop(self) -> None:
        while True:
            for d in self.devices:
                if d.booted.is_set() and d.exit_code is None and not d.stopping:
                    with contextlib.suppress(DemoError):
                        self._status(d, await d.ask("status", timeout=5))
            await asyncio.sleep(STATUS_EVERY)

    def _status(self, d: Device, st: dict[str, Any]) -> None:
        prev = d.status or {"seq": 0, "acked": 0, "queue": 0}
        d.status = st
        seq, acked, queue = int(st.get("seq") or 0), int(st.get("acked") or 0), int(st.get("queue") or 0)
        made = seq - int(prev.get("seq") or 0)
        delivered = acked - int(prev.get("acked") or 0)
        if made > 0 and st.get("net") == "down":
            what = f"report {seq}" if made == 1 else f"reports {seq - made + 1}-{seq}"
            self.say(f"{d.name} offline: {what} queued in flash ({queue} waiting)")
        if delivered > 0 and not d.catching_up:
            if delivered == 1 and queue == 0:
                self.say(
                    f"{d.label} report {seq} delivered: the gateway acknowledged it ({acked} since boot)"
                )
            else:
                self.say(
                    f"{d.label} {delivered} reports delivered ({acked} since boot, {queue} still queued)"
                )

    async def fresh_status(self, d: Device) -> dict[str, Any]:
        st = await d.ask("status", timeout=5)
        self._status(d, st)
        return st

    # ---- gateway facts
    async def gateway_json(self, path: str) -> Any:
        code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.http_port}{path}")
        if code != 200:
            raise DemoError(f"gateway answered {code} to GET {path}")
        return json.loads(body)

    async def metrics(self) -> dict[str, float]:
        code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.http_port}/metrics")
        out: dict[str, float] = {}
        for line in body.decode("utf-8", "replace").splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value) if "{" in name else float(value)
        return out

    async def gateway_summary(self, final: bool = False) -> None:
        try:
            st = await self.gateway_json("/api/status")
            m = await self.metrics()
        except (OSError, ValueError, DemoError) as e:
            self.say(f"gateway status not available: {e}")
            return
        # cache hits and misses from /metrics: they include the CoAP fast path's hits, which the status page's
        # list of recent resolutions (resolutions by source) does not see
        reports = int(m.get("ida_reports_total", 0))
        hits, misses = int(m.get("ida_cache_hits_total", 0)), int(m.get("ida_cache_misses_total", 0))
        ratio = f" (hit ratio {100 * hits / (hits + misses):.0f} %)" if hits + misses else ""
        cache = st.get("cache", {})
        ups = [u for u in st.get("upstream", []) if u.get("requests")]
        lat = ""
        if ups and ups[0].get("latency_mean_ms") is not None:
            lat = f", upstream {ups[0]['requests']} requests, {ups[0]['latency_mean_ms']:.1f} ms mean"
        depth = (st.get("outbox") or {}).get("depth")
        self.say(
            f"gateway{' (final)' if final else ''}: {reports} reports stored, {st.get('devices_online', 0)} of "
            f"{st.get('devices_total', 0)} devices online, {hits + misses} cache lookups: {hits} hits, "
            f"{misses} misses{ratio}, {cache.get('entries', 0)} cache entries{lat}"
            + (f", outbox {depth}" if depth is not None else "")
        )

    # ---- scripted actions
    def dev(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    async def resolve(self, d: Device, target: str) -> str | None:
        t0 = time.monotonic()
        reply = await d.ask(f"resolve {target}", timeout=15)
        ms = (time.monotonic() - t0) * 1000
        source = str(reply.get("source"))
        words = SOURCE_WORDS.get(source, "from " + source)
        if reply.get("code") in (
            100,
            200,
        ):  # handle not found / values not found: a real answer, cached briefly
            what = "does not exist (handle not found)" if reply.get("code") == 100 else "has no such values"
            self.say(f"{d.label} resolved {target} in {ms:.1f} ms {words}: it {what}")
            return source
        if not reply.get("ok"):
            self.say(f"{d.label} could not resolve {target}: {reply.get('error')}")
            return None
        values = reply.get("values") or []
        shown = _shown_value(values)
        self.say(
            f"{d.label} resolved {reply.get('id', target)} in {ms:.1f} ms {words}: {len(values)} values"
            + (f", {shown}" if shown else "")
        )
        return source

    async def outage(
        self, d: Device, seconds: float, reports: int, during: Callable[[], Any] | None = None
    ) -> None:
        await d.ask("net down")
        await asyncio.sleep(STEP / 2)
        for _ in range(reports):
            await d.ask("report")
            await asyncio.sleep(STEP / 2)
        reply = await d.ask(f"resolve {PREFIX}/PUMP-0001")
        if not reply.get("ok"):
            self.say(f"{d.label} tries to resolve {PREFIX}/PUMP-0001 while offline: {reply.get('error')}")
        if during is not None:
            await during()
        left = seconds - (time.monotonic() - (d.offline_at or time.monotonic()))
        if left > 0:
            await asyncio.sleep(left)
        st = await self.fresh_status(d)
        queued, acked0 = int(st.get("queue") or 0), int(st.get("acked") or 0)
        offline = time.monotonic() - (d.offline_at or time.monotonic())
        d.catching_up = True
        t0 = time.monotonic()
        await d.ask("net up")
        self.say(f"{d.name} network is back after {offline:.0f} s offline: {queued} queued reports to send")
        try:
            deadline = time.monotonic() + 60
            while True:
                await asyncio.sleep(0.25)
                st = await d.ask("status", timeout=5)
                d.status = st
                if (
                    st.get("transport_on")
                    and int(st.get("queue") or 0) == 0
                    and int(st.get("acked") or 0) > acked0
                ):
                    break
                if time.monotonic() > deadline:
                    self.say(f"{d.name} has not caught up after 60 s: {st.get('queue')} reports still queued")
                    return
        finally:
            d.catching_up = False
        delivered = int(st.get("acked") or 0) - acked0
        self.say(
            f"{d.label} back online: {delivered} queued reports delivered in {time.monotonic() - t0:.1f} s "
            f"(queue {queued} -> 0, all acknowledged)"
        )
        with contextlib.suppress(OSError, ValueError, DemoError):
            rows = (await self.gateway_json("/api/devices")).get("devices", [])
            row = next((r for r in rows if r.get("id") == d.ident), None)
            if row:
                last = row.get("last_report") or {}
                self.say(
                    f"gateway confirms: {row.get('reports_total')} reports stored from {d.name}, the last one "
                    f"seq {last.get('seq')} of boot {last.get('boot')}"
                )

    async def script(self) -> None:
        """The demo's story; once it is told, a quieter loop keeps the system busy until the end."""
        pump, motor, valve = self.dev("PUMP-0001"), self.dev("MOTOR-0001"), self.dev("VALVE-0001")
        say = self.say
        await asyncio.sleep(STEP)
        say("-- each device resolved its own identifier from upstream; now they look up each other's")
        await self.resolve(pump, motor.ident)  # MOTOR resolved it at boot: in the gateway cache (CoAP)
        await asyncio.sleep(STEP)
        await self.resolve(motor, pump.ident)  # gateway cache, over MQTT
        await asyncio.sleep(STEP)
        await self.resolve(pump, f"{PREFIX}/SENSOR-0001")  # nobody asked yet: upstream, CoAP
        await asyncio.sleep(STEP)
        await self.resolve(motor, f"{PREFIX}/LINE-0001/STATION-03")  # upstream, MQTT
        await asyncio.sleep(STEP)
        say(f"-- VALVE-0001 loses its network for {OUTAGE_S:.0f} s; the others carry on")

        async def meanwhile() -> None:
            await self.resolve(pump, f"{PREFIX}/SENSOR-0001")  # the device's own cache
            await asyncio.sleep(STEP / 2)
            await self.resolve(motor, f"{PREFIX}/SENSOR-0001")  # gateway cache, MQTT
            await asyncio.sleep(STEP / 2)
            await pump.ask("report")
            await motor.ask("report")

        await self.outage(valve, OUTAGE_S, 3, meanwhile)
        await asyncio.sleep(STEP / 2)
        await self.resolve(valve, f"{PREFIX}/LINE-0001/STATION-03")  # gateway cache, CoAP
        await asyncio.sleep(STEP / 2)
        await self.gateway_summary()
        say(
            f"-- the story is told; devices keep reporting every {REPORT_INTERVAL} s and resolving now and then "
            "(Ctrl-C to stop)"
        )
        await self.steady()

    async def steady(self) -> None:
        targets = [
            f"{PREFIX}/{s}"
            for s in (
                "MOTOR-0002",
                "VALVE-0002",
                "LINE-0001",
                "TTL-0001",
                "MANY-0001",
                "PUMP-0001",
                "SENSOR-0001",
                "NOPE-0404",
            )
        ]
        k = 0
        last_summary = time.monotonic()
        while True:
            d = self.devices[k % len(self.devices)]
            await self.resolve(d, targets[(k // len(self.devices) + k) % len(targets)])
            k += 1
            await asyncio.sleep(2 * STEP)
            if time.monotonic() - last_summary >= SUMMARY_EVERY:
                await self.gateway_summary()
                last_summary = time.monotonic()
            if k % 45 == 0:
                await self.outage(self.dev("VALVE-0001"), OUTAGE_S, 2)

    async def watch_services(self) -> None:
        while True:
            for s in self.services:
                if not s.alive():
                    self.failure = f"{s.name} exited with code {s.proc.returncode if s.proc else '?'}"
                    tail = s.log_tail(600)
                    self.say(self.failure + (f"; end of its log:\n{tail}" if tail else ""))
                    if self.stop_event:
                        self.stop_event.set()
                    return
            await asyncio.sleep(0.5)

    # ---- stop
    async def stop_devices(self) -> None:
        for d in self.devices:
            d.stopping = True
        for d in self.devices:
            if d.proc is not None and d.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    d.proc.send_signal(signal.SIGINT)  # the firmware flushes its queue to flash
        killed = []
        for d in self.devices:
            if d.proc is None:
                continue
            try:
                await asyncio.wait_for(d.proc.wait(), DEVICE_STOP_GRACE)
            except TimeoutError:
                killed.append(d.name)
                with contextlib.suppress(ProcessLookupError):
                    d.proc.kill()
                await d.proc.wait()
            if d.reader is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(d.reader, 2)
            if d.transcript:
                d.transcript.close()
                d.transcript = None
        if self.devices:
            extra = f" ({', '.join(killed)} killed after {DEVICE_STOP_GRACE:.0f} s)" if killed else ""
            q = ", ".join(f"{d.name} {d.status.get('queue', 0)}" for d in self.devices if d.status)
            self.say(
                f"{len(self.devices)} devices stopped{extra}; reports left in their queues: {q or 'none'}"
            )

    def stop_services(self) -> None:
        for s in reversed(self.services):
            if s.proc is None:
                continue
            rc, killed = s.stop()
            how = (
                f"killed after not stopping within {SERVICE_STOP_GRACE:.0f} s"
                if killed
                else f"exit code {rc}"
            )
            extra = ""
            if s.name == "node":
                m = re.search(r"node stats: requests ([^;\n]*)", s.log_text())
                if m:
                    extra = f"; it answered requests {m.group(1).strip()}"
            self.say(f"{s.name} stopped ({how}){extra}")
        self.services.clear()


def _shown_value(values: Any) -> str | None:
    """What to show of a resolve reply's values (the console gives ``[index, type, data, ttl]`` lists): the
    DESC text if there is one, else the URL."""
    found: dict[str, str] = {}
    for v in values if isinstance(values, list) else []:
        if isinstance(v, list) and len(v) >= 3 and isinstance(v[1], str) and isinstance(v[2], str):
            found.setdefault(v[1].upper(), v[2])
    if "DESC" in found:
        return f'DESC "{found["DESC"]}"'
    if "URL" in found:
        return f"URL {found['URL']}"
    return None


# -- the command -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (default $DEMO_SECONDS, else run until Ctrl-C)",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=NODE_LATENCY_MS,
        metavar="MS",
        help=f"latency the recursive node adds to each answer (default {NODE_LATENCY_MS:g} ms)",
    )
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, data) at the end")


def _seconds(args: argparse.Namespace) -> float | None:
    if args.seconds is not None:
        s: float = args.seconds
    else:
        raw = os.environ.get("DEMO_SECONDS", "").strip()
        if not raw:
            return None
        try:
            s = float(raw)
        except ValueError:
            raise CliError(f"DEMO_SECONDS must be a number of seconds, got {raw!r}") from None
    if not s > 0:
        raise CliError(f"the demo's duration must be more than 0 seconds, got {s:g}")
    return s


async def _main(demo: Demo) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    demo.stop_event = stop

    def on_signal(name: str) -> None:
        if demo.stopped_by is None:
            demo.stopped_by = name
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    tasks: list[asyncio.Task[Any]] = []
    try:
        demo.start_services()  # blocking, bounded by START_TIMEOUT per component; a signal waits for it
        if stop.is_set():
            return
        tasks.append(asyncio.ensure_future(demo.watch_services()))
        await demo.start_devices()
        tasks.append(asyncio.ensure_future(demo.status_loop()))
        story = asyncio.ensure_future(demo.script())
        tasks.append(story)
        if demo.seconds is not None:
            left = demo.seconds - demo.n.elapsed()
            demo.say(f"running for {demo.seconds:g} s in all (DEMO_SECONDS); Ctrl-C stops it earlier")
        else:
            left = None
            demo.say("running until Ctrl-C")
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiter, story}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if story in done and not story.cancelled() and story.exception() is not None:
            raise story.exception()  # type: ignore[misc]
        if demo.stopped_by:
            demo.say(f"{demo.stopped_by}: stopping")
        elif not stop.is_set():
            demo.say(f"{demo.seconds:g} s are up: stopping")
        if demo.failure is None and demo.http_port:
            await demo.gateway_summary(final=True)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        demo.say("stopping in reverse order: devices, gateway, recursive node, broker")
        # every step of the stop is bounded; should one still hang, say where (stderr) and exit, rather than hang
        faulthandler.dump_traceback_later(STOP_WATCHDOG_S, exit=True)
        await demo.stop_devices()
        demo.stop_services()
        faulthandler.cancel_dump_traceback_later()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    seconds = _seconds(args)
    narrator = Narrator()
    # `kill -USR1 <pid>` prints where every thread of the demo is (stderr): for a demo that does not stop
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    workdir = Path(tempfile.mkdtemp(prefix="ida-demo-"))
    demo = Demo(workdir, seconds, narrator, args.latency)
    narrator.say(
        "ida demo: a recursive node, an MQTT broker, the gateway and three devices running the real "
        "firmware, all on this machine"
    )
    error: str | None = None
    try:
        asyncio.run(_main(demo))
    except DemoError as e:
        error = str(e)
    except KeyboardInterrupt:  # before the signal handlers were in place
        demo.say("interrupted")
    if error is None:
        error = demo.failure
    # nothing may be left running: no child of ours, nothing that names the working directory
    left = leftover_processes(workdir)
    for pid, cmd in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        narrator.say(f"straggler killed: pid {pid} ({cmd[:120]})")
    if not left:
        narrator.say("nothing left running: every process the demo started has exited")
    if error is not None:
        print(f"ida demo: {error}", file=sys.stderr, flush=True)
        narrator.say(f"demo failed; logs kept in {workdir}")
        return 1
    if args.keep:
        narrator.say(f"logs and data kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    narrator.say("demo finished")
    return 0
