"""`ida bench`: the suite runs and reports numbers (never timings asserted), and the load generator's CoAP
behaviour (token/MID matching, retransmission, separate responses, fresh source ports) is right."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proto.coap import Message, parse_header, request_template
from proto.coap.numbers import ACK, CON, CONTENT
from tools.harness.bench.loadgen import LoadGenerator, LoadSpec
from tools.harness.bench.servers import RawResponder, response_tail

IDA = str(Path(sys.executable).parent / "ida")
PATH = ("r", "88.123.99", "PUMP-0001")


def test_request_bytes() -> None:
    t = request_template(PATH)
    d = t.datagram(0xBEEF, b"\xbe\xef")
    assert (
        d
        == bytes((0x42, 0x01, 0xBE, 0xEF, 0xBE, 0xEF, 0xB1))
        + b"r"
        + b"\x09"
        + b"88.123.99"
        + b"\x09PUMP-0001"
    )
    assert parse_header(d) == (CON, 0x01, 0xBEEF, b"\xbe\xef")
    m = Message.decode(d)
    assert [v for _, v in m.options] == [b"r", b"88.123.99", b"PUMP-0001"] and m.payload == b""
    # a 14-byte segment needs the extended length byte (RFC 7252 3.1): 24-character identifier -> 34 bytes
    assert len(request_template(("r", "88.123.99", "PUMP-0001-ABCD")).datagram(1, b"\x00\x01")) == 34


class _Flaky(RawResponder):
    """Drops every ``drop_every``-th datagram; answers some requests with an empty ACK + separate CON response."""

    def __init__(self, drop_every: int = 0, separate_every: int = 0) -> None:
        super().__init__(response_tail(b"\xa1\x03\x01", b"12345678", 60))
        self.n = 0
        self.drop_every = drop_every
        self.separate_every = separate_every
        self.mids: list[tuple[Any, int]] = []
        self.acks = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        h = parse_header(data)
        assert h is not None
        if h[0] == ACK:  # the client acknowledging our separate response
            self.acks += 1
            return
        self.n += 1
        self.mids.append((addr, h[2]))
        if self.drop_every and self.n % self.drop_every == 0:
            return
        if self.separate_every and self.n % self.separate_every == 0:
            assert self.transport is not None
            self.transport.sendto(Message(ACK, 0, h[2]).encode(), addr)
            self.transport.sendto(Message(CON, CONTENT, (h[2] + 7) & 0xFFFF, h[3], (), b"x").encode(), addr)
            return
        super().datagram_received(data, addr)


async def _run(server: _Flaky, **kw: Any) -> Any:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        return await LoadGenerator(LoadSpec("127.0.0.1", port, (PATH,), **kw)).run()
    finally:
        transport.close()


async def test_loadgen_count_bounded_with_losses_and_separate_responses() -> None:
    server = _Flaky(drop_every=7, separate_every=5)
    r = await _run(server, concurrency=8, count=200, duration=None, ack_timeout=0.05, max_retransmit=4)
    assert r.ok == 200 and r.errors == 0 and r.timeouts == 0
    assert r.retransmits > 0  # dropped requests were sent again with the same Message ID
    assert server.acks > 0  # separate CON responses were acknowledged
    assert len(r.latencies_ns) == 200 and all(x > 0 for x in r.latencies_ns)
    first_sends = {m for m in server.mids}
    assert len(first_sends) == 200  # one Message ID per request, retransmissions reuse it


async def test_loadgen_duration_bounded_stops_and_rotates_source_ports() -> None:
    server = _Flaky()
    r = await _run(server, concurrency=4, duration=0.4, mid_budget=50)
    assert r.ok > 50 and r.rps > 0 and r.timeouts == 0
    assert r.endpoints >= 2  # after 50 Message IDs a fresh source port took over
    ports = {addr for addr, _ in server.mids}
    assert len(ports) >= 2
    per_port: dict[Any, list[int]] = {}
    for addr, mid in server.mids:
        per_port.setdefault(addr, []).append(mid)
    assert all(len(m) == len(set(m)) for m in per_port.values())  # no Message ID reused on one port


async def test_loadgen_times_out_against_a_silent_server() -> None:
    server = _Flaky(drop_every=1)
    r = await _run(server, concurrency=2, count=2, duration=None, ack_timeout=0.02, max_retransmit=1)
    assert r.ok == 0 and r.timeouts == 2 and r.retransmits == 2


@pytest.mark.slow
def test_ida_bench_quick_json_p1_p3(tmp_path: Path) -> None:
    """The suite end to end: real gateway and node subprocesses, the anchors, P1 and P3; numbers, not timings."""
    if shutil.which("coap-server-notls") is None:
        pytest.skip("coap-server-notls not installed (make setup installs libcoap3-bin)")
    from tools.harness.bench.procs import BenchError
    from tools.harness.bench.project import require_gateway

    try:
        require_gateway()
    except BenchError as e:
        pytest.skip(str(e))
    r = subprocess.run(
        [
            IDA,
            "bench",
            "--quick",
            "--json",
            "--only",
            "P1,P3",
            "--duration",
            "0.3",
            "-q",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    out = json.loads(r.stdout)
    assert set(out) == {"P1", "P3"}
    p1, p3 = out["P1"], out["P3"]
    for key in ("rps", "p50_ms", "p99_ms", "ratio_libcoap", "ratio_aiocoap", "ratio_raw_udp"):
        assert isinstance(p1[key], int | float) and p1[key] > 0, (key, p1)
    assert p3["upstream_requests"] >= 1
    assert isinstance(p3["miss_overhead_p50_ms"], int | float)
    assert p3["gateway_miss_p50_ms"] > 0 and p3["direct_upstream_p50_ms"] > 0
