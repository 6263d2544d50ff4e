"""`ida node` / tools.harness.node: the local recursive-node simulator.

The native side is checked against bytes laid out by hand from RFC 3652 and against the HANDLE.NET 7.3.1
captures in tests/vectors/handle-native: the node answers each captured request with exactly the captured
response bytes (no field differs: answers echo the request's expiration, and the sample set carries the
captured value timestamps). Then the gateway's own clients (HandleClient over UDP and TCP, RestClient)
resolve through it, with every fault knob; then `ida node` runs as a real process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import UpstreamBusy, UpstreamError, UpstreamRefused, UpstreamTimeout
from gateway.upstream.native import HandleClient
from gateway.upstream.rest import RestClient
from proto.handle import Reassembler, decode_message, decode_response, split_datagrams
from proto.records import RC_HANDLE_NOT_FOUND, RC_SUCCESS, RC_VALUES_NOT_FOUND, HandleValue
from tests.support.captures import load_capture
from tools.cli import main as ida_main
from tools.harness.node import (
    Knobs,
    NodeServer,
    NodeStats,
    RecordsError,
    RecordStore,
    parse_hostport,
    parse_records,
)
from tools.harness.node.native import NotARequest, answer, read_request
from tools.harness.node.store import SAMPLE_RECORDS, sample_records

IDA = str(Path(sys.executable).parent / "ida")
PUMP = "88.123.99/PUMP-0001"
MANY = "88.123.99/MANY-0001"
TS = "2026-11-21T22:44:41Z"  # the value timestamps of the capture (0x6b021ed9)
FAST = {"timeout": 0.4, "retries": 1, "backoff": 0.1}


FOUND_REQUEST = load_capture("capture_found.hex")[0]


# -- RFC 3652 layout, written out by hand (not through proto.handle) ------------------------------
def rfc_request(
    handle: bytes,
    *,
    request_id: int,
    expiration: int,
    types: tuple[bytes, ...] = (),
    indexes: tuple[int, ...] = (),
    opcode: int = 1,
    op_flags: int = 0x19000000,  # REC | CA | PO, as hdl-qresolver sends
    minor: int = 5,
) -> bytes:
    """Section 2.2.1 envelope (20 B), 2.2.2 header (24 B), 3.1 resolution body, 2.2.4 empty credential."""
    body = struct.pack(">I", len(handle)) + handle
    body += struct.pack(">I", len(indexes)) + b"".join(struct.pack(">I", i) for i in indexes)
    body += struct.pack(">I", len(types)) + b"".join(struct.pack(">I", len(t)) + t for t in types)
    header = struct.pack(">IIIHBBII", opcode, 0, op_flags, 0xFFFF, 0, 0, expiration, len(body))
    message = header + body + struct.pack(">I", 0)
    envelope = struct.pack(">BBHIIII", 2, minor, 0, 0, request_id, 0, len(message))
    return envelope + message


def rfc_response(data: bytes) -> dict[str, Any]:
    """Envelope and header fields of one response message, plus values (index, type, data, ttl, perms)."""
    major, minor, flags, session, rid, seq, length = struct.unpack_from(">BBHIIII", data, 0)
    opcode, code, opflags, serial, recursion, _res, expiration, body_len = struct.unpack_from(
        ">IIIHBBII", data, 20
    )
    out: dict[str, Any] = dict(
        version=(major, minor),
        flags=flags,
        request_id=rid,
        sequence=seq,
        length=length,
        opcode=opcode,
        code=code,
        op_flags=opflags,
        serial=serial,
        expiration=expiration,
    )
    pos = 44
    if code != 1 or seq != 0 or length + 20 != len(data):
        return out

    def blob() -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4 + n
        return data[pos - n : pos]

    out["handle"] = blob().decode()
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    values = []
    for _ in range(count):
        index, _ts, ttl_type, ttl, perms = struct.unpack_from(">IIBIB", data, pos)
        pos += 14
        vtype, vdata = blob().decode(), blob()
        (nref,) = struct.unpack_from(">I", data, pos)
        pos += 4
        assert nref == 0
        values.append((index, vtype, vdata, ttl, perms))
    out["values"] = values
    assert pos == 44 + body_len and data[pos:] == b"\0\0\0\0"  # no credential
    return out


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait(data)


async def udp_exchange(port: int, *datagrams: bytes, want: int = 1, wait: float = 1.0) -> list[bytes]:
    """Send datagrams from one socket to the node, collect up to ``want`` answers within ``wait`` s."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Collector, remote_addr=("127.0.0.1", port))
    try:
        for d in datagrams:
            transport.sendto(d)
        out: list[bytes] = []
        deadline = loop.time() + wait
        while len(out) < want:
            try:
                out.append(await asyncio.wait_for(proto.got.get(), max(0.0, deadline - loop.time())))
            except TimeoutError:
                break
        return out
    finally:
        transport.close()


