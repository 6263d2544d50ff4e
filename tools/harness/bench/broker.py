"""A Mosquitto broker for a benchmark run: loopback listener on a free port, anonymous, no persistence
(tools/support/mosquitto.py; the broker's process is a :class:`~tools.harness.bench.procs.Child`, so its CPU time can be watched).

Two limits are raised for the load of a benchmark: ``max_queued_messages`` (messages queued per client beyond those
in flight) and ``max_inflight_messages`` (QoS 1 messages in flight per client, and the Receive Maximum announced
to MQTT v5 clients; Mosquitto's default of 20 holds a gateway taking reports and sending their acks to 20 per
round trip with the broker). ``ida broker config`` sets the same for a deployment."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TypedDict

from tools.harness.bench.procs import BenchError, Child, Service, free_port, python_module_cmd
from tools.support import mosquitto
from tools.support.mosquitto import mosquitto_binary

# Where an MQTT scenario's load goes: the gateway's topic tree, or the bare anchor's (the same broker, its own tree)
ROOTS = {"gateway": "ida/v1/d", "mqtt_raw": "bench/v1/d"}
ANCHOR_ROOT = ROOTS["mqtt_raw"]


class RunArgs(TypedDict):
    host: str
    port: int
    root: str
    duration: float
    warmup: float


def spec_args(target: str, host: str, port: int, duration: float, warmup: float) -> RunArgs:
    """The common part of an MQTT load spec (``MqttRunSpec``) for ``target`` ("gateway" or "mqtt_raw")."""
    return RunArgs(host=host, port=port, root=ROOTS[target], duration=duration, warmup=warmup)


__all__ = ["Mosquitto", "mosquitto_binary", "INFLIGHT"]

INFLIGHT = 1000  # QoS 1 messages in flight per client (max_inflight_messages)


class Mosquitto(Service):
    def __init__(self, log_dir: Path, name: str = "mosquitto") -> None:
        self.log_dir = log_dir
        self.name = name
        self.host = "127.0.0.1"
        self.port = 0
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        exe = mosquitto_binary()
        if exe is None:
            raise BenchError("mosquitto not installed (apt-get install mosquitto)")
        self.port = free_port(kind=socket.SOCK_STREAM)
        conf = self.log_dir / f"{self.name}.conf"
        conf.write_text(
            mosquitto.config(
                self.port,
                self.host,
                notice=False,
                extra=f"max_queued_messages 100000\nmax_inflight_messages {INFLIGHT}\n",
            )
        )
        self.child = mosquitto.start(
            [exe, "-c", str(conf)],
            lambda cmd: Child(self.name, cmd, log_dir=self.log_dir).start(),
            self.host,
            self.port,
            timeout,
        )
        return self

    def client(self, kind: str, root: str, *args: str, name: str = "mqtt_raw") -> Child:
        """A bare MQTT client of tools/harness/bench/servers.py (``kind``: ``mqtt``, ``mqtt-ack``) behind this broker,
        answering under the topic root ``root``; returned once it is subscribed."""
        cmd = python_module_cmd(
            "tools.harness.bench.servers",
            kind,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--root",
            root,
            *args,
        )
        child = Child(name, cmd, log_dir=self.log_dir).start(stdout_pipe=True)
        try:
            child.wait_ready_line()
        except BaseException:
            child.stop()
            raise
        return child

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None
