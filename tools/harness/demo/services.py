"""The demo's server processes, started in order and stopped in reverse: Mosquitto, ``ida node``, ``ida gateway``
(each a :class:`tools.support.procs.Process`: its own session, SIGKILL if the demo dies, output to
``<workdir>/<name>.log``, ``IDA_DEMO_DIR`` in its environment), and the check that nothing is left running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tools.harness.demo.errors import DemoError
from tools.harness.demo.gatewayapi import mqtt_ready
from tools.harness.demo.settings import DEMO_DIR_ENV, PREFIX, SERVICE_STOP_GRACE, START_TIMEOUT
from tools.support import mosquitto
from tools.support.procs import Process, free_port, ida_command

__all__ = ["Services", "leftover_processes", "service"]


def service(name: str, cmd: list[str], workdir: Path) -> Process:
    """A server process of the demo (not started)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[DEMO_DIR_ENV] = str(workdir)  # every process of the demo names its directory
    return Process(name, cmd, env=env, log=workdir / f"{name}.log", error=DemoError)


class Services:
    """Broker, node and gateway; ``start()`` narrates each one as it comes up (``say``)."""

    def __init__(self, workdir: Path, latency_ms: float, say: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.latency_ms = latency_ms
        self.say = say
        self.running: list[Process] = []  # in start order
        self.broker_port = 0
        self.node_port = 0
        self.node_records = 0
        self.coap_port = 0
        self.http_port = 0

    def start(self) -> None:
        """Blocking, bounded by START_TIMEOUT per component."""
        say = self.say
        say(f"working directory {self.workdir} (logs, the gateway's data, the devices' flash)")
        self._broker()
        say(f"Mosquitto (MQTT broker) listening on 127.0.0.1:{self.broker_port}")
        self._node()
        say(
            f"recursive node (ida node) serving {self.node_records} sample records under {PREFIX} on "
            f"hdl://127.0.0.1:{self.node_port} (Handle native protocol, {self.latency_ms:g} ms added latency)"
        )
        self._gateway()
        say(
            f"gateway (ida gateway) up: CoAP on 127.0.0.1:{self.coap_port}, MQTT front end subscribed on the broker, "
            f"HTTP on 127.0.0.1:{self.http_port}, cache empty"
        )
        say(
            f"status page: http://127.0.0.1:{self.http_port}/  (devices, cache hit ratio, upstream, recent resolutions)"
        )

    def _broker(self) -> None:
        """Mosquitto on a free loopback port (tools/support/mosquitto.py: it keeps the invoking user, so the
        parent-death signal still stops it when the demo is SIGKILLed)."""
        exe = mosquitto.mosquitto_binary()
        if exe is None:
            raise DemoError(
                "mosquitto is not installed: run `make setup` as root, or apt-get install mosquitto"
            )
        self.broker_port = free_port(socket.SOCK_STREAM)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(mosquitto.config(self.broker_port))
        spawn = lambda cmd: service("mosquitto", cmd, self.workdir).start()  # noqa: E731
        broker = mosquitto.start([exe, "-c", str(conf)], spawn, "127.0.0.1", self.broker_port, START_TIMEOUT)
        self.running.append(broker)  # (one that failed to start was stopped by mosquitto.start)

    def _started(self, proc: Process) -> Process:
        """Started and listed at once: one that fails while starting is stopped with the others."""
        proc.start()
        self.running.append(proc)
        return proc

    def _node(self) -> None:
        """``ida node`` with the sample records."""
        cmd = ida_command(
            "node", "--handle", "127.0.0.1:0", "--http", "off", "--latency", str(self.latency_ms)
        )
        node = self._started(service("node", cmd, self.workdir))
        self.node_port = int(
            node.wait_log(r"handle udp\+tcp listening on [\d.]+:(\d+)", START_TIMEOUT).group(1)
        )
        self.node_records = int(node.wait_log(r"ida node: (\d+) records", START_TIMEOUT).group(1))

    def _gateway(self) -> None:
        """``ida gateway`` with CoAP and HTTP on any free port (read back from its log) and MQTT on the broker;
        done once ``/healthz`` says the MQTT front end has subscribed."""
        cmd = ida_command(
            "gateway",
            "--coap",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            f"mqtt://127.0.0.1:{self.broker_port}",
            "--data-dir",
            str(self.workdir / "gateway-data"),
            "-u",
            f"hdl://127.0.0.1:{self.node_port}",
            "--log-level",
            "info",
        )
        gw = self._started(service("gateway", cmd, self.workdir))
        self.coap_port = int(gw.wait_log(r"coap listening on [\d.]+:(\d+)", START_TIMEOUT).group(1))
        self.http_port = int(gw.wait_log(r"http listening on [\d.]+:(\d+)", START_TIMEOUT).group(1))
        deadline = time.monotonic() + START_TIMEOUT
        while not mqtt_ready(self.http_port):
            if not gw.alive():
                raise gw.fail("exited while starting")
            if time.monotonic() > deadline:
                raise gw.fail(f"MQTT front end not subscribed to the broker within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    async def watch(self) -> tuple[str, str]:
        """Returns when one of them exits: (what happened, the end of its log to show with it)."""
        while True:
            for s in self.running:
                if not s.alive():
                    tail = s.log_tail(600)
                    return f"{s.name} exited with code {s.returncode}", (
                        f"; end of its log:\n{tail}" if tail else ""
                    )
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM in reverse order, SIGKILL after SERVICE_STOP_GRACE; each one's end narrated."""
        for s in reversed(self.running):
            if s.proc is None:
                continue
            rc = s.stop(SERVICE_STOP_GRACE)
            how = (
                f"killed after not stopping within {SERVICE_STOP_GRACE:.0f} s"
                if s.killed
                else f"exit code {rc}"
            )
            extra = ""
            if s.name == "node":
                m = re.search(r"node stats: requests ([^;\n]*)", s.log_text())
                if m:
                    extra = f"; it answered requests {m.group(1).strip()}"
            self.say(f"{s.name} stopped ({how}){extra}")
        self.running.clear()


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