@pytest.fixture
async def node() -> AsyncIterator[NodeServer]:
    n = NodeServer(handle="127.0.0.1:0", http="127.0.0.1:0", seed=7)
    await n.start()
    yield n
    await n.stop()


def port_of(node: NodeServer) -> int:
    assert node.handle_address is not None
    return node.handle_address[1]


def client(node: NodeServer, **kw: Any) -> HandleClient:
    return HandleClient("127.0.0.1", port_of(node), **{**FAST, **kw})


# ------------------------------------------------------------------------------------------------------
# wire: RFC byte layout and the HANDLE.NET captures
# ------------------------------------------------------------------------------------------------------
def test_hand_built_request_is_the_captured_request() -> None:
    req, _ = load_capture("capture_found.hex")
    assert rfc_request(b"88.123.99/PUMP-0001", request_id=0x1C77F8E5, expiration=0x6B02C7BA) == req


async def test_hand_built_request_gets_the_captured_response_byte_for_byte(node: NodeServer) -> None:
    req, (want,) = load_capture("capture_found.hex")
    built = rfc_request(b"88.123.99/PUMP-0001", request_id=0x1C77F8E5, expiration=0x6B02C7BA)
    (got,) = await udp_exchange(port_of(node), built)
    assert got == want  # every byte, timestamps and expiration included
    fields = rfc_response(got)
    assert fields["code"] == 1 and fields["op_flags"] == 0x99000000 and fields["serial"] == 1
    assert [(i, t, d) for i, t, d, _ttl, _p in fields["values"]] == [
        (1, "URL", b"https://example.com/pump/0001"),
        (2, "EMAIL", b"ops@example.com"),
        (100, "HS_ADMIN", b"\x0f\xff" + struct.pack(">I", 14) + b"0.NA/88.123.99" + struct.pack(">I", 300)),
    ]


@pytest.mark.parametrize("name", ["capture_notfound.hex", "capture_many.hex", "capture_ttl.hex"])
async def test_every_captured_exchange_is_reproduced(node: NodeServer, name: str) -> None:
    req, want = load_capture(name)
    got = await udp_exchange(port_of(node), req, want=len(want))
    assert got == want


async def test_many_arrives_in_three_datagrams_and_reassembles(node: NodeServer) -> None:
    got = await udp_exchange(
        port_of(node), rfc_request(MANY.encode(), request_id=42, expiration=1), want=4, wait=0.3
    )
    assert [len(d) for d in got] == [512, 512, 190]
    assert [struct.unpack_from(">I", d, 12)[0] for d in got] == [0, 1, 2]  # sequence numbers
    assert {struct.unpack_from(">I", d, 8)[0] for d in got} == {42}  # request id
    assert {struct.unpack_from(">I", d, 16)[0] for d in got} == {len(b"".join(got)) - 3 * 20}  # total length
    r = Reassembler(42)
    whole = [r.feed(d) for d in reversed(got)][-1]
    assert whole is not None
    fields = rfc_response(whole)
    assert len(fields["values"]) == 21 and fields["values"][-1][1] == "HS_ADMIN"


async def test_answers_echo_version_id_and_case_of_the_request(node: NodeServer) -> None:
    req = rfc_request(b"88.123.99/pump-0001", request_id=0xDEADBEEF, expiration=123, minor=1)
    (got,) = await udp_exchange(port_of(node), req)
    f = rfc_response(got)
    assert (f["version"], f["request_id"], f["expiration"], f["code"]) == ((2, 1), 0xDEADBEEF, 123, 1)
    assert f["handle"] == "88.123.99/pump-0001"


