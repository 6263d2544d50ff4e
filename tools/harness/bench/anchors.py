"""Anchors: reference servers started in the same run as the project's figure, each in its own process.

    shape = ResponseShape(payload, etag, max_age)      # copied from the gateway's own answer
    with Anchors(shape, path, log_dir) as anchors:     # starts raw_udp, aiocoap, libcoap
        for t in anchors.targets: ...                  # Target(name, label, host, port, paths, child)
        anchors.missing                                # {name: why} for an anchor that could not start

* ``raw_udp``  -- :class:`tools.harness.bench.servers.RawResponder`: the Python ceiling (asyncio, one datagram per
  event-loop iteration).
* ``raw_udp_drain`` -- the same, draining the socket after each wake-up: the ceiling for batched reads.
* ``aiocoap``  -- a plain aiocoap resource with the same payload.
* ``libcoap``  -- ``coap-server-notls`` (libcoap's example server, C) with ``-d``: the benchmark PUTs the same
  payload (Content-Format 60) at the same path, creating a dynamic resource, so the request bytes are identical
  and the answer carries the same payload (libcoap adds no ETag/Max-Age: 11 bytes shorter).
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from proto.coap import Message, MessageError, uint_value
from proto.coap.numbers import CON, GET, PUT, ContentFormat, Option
from tools.harness.bench.procs import BenchError, Child, Service, free_port, python_module_cmd

__all__ = ["ANCHOR_NAMES", "Anchors", "ResponseShape", "Target", "coap_request", "LIBCOAP_SERVER"]

LIBCOAP_SERVER = "coap-server-notls"
ANCHOR_NAMES = ("raw_udp", "raw_udp_drain", "aiocoap", "libcoap")
LABELS = {
    "raw_udp": "raw asyncio UDP responder (Python ceiling)",
    "raw_udp_drain": "raw asyncio UDP responder, batched reads (Python ceiling, batched)",
    "aiocoap": "plain aiocoap resource",
    "libcoap": "coap-server-notls (libcoap, C)",
}


@dataclass(frozen=True)
class ResponseShape:
    """What every anchor answers with."""

    payload: bytes
    etag: bytes | None = None
    max_age: int | None = None


@dataclass
class Target:
    """Something the load generator can be pointed at."""

    name: str
    label: str
    host: str
    port: int
    paths: tuple[tuple[str, ...], ...]
    child: Child | None = None
    notes: list[str] = field(default_factory=list)


def coap_request(
    host: str,
    port: int,
    path: tuple[str, ...],
    *,
    code: int = GET,
    payload: bytes = b"",
    options: tuple[tuple[int, bytes], ...] = (),
    timeout: float = 1.0,
    attempts: int = 3,
) -> tuple[int, list[tuple[int, bytes]], bytes]:
    """One blocking confirmable request (for setup and probes, not for load). Returns (code, options, payload);
    TimeoutError when nothing answers."""
    opts = tuple([(int(Option.URI_PATH), s.encode()) for s in path] + list(options))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.settimeout(timeout)
        for attempt in range(attempts):
            mid = (int(time.monotonic_ns()) + attempt) & 0xFFFF
            token = mid.to_bytes(2, "big") + b"pr"
            s.send(Message(CON, code, mid, token, opts, payload).encode())
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                try:
                    data = s.recv(65535)
                except (TimeoutError, ConnectionRefusedError):
                    break
                try:
                    answer = Message.decode(data)
                except MessageError:
                    continue
                if answer.token == token:
                    return answer.code, list(answer.options), answer.payload
    raise TimeoutError(f"no CoAP answer from {host}:{port}")


def wait_coap(host: str, port: int, path: tuple[str, ...], child: Child | None, timeout: float = 20.0) -> int:
    """Poll with GETs until the server answers (any code); returns the code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise child.fail(f"exited with {child.proc.returncode if child.proc else '?'}")
        try:
            return coap_request(host, port, path, timeout=0.3, attempts=1)[0]
        except TimeoutError:
            time.sleep(0.05)
    raise (child.fail("no CoAP answer") if child else BenchError(f"no CoAP answer from {host}:{port}"))


