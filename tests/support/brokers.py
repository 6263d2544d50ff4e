"""A real Mosquitto for tests, and a paho client that plays a device.

``Broker(workdir)`` writes a config (loopback listener on a free port, anonymous, no persistence), starts
``mosquitto -c``, and waits until the port accepts (tools/support/mosquitto.py, as the demo and the bench do). ``restart()``
stops it and starts it again on the same port (retained messages and sessions are gone, as after a real broker
restart without persistence).

``Device`` is a paho MQTT 3.1.1 client set up as docs/protocol.md says a device connects (clean session, last
will = status offline retained QoS 1, online status after CONNACK, subscribed to res/ack/cfg); received
messages are handed to an asyncio queue so async tests can await them without blocking the loop.
``with_device(front_end, device, registry)`` runs an MQTT front end with one device connected for a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from proto import devicemsg
from tools.support import mosquitto, procs
from tools.support.mosquitto import mosquitto_binary


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return procs.free_port(socket.SOCK_STREAM)


class Broker:
    """Started by tools/support/mosquitto.py as a :class:`tools.support.procs.Process`: the broker keeps the invoking
    user and gets SIGKILL when the thread that started it ends (``PR_SET_PDEATHSIG``), so a SIGKILLed pytest leaves
    no broker behind."""

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.binary = binary or mosquitto_binary() or "mosquitto"
        self.conf = self.workdir / "mosquitto.conf"
        self.logfile = self.workdir / "mosquitto.log"
        self.process: procs.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def write_config(self) -> None:
        self.conf.write_text(mosquitto.config(self.port, self.host, max_keepalive=120))

    def start(self, timeout: float = 10.0) -> None:
        self.write_config()
        mosquitto.start([self.binary, "-c", str(self.conf)], self._spawn, self.host, self.port, timeout)

    def _spawn(self, cmd: list[str]) -> Broker:
        self.process = procs.Process("mosquitto", cmd, log=self.logfile, new_session=False).start()
        self.starts += 1
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"mosquitto {why}: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Device:
    """A device's MQTT side: ``await dev.connect()``, ``dev.resolve(...)``, ``await dev.recv("res")``."""

    def __init__(
        self,
        url: str,
        identifier: str,
        *,
        will: bool = True,
        subscribe: tuple[str, ...] = ("res", "ack", "cfg"),
    ) -> None:
        from gateway.broker import parse_url

        self.identifier = identifier
        self.key = devicemsg.topic_key(identifier)
        self.address = parse_url(url)
        self._subscribe = subscribe
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, asyncio.Queue[tuple[bytes, bool]]] = {}
        self._connected = asyncio.Event()
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.key[:23], protocol=paho.MQTTv311, clean_session=True
        )
        c.reconnect_delay_set(1, 1)
        if will:
            c.will_set(
                self.topic("status"),
                devicemsg.encode("status", {"id": identifier, "online": False}),
                qos=1,
                retain=True,
            )
        # paho leaves Nagle on: a PUBACK followed by the next PUBLISH would wait for the broker's delayed ACK.
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self.client = c
        self.connects = 0

    def topic(self, leaf: str) -> str:
        return f"{devicemsg.TOPIC_ROOT}/{self.key}/{leaf}"

    def queue(self, leaf: str) -> asyncio.Queue[tuple[bytes, bool]]:
        return self.queues.setdefault(leaf, asyncio.Queue())

    async def connect(self, timeout: float = 5.0) -> None:
        self._loop = asyncio.get_running_loop()
        for leaf in ("res", "ack", "cfg"):
            self.queue(leaf)
        self.client.connect_async(self.address.host, self.address.port, keepalive=60)
        self.client.loop_start()
        await asyncio.wait_for(self._connected.wait(), timeout)

    @staticmethod
    def _on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        client.publish(
            self.topic("status"),
            devicemsg.encode("status", {"id": self.identifier, "online": True}),
            qos=1,
            retain=True,
        )
        if self._subscribe:
            client.subscribe([(self.topic(leaf), 1) for leaf in self._subscribe])
        self.connects += 1
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._connected.set)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._connected.clear)
            except RuntimeError:
                pass

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        leaf = msg.topic.rsplit("/", 1)[-1]
        q = self.queues.get(leaf)
        if q is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(q.put_nowait, (bytes(msg.payload), bool(msg.retain)))
            except RuntimeError:
                pass

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    def publish(self, leaf: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.client.publish(self.topic(leaf), payload, qos=qos, retain=retain)

    def resolve(self, token: bytes, handle: str, **extra: Any) -> None:
        self.publish("req", devicemsg.encode("resolve_request", {"token": token, "id": handle, **extra}))

    def report(self, boot: int, seq: int, **extra: Any) -> dict[str, Any]:
        fields = {
            "id": self.identifier,
            "boot": boot,
            "seq": seq,
            "uptime": 5,
            "heap": 90000,
            "rssi": -60,
            "queue": 0,
            "board": "unix",
            "fw": "0.1.0",
            **extra,
        }
        self.publish("rpt", devicemsg.encode("report", fields), qos=1)
        return fields

    async def recv(self, leaf: str, timeout: float = 5.0) -> tuple[bytes, bool]:
        return await asyncio.wait_for(self.queue(leaf).get(), timeout)

    async def recv_message(self, leaf: str, name: str, timeout: float = 5.0) -> dict[str, Any]:
        payload, _ = await self.recv(leaf, timeout)
        if name == "res":  # any of the answers on res
            obj = devicemsg.loads(payload)
            return {devicemsg.NAMES[k]: v for k, v in obj.items()}
        return devicemsg.decode(name, payload)

    def disconnect(self) -> None:
        """A clean DISCONNECT (no last will)."""
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (power loss): the broker publishes the last will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


@contextlib.asynccontextmanager
async def with_device(
    front_end: Any, device: Device, registry: Any, before_stop: Callable[[], object] | None = None
) -> AsyncIterator[None]:
    """``front_end`` (a gateway.frontends.mqtt.MqttFrontEnd) started and subscribed and ``device`` connected;
    afterwards ``before_stop()``, then the device disconnects, the front end stops and ``registry`` is closed."""
    await front_end.start()
    assert front_end.ready
    await device.connect()
    try:
        yield
    finally:
        if before_stop is not None:
            before_stop()
        device.disconnect()
        await front_end.stop()
        registry.close()