async def test_type_and_index_filters(node: NodeServer) -> None:
    port = port_of(node)
    (by_type,) = await udp_exchange(
        port, rfc_request(PUMP.encode(), request_id=1, expiration=0, types=(b"email",))
    )
    assert [v[:2] for v in rfc_response(by_type)["values"]] == [(2, "EMAIL")]
    (both,) = await udp_exchange(
        port, rfc_request(PUMP.encode(), request_id=2, expiration=0, types=(b"URL",), indexes=(100,))
    )
    assert [v[0] for v in rfc_response(both)["values"]] == [1, 100]
    (none,) = await udp_exchange(port, rfc_request(PUMP.encode(), request_id=3, expiration=0, types=(b"X",)))
    assert rfc_response(none)["code"] == RC_VALUES_NOT_FOUND
    assert none[44:] == b"\0\0\0\0" * 2  # empty error text, empty credential (as the captured 100)


async def test_values_not_publicly_readable_are_left_out(node: NodeServer) -> None:
    stored = node.get_record("88.123.99/VALVE-0002")
    assert stored is not None and 9 in {v.index for v in stored.values}
    async with client(node) as c:
        r = await c.resolve("88.123.99/VALVE-0002")
        assert 9 not in {v.index for v in r.values} and len(r.values) == len(stored.values) - 1
        r = await c.resolve("88.123.99/VALVE-0002", indexes=[9])
        assert r.code == RC_VALUES_NOT_FOUND


async def test_unhosted_prefix_is_301_and_other_opcodes_are_refused(node: NodeServer) -> None:
    port = port_of(node)
    (got,) = await udp_exchange(port, rfc_request(b"99.999/X", request_id=5, expiration=0))
    assert rfc_response(got)["code"] == 301
    (got,) = await udp_exchange(port, rfc_request(b"", request_id=6, expiration=0, opcode=2))
    assert rfc_response(got)["code"] == 5  # OC_GET_SITEINFO: operation not supported
    bad_body = bytearray(rfc_request(PUMP.encode(), request_id=7, expiration=0))
    bad_body[47] = 0xFF  # handle length far beyond the body
    (got,) = await udp_exchange(port, bytes(bad_body))
    f = rfc_response(got)
    assert (f["code"], f["request_id"]) == (4, 7)  # RC_PROTOCOL_ERROR to the right request
    async with client(node) as c:
        with pytest.raises(UpstreamRefused) as e:
            await c.resolve("99.999/X")
        assert e.value.code == 301


async def test_garbage_and_responses_are_dropped_and_counted(node: NodeServer) -> None:
    req, (resp,) = load_capture("capture_found.hex")
    got = await udp_exchange(port_of(node), b"\x00" * 7, b"\x09" * 60, resp, want=1, wait=0.2)
    assert got == []
    assert node.stats.dropped["malformed"] == 3
    assert await udp_exchange(port_of(node), req) == [resp]  # still serving


async def test_multi_datagram_request_is_reassembled(node: NodeServer) -> None:
    types = tuple(f"TYPE-{i:03d}".encode() for i in range(60)) + (b"URL",)
    req = rfc_request(PUMP.encode(), request_id=77, expiration=0, types=types)
    pieces = split_datagrams(req, set_tc=True)
    assert len(pieces) > 1
    (got,) = await udp_exchange(port_of(node), *reversed(pieces))
    assert [v[1] for v in rfc_response(got)["values"]] == ["URL"]
    assert node.stats.requests["udp"] == 1


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120) | st.builds(lambda b: FOUND_REQUEST[:44] + b, st.binary(max_size=60)))
def test_any_bytes_give_an_answer_or_a_drop(data: bytes) -> None:
    store = RecordStore(sample_records())
    try:
        incoming = read_request(data)
    except NotARequest:
        return
    out = answer(store, incoming)
    decode_response(decode_message(out.data))  # always a well-formed response


# ------------------------------------------------------------------------------------------------------
# the gateway's clients through the node, and the knobs
# ------------------------------------------------------------------------------------------------------
PUMP_VALUES = [
    (1, "URL", b"https://example.com/pump/0001", 86400),
    (2, "EMAIL", b"ops@example.com", 86400),
]