def start_raw(shape: ResponseShape, path: tuple[str, ...], log_dir: Path, host: str = "127.0.0.1") -> Target:
    return _start_py("raw", "raw_udp", shape, path, log_dir, host)


def start_raw_drain(
    shape: ResponseShape, path: tuple[str, ...], log_dir: Path, host: str = "127.0.0.1"
) -> Target:
    return _start_py("raw-drain", "raw_udp_drain", shape, path, log_dir, host)


def start_aiocoap(
    shape: ResponseShape, path: tuple[str, ...], log_dir: Path, host: str = "127.0.0.1"
) -> Target:
    return _start_py("aiocoap", "aiocoap", shape, path, log_dir, host)


def _start_py(
    kind: str, name: str, shape: ResponseShape, path: tuple[str, ...], log_dir: Path, host: str
) -> Target:
    args = [
        "--host",
        host,
        "--port",
        "0",
        "--payload",
        shape.payload.hex(),
        "--etag",
        (shape.etag or b"").hex(),
    ]
    if shape.max_age is not None:
        args += ["--max-age", str(shape.max_age)]
    child = Child(name, python_module_cmd("tools.harness.bench.servers", kind, *args), log_dir=log_dir).start(
        stdout_pipe=True
    )
    try:
        port = child.wait_ready_line()
        wait_coap(host, port, path, child)
    except BaseException:
        child.stop()
        raise
    return Target(name, LABELS[name], host, port, (path,), child)


def start_libcoap(
    shape: ResponseShape, path: tuple[str, ...], log_dir: Path, host: str = "127.0.0.1"
) -> Target:
    exe = shutil.which(LIBCOAP_SERVER)
    if exe is None:
        raise BenchError(f"{LIBCOAP_SERVER} not installed (apt-get install libcoap3-bin)")
    port = free_port(also_tcp=True, host=host)
    child = Child("libcoap", [exe, "-A", host, "-p", str(port), "-d", "4"], log_dir=log_dir).start()
    try:
        wait_coap(host, port, (), child)
        code, _, _ = coap_request(
            host,
            port,
            path,
            code=PUT,
            payload=shape.payload,
            options=((Option.CONTENT_FORMAT, uint_value(ContentFormat.CBOR)),),
        )
        if code not in (0x41, 0x44):  # 2.01 Created, 2.04 Changed
            raise child.fail(f"PUT of the payload answered {code >> 5}.{code & 31:02d}")
        code, _, body = coap_request(host, port, path)
        if code != 0x45 or body != shape.payload:
            raise child.fail("GET after PUT did not return the payload")
    except BaseException:
        child.stop()
        raise
    return Target(
        "libcoap",
        LABELS["libcoap"],
        host,
        port,
        (path,),
        child,
        notes=["same request bytes; dynamic resource created by PUT; answer has no ETag/Max-Age"],
    )


STARTERS = {
    "raw_udp": start_raw,
    "raw_udp_drain": start_raw_drain,
    "aiocoap": start_aiocoap,
    "libcoap": start_libcoap,
}


class Anchors(Service):
    """Start the named anchors (all by default); an anchor that cannot start is listed in ``missing``."""

    def __init__(
        self,
        shape: ResponseShape,
        path: tuple[str, ...],
        log_dir: Path,
        names: tuple[str, ...] = ANCHOR_NAMES,
    ) -> None:
        self.shape = shape
        self.path = path
        self.log_dir = log_dir
        self.names = names
        self.targets: list[Target] = []
        self.missing: dict[str, str] = {}

    def start(self) -> Anchors:
        for name in self.names:
            try:
                self.targets.append(STARTERS[name](self.shape, self.path, self.log_dir))
            except BenchError as e:
                self.missing[name] = str(e)
        return self

    def stop(self) -> None:
        for t in self.targets:
            if t.child is not None:
                t.child.stop()
