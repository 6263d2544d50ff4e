"""A Mosquitto broker for a benchmark run: loopback listener on a free port, anonymous, no persistence."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType

from tools.bench.procs import BenchError, Child, free_port

__all__ = ["Mosquitto", "mosquitto_binary"]


def mosquitto_binary() -> str | None:
    env = os.environ.get("IDA_MOSQUITTO")
    for cand in (env, "/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if cand and Path(cand).exists():
            return cand
    return None


class Mosquitto:
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
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\nmax_keepalive 300\n"
                        "set_tcp_nodelay true\nmax_queued_messages 100000\n")  # fmt: skip
        self.child = Child(self.name, [exe, "-c", str(conf)], log_dir=self.log_dir).start()
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive():
                raise self.child.fail("exited")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.child.stop()
                    raise self.child.fail(f"not accepting after {timeout:.0f} s") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