def brief(values: tuple[HandleValue, ...]) -> list[tuple[int, str, bytes, int]]:
    return [(v.index, v.type, v.data, v.ttl) for v in values if v.type != "HS_ADMIN"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_handle_client_resolves_pump(node: NodeServer, transport: str) -> None:
    async with client(node, transport=transport) as c:
        r = await c.resolve(PUMP)
        assert r.code == RC_SUCCESS and brief(r.values) == PUMP_VALUES
        assert (await c.resolve("88.123.99/NOPE")).code == RC_HANDLE_NOT_FOUND
    assert node.stats.requests[transport] == 2 and node.stats.answers[1] == 1 and node.stats.answers[100] == 1


async def test_handle_client_gets_many_over_udp(node: NodeServer) -> None:
    async with client(node) as c:
        r = await c.resolve(MANY)
    assert len(r.values) == 21 and node.stats.requests["tcp"] == 0 and node.stats.datagrams_sent == 3


async def test_truncate_sends_the_client_to_tcp(node: NodeServer) -> None:
    node.knobs.truncate = True
    (tc,) = await udp_exchange(port_of(node), load_capture("capture_found.hex")[0])
    assert struct.unpack_from(">H", tc, 2)[0] & 0x2000 and len(tc) == 48  # TC set, header + credential only
    async with client(node) as c:
        r = await c.resolve(PUMP)
    assert brief(r.values) == PUMP_VALUES
    assert node.stats.truncated == 2 and node.stats.requests["tcp"] == 1


async def test_silent_times_out_then_answers_again(node: NodeServer) -> None:
    node.set_silent(True)
    async with client(node, timeout=0.2) as c:
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await c.resolve(PUMP)  # UDP silent, then TCP silent
        assert time.monotonic() - t0 >= 0.4
        assert node.toggle_silent() is False
        assert (await c.resolve(PUMP)).code == RC_SUCCESS
    async with RestClient(node.http_url, timeout=0.2) as rc:
        node.set_silent(True)
        with pytest.raises(UpstreamTimeout):
            await rc.resolve(PUMP)
    assert node.stats.dropped["silent"] >= 3


async def test_failure_error_busy_and_drop(node: NodeServer) -> None:
    async with client(node) as c, RestClient(node.http_url, timeout=0.4) as rc:
        node.knobs.failure_rate, node.knobs.failure_mode = 1.0, "error"
        for up in (c, rc):
            with pytest.raises(UpstreamRefused) as e:
                await up.resolve(PUMP)
            assert e.value.code == 2
        node.knobs.failure_rate, node.knobs.busy_rate = 0.0, 1.0
        for up in (c, rc):
            with pytest.raises(UpstreamBusy):
                await up.resolve(PUMP)
        node.knobs.failure_rate, node.knobs.busy_rate, node.knobs.failure_mode = 1.0, 0.0, "drop"
        with pytest.raises(UpstreamError):  # UDP unanswered, then the TCP connection closed unanswered
            await c.resolve(PUMP)
        with pytest.raises(UpstreamError):
            await rc.resolve(PUMP)
    async with client(node, tcp_fallback=False, retries=0) as c:
        with pytest.raises(UpstreamTimeout):
            await c.resolve(PUMP)
    assert node.stats.answers[2] == 2 and node.stats.answers[3] == 2 and node.stats.dropped["failure"] >= 4


def test_rates_are_fractions_and_validated() -> None:
    import random

    k = Knobs(failure_rate=0.3, busy_rate=0.2, failure_mode="mixed")
    rng = random.Random(1)
    fates = [k.fault(rng).value for _ in range(4000)]
    assert abs(fates.count("busy") / 4000 - 0.2) < 0.03
    assert abs((fates.count("error") + fates.count("drop")) / 4000 - 0.3) < 0.03
    assert abs(fates.count("error") - fates.count("drop")) < 150
    for bad in (
        {"failure_rate": 1.5},
        {"failure_rate": 0.6, "busy_rate": 0.6},
        {"latency": -1},
        {"failure_mode": "boom"},
    ):
        with pytest.raises(ValueError):
            Knobs(**bad)


async def test_latency_and_jitter(node: NodeServer) -> None:
    node.knobs.latency, node.knobs.jitter = 0.2, 0.02
    async with client(node, timeout=2.0, retries=0) as c, RestClient(node.http_url, timeout=2.0) as rc:
        t0 = time.monotonic()
        await asyncio.gather(*(c.resolve(PUMP) for _ in range(4)), rc.resolve(PUMP))
        took = time.monotonic() - t0
    assert 0.18 <= took < 0.7  # delayed concurrently (one after another would be >= 0.9 s)


async def test_records_change_at_run_time(node: NodeServer) -> None:
    async with client(node) as c:
        assert node.remove_record(PUMP) is True
        assert (await c.resolve(PUMP)).code == RC_HANDLE_NOT_FOUND  # prefix still hosted: 100, not 301
        node.add_record(
            {
                "handle": "88.123.99/pump-0001",
                "values": [
                    {
                        "index": 1,
                        "type": "URL",
                        "data": {"format": "string", "value": "https://example.com/v2"},
                    }
                ],
            }
        )
        r = await c.resolve(PUMP)
        assert [v.data for v in r.values] == [b"https://example.com/v2"]
        node.add_record({"handle": "88.777/NEW", "values": []})
        assert (await c.resolve("88.777/new")).code == RC_SUCCESS


# ------------------------------------------------------------------------------------------------------
# REST
# ------------------------------------------------------------------------------------------------------
async def http_get(node: NodeServer, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(node.http_url + path) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def test_rest_record_json(node: NodeServer) -> None:
    status, body = await http_get(node, "/api/handles/88.123.99/PUMP-0001")
    assert status == 200
    assert body == {
        "responseCode": 1,
        "handle": PUMP,
        "values": [
            {
                "index": 1,
                "type": "URL",
                "data": {"format": "string", "value": "https://example.com/pump/0001"},
                "ttl": 86400,
                "timestamp": TS,
            },
            {
                "index": 2,
                "type": "EMAIL",
                "data": {"format": "string", "value": "ops@example.com"},
                "ttl": 86400,
                "timestamp": TS,
            },
            {
                "index": 100,
                "type": "HS_ADMIN",
                "data": {
                    "format": "admin",
                    "value": {"handle": "0.NA/88.123.99", "index": 300, "permissions": "111111111111"},
                },
                "ttl": 86400,
                "timestamp": TS,
            },
        ],
    }


async def test_rest_errors_and_filters(node: NodeServer) -> None:
    assert await http_get(node, "/api/handles/88.123.99/NOPE") == (
        404,
        {"responseCode": 100, "handle": "88.123.99/NOPE"},
    )
    status, body = await http_get(node, "/api/handles/88.123.99/PUMP-0001?type=URL&index=2")
    assert status == 200 and [v["index"] for v in body["values"]] == [1, 2]
    assert await http_get(node, "/api/handles/88.123.99/PUMP-0001?type=NOPE") == (
        200,
        {"responseCode": 200, "handle": PUMP, "values": []},
    )
    status, body = await http_get(node, "/api/handles/99.1/X")
    assert (status, body["responseCode"]) == (404, 301)
    status, body = await http_get(node, "/api/handles/88.123.99/PUMP-0001?index=x")
    assert (status, body["responseCode"]) == (400, 2)
    status, body = await http_get(node, "/api/handles?prefix=88.123.99")
    assert status == 200 and body["totalCount"] == "10" and PUMP in body["handles"]
    status, body = await http_get(node, "/api/handles/?prefix=88.123.99&page=1&pageSize=4")
    assert len(body["handles"]) == 4


async def test_rest_client_through_the_node(node: NodeServer) -> None:
    async with RestClient(node.http_url, timeout=1.0) as rc:
        r = await rc.resolve(PUMP)
        assert brief(r.values) == PUMP_VALUES
        r = await rc.resolve("88.123.99/LINE-0001/STATION-03")  # a '/' inside the suffix
        assert r.code == RC_SUCCESS and r.values[0].data.endswith(b"/stations/03")
        r = await rc.resolve("88.123.99/MOTOR-0002", types=["NAMEPLATE_CBOR"])  # binary data as base64
        assert r.values[0].data[:1] == b"\xa3"
        assert (await rc.resolve("88.123.99/nope")).code == RC_HANDLE_NOT_FOUND
        assert (await rc.resolve(PUMP, types=["NOPE"])).code == RC_VALUES_NOT_FOUND
    assert node.stats.requests["http"] == 5


# ------------------------------------------------------------------------------------------------------
# records, options, stats
# ------------------------------------------------------------------------------------------------------
def test_sample_set() -> None:
    records = {r.handle: r for r in sample_records()}
    assert {PUMP, MANY, "88.123.99/TTL-0001"} <= set(records) and len(records) >= 8
    assert len(records[MANY].values) == 21 and records["88.123.99/TTL-0001"].values[0].ttl == 5
    for h in ("VALVE-0001", "MOTOR-0001", "LINE-0001"):
        types = {v.type for v in records[f"88.123.99/{h}"].values}
        assert {"URL", "DESC", "HS_ADMIN"} <= types


def test_sample_file_is_a_zone_file_too() -> None:
    zone = pytest.importorskip("gateway.zone")
    assert len(zone.parse_zone(json.loads(SAMPLE_RECORDS.read_text()))) == len(sample_records())


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            [{"handle": PUMP, "values": []}, {"handle": "88.1/B", "values": [{"index": 1, "data": "x"}]}],
            "entry 1 (88.1/B): value 0: value lacks 'type'",
        ),
        ([{"handle": "nope", "values": []}], "entry 0 ('nope'): bad handle"),
        (
            [
                {
                    "handle": "88.1/A",
                    "values": [{"index": 1, "type": "URL", "data": {"value": "x"}, "permissions": "11"}],
                }
            ],
            "entry 0 (88.1/A): value 0: permissions",
        ),
        ([{"handle": "88.1/A"}, {"handle": "88.1/a"}], "handle 88.1/a is given twice"),
        (
            [{"handle": "88.1/A", "values": [{"index": 1, "type": "A", "data": {"value": "x"}}] * 2}],
            "index 1 is used by two",
        ),
        ({"88.1/A": "x"}, "entry '88.1/A' (88.1/A): 'values' must be a list"),
        (3, "must be a JSON list"),
    ],
)
def test_bad_records_name_the_entry(doc: Any, message: str) -> None:
    with pytest.raises(RecordsError, match=re.escape(message)):
        parse_records(doc, "f.json")


