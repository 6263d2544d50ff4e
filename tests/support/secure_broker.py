"""A real Mosquitto configured by ``ida broker config`` (TLS, password files, ACL), and paho clients for it.

``SecureBroker(workdir, data_dir)`` makes a test CA and server certificate (for 127.0.0.1 and localhost), runs
:func:`tools.commands.broker.generate` over the keystore in ``data_dir`` and starts ``mosquitto -c`` on the generated
``mosquitto.conf`` (plus test-only lines: no persistence, log to a file). Ports: ``port`` = device TLS listener,
``service_port`` = gateway TLS listener, ``plain_port`` = the INSECURE bench listener (``plain=True`` only).
Adding devices to the keystore and calling ``reload()`` regenerates the files and SIGHUPs the broker.
The plain fixture of tests/support/brokers.py is left as it is.
"""

from __future__ import annotations

import queue
import signal
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.brokers import Broker, free_port
from tools.commands import broker as bc
from tools.support import mosquitto

GATEWAY = "ida-gw"


class SecureBroker(Broker):
    def __init__(
        self,
        workdir: Path,
        data_dir: Path,
        *,
        plain: bool = False,
        acl_mode: str = "explicit",
        outbox_topics: tuple[str, ...] = (),
        tls: bc.TlsFiles | None = None,
    ) -> None:
        super().__init__(workdir)
        self.data_dir = Path(data_dir)
        self.service_port = free_port()
        self.plain_port = free_port() if plain else None
        self.acl_mode = acl_mode
        self.outbox_topics = outbox_topics
        self.tls = tls or bc.make_certs(self.workdir / "tls", ["127.0.0.1", "localhost"])
        self.out = self.workdir / "generated"
        self.generated: bc.Generated | None = None

    @property
    def url(self) -> str:  # the device listener
        return f"mqtts://{self.host}:{self.port}"

    @property
    def gateway_url(self) -> str:
        return f"mqtts://{self.host}:{self.service_port}"

    @property
    def ca(self) -> Path:
        return self.tls.ca

    def gateway_password(self, name: str = GATEWAY) -> str:
        return bc.gateway_secret(self.out, name).read_text().strip()

    def write_config(self) -> None:
        self.generated = bc.generate(
            self.data_dir,
            self.out,
            tls=self.tls,
            port=self.port,
            bind=self.host,
            service_port=self.service_port,
            service_bind=self.host,
            broker_host=self.host,
            plain_port=self.plain_port,
            acl_mode=self.acl_mode,
            outbox_topics=self.outbox_topics,
        )
        generated = (self.out / bc.CONF_FILE).read_text()
        # as root, Mosquitto would drop to user "mosquitto", which cannot read the 0600 password files
        self.conf.write_text(
            generated + "\n# test only\n" + mosquitto.keep_user() + "persistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nset_tcp_nodelay true\n"
        )

    def reload(self) -> None:
        """Regenerate from the keystore and let Mosquitto re-read its password files and ACL (SIGHUP)."""
        self.write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)


class Client:
    """A paho client with credentials, TLS against ``ca`` when given; messages land in ``messages``."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        *,
        ca: Path | None = None,
        client_id: str = "",
        topics: tuple[str, ...] = (),
        v5: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        proto = paho.MQTTv5 if v5 else paho.MQTTv311
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
        if username is not None:
            self.c.username_pw_set(username, password)
        if ca is not None:
            self.c.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        self.topics = topics
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: Any = None
        self.subacks: list[list[str]] = []
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subacks.append([str(r) for r in rcs])
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.c.on_disconnect = lambda *a: self.connected.clear()
        self.c.connect_async(host, port, 30)
        self.c.loop_start()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connack = rc
        self.answered.set()
        if rc.is_failure:
            c.disconnect()  # do not retry with credentials that were refused
            return
        if self.topics:
            c.subscribe([(t, 1) for t in self.topics])
        self.connected.set()

    def wait(self, timeout: float = 10.0) -> Any:
        """The CONNACK reason code."""
        assert self.answered.wait(timeout), "no CONNACK"
        return self.connack

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(5)

    def drain(self, seconds: float) -> list[tuple[str, bytes]]:
        """Everything that arrives within ``seconds``."""
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return out

    def get(self, timeout: float = 5.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