def test_permissions_and_absolute_ttl_from_handle_json() -> None:
    (rec,) = parse_records(
        [
            {
                "handle": "88.1/A",
                "values": [
                    {
                        "index": 1,
                        "type": "SECRET",
                        "data": "s",
                        "permissions": "1100",
                        "ttl": "2030-01-01T00:00:00Z",
                    }
                ],
            }
        ],
        now=1000,
    )
    (v,) = rec.values
    assert (v.permissions, v.ttl_type, v.ttl, v.timestamp) == (0x0C, 1, 1893456000, 1000)
    store = RecordStore([rec])
    assert store.resolve("88.1/a").values == () and store.resolve("88.1/a").code == RC_SUCCESS


def test_bad_records_file_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "records.json"
    f.write_text(
        json.dumps(
            [
                {"handle": "88.1/GOOD", "values": []},
                {"handle": "88.1/BAD", "values": [{"index": "one", "type": "URL", "data": "x"}]},
            ]
        )
    )
    assert ida_main(["node", "--records", str(f), "--handle", "127.0.0.1:0", "--http", "off"]) == 2
    err = capsys.readouterr().err
    assert "records.json: entry 1 (88.1/BAD): value 0: value index must be" in err
    assert ida_main(["node", "--records", str(tmp_path / "missing.json")]) == 2
    assert "cannot read records file" in capsys.readouterr().err
    assert ida_main(["node", "--failure-rate", "1.5"]) == 2
    assert ida_main(["node", "--handle", "1.2.3.4:99999"]) == 2


def test_parse_hostport_and_stats() -> None:
    assert parse_hostport("127.0.0.1:0", 2641) == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:3641", 2641) == ("::1", 3641)
    assert parse_hostport(":8000", 1) == ("127.0.0.1", 8000)
    assert parse_hostport("2641", 1) == ("127.0.0.1", 2641)
    assert parse_hostport("localhost", 8000) == ("localhost", 8000)
    for bad in ("::1:80", "h:x", "h:70000", "[::1"):
        with pytest.raises(ValueError):
            parse_hostport(bad, 1)
    s = NodeStats()
    s.requests["udp"] += 2
    s.answers[1] += 1
    s.answers[100] += 1
    assert s.summary() == "requests udp=2; answers 1=1 100=1; dropped -; truncated 0"
    assert s.as_dict()["answers"] == {"1": 1, "100": 1}


async def test_port_in_use_is_a_node_error(node: NodeServer) -> None:
    from tools.harness.node import NodeError

    with pytest.raises(NodeError, match="cannot listen"):
        async with NodeServer(handle=node.handle_address, http=None):
            pass


# ------------------------------------------------------------------------------------------------------
# `ida node` as a real process, and `ida resolve` through it
# ------------------------------------------------------------------------------------------------------
class NodeProcess:
    def __init__(self, *args: str) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [IDA, "node", *args],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline() for _ in range(2)]
        found = [re.fullmatch(r"(handle udp\+tcp|http) listening on 127\.0\.0\.1:(\d+)\n", x) for x in lines]
        assert all(found), (lines, self.errors())
        ports = {m.group(1).split()[0]: int(m.group(2)) for m in found if m}
        self.handle_port, self.http_port = ports["handle"], ports["http"]

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def node_process() -> Iterator[NodeProcess]:
    p = NodeProcess("--handle", "127.0.0.1:0", "--http", "127.0.0.1:0")
    yield p
    if p.proc.poll() is None:
        p.proc.kill()
        p.proc.wait()
    p.stderr.close()


def udp_query(port: int, handle: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(rfc_request(handle, request_id=9, expiration=0), ("127.0.0.1", port))
        try:
            return s.recv(2048)
        except TimeoutError:
            return None


def test_ida_node_process_serves_toggles_silence_and_stops_on_sigterm(node_process: NodeProcess) -> None:
    answer_ = udp_query(node_process.handle_port, PUMP.encode())
    assert answer_ is not None and rfc_response(answer_)["code"] == 1
    os.kill(node_process.proc.pid, signal.SIGUSR1)
    time.sleep(0.2)
    assert udp_query(node_process.handle_port, PUMP.encode(), timeout=0.3) is None
    os.kill(node_process.proc.pid, signal.SIGUSR1)
    time.sleep(0.2)
    assert udp_query(node_process.handle_port, PUMP.encode()) is not None


def resolve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = ida_main(["resolve", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ida_resolve_through_ida_node(node_process: NodeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tools.commands.resolve")
    hdl = f"hdl://127.0.0.1:{node_process.handle_port}"
    http = f"http://127.0.0.1:{node_process.http_port}"
    # one real `ida resolve` process, then the same entry point in-process (the machine is shared: keep it fast)
    r = subprocess.run(
        [IDA, "resolve", PUMP, "--upstream", hdl, "--json"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    via_hdl = json.loads(r.stdout)
    assert via_hdl["responseCode"] == 1 and via_hdl["handle"] == PUMP
    assert [(v["index"], v["data"]["value"]) for v in via_hdl["values"][:2]] == [
        (1, "https://example.com/pump/0001"),
        (2, "ops@example.com"),
    ]
    code, out, _ = resolve(capsys, PUMP, "--upstream", http, "--json")
    assert code == 0 and json.loads(out) == via_hdl
    for up in (hdl, http):
        code, _, err = resolve(capsys, "88.123.99/DOES-NOT-EXIST", "--upstream", up)
        assert code != 0 and "not found" in err


def test_ida_node_exits_0_on_sigterm_and_prints_stats(node_process: NodeProcess) -> None:
    code, out = node_process.stop()
    assert code == 0
    assert re.search(r"node stats: requests .*udp=\d+.*; answers .*1=\d+", out), out


async def test_log_requests(node: NodeServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tools.harness.node")
    node.log_requests = True
    async with client(node) as c, RestClient(node.http_url, timeout=1.0) as rc:
        await c.resolve(PUMP)
        await rc.resolve("88.123.99/NOPE")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("node.request")]
    assert re.fullmatch(
        r"node\.request proto=udp peer=127\.0\.0\.1:\d+ id=[0-9a-f]{8} "
        r"handle=88\.123\.99/PUMP-0001 answer=1 values=3 fault=none ms=[\d.]+",
        lines[0],
    )
    assert "proto=http" in lines[1] and "handle=88.123.99/NOPE answer=100" in lines[1]
