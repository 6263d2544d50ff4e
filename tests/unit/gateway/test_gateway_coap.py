"""CoAP front end against real peers on loopback: an aiocoap client and libcoap's coap-client-notls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import AllUpstreamsFailed, UpstreamError, UpstreamTimeout
from gateway.frontends.coap import CoapFrontEnd
from gateway.frontends.common import json_etag
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.resolution import etag_of
from proto import devicemsg
from proto.records import Record
from tests.support.gwhelpers import (
    BIG,
    COAP_CLIENT,
    NEGATIVE_TTL,
    POSITIVE_TTL,
    PUMP,
    Clock,
    FakeResolver,
    coap_client,
    report_fields,
    sample_records,
)


@dataclass
class Env:
    fe: CoapFrontEnd
    base: str
    port: int
    resolver: FakeResolver
    registry: Registry
    metrics: Metrics
    clock: Clock
    client: aiocoap.Context

    async def get(
        self, path: str, *, accept: int | None = None, etags: tuple[bytes, ...] = (), blockwise: bool = True
    ) -> aiocoap.Message:
        msg = aiocoap.Message(code=Code.GET, uri=self.base + path)
        if accept is not None:
            msg.opt.accept = accept
        if etags:
            msg.opt.etags = etags
        return await asyncio.wait_for(self.client.request(msg, handle_blockwise=blockwise).response, 10)

    async def post(self, path: str, payload: bytes) -> aiocoap.Message:
        msg = aiocoap.Message(code=Code.POST, uri=self.base + path, payload=payload, content_format=60)
        return await asyncio.wait_for(self.client.request(msg).response, 10)


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[Env]:
    clock = Clock()
    resolver = FakeResolver(clock=clock)
    registry = Registry(tmp_path / "registry.sqlite3")
    metrics = Metrics()
    fe = CoapFrontEnd("127.0.0.1", 0, resolver, registry, metrics, clock=clock)
    _host, port = await fe.start()
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield Env(fe, f"coap://127.0.0.1:{port}", port, resolver, registry, metrics, clock, client)
    finally:
        await client.shutdown()
        await fe.stop()
        registry.close()


def _error(resp: aiocoap.Message) -> dict:
    assert resp.opt.content_format == 60
    return devicemsg.decode("error", resp.payload)


# -- resolution ------------------------------------------------------------------------------------------
async def test_resolve_cbor_by_default(env: Env) -> None:
    resp = await env.get(f"/r/{PUMP}")
    assert resp.code == Code.CONTENT
    assert resp.opt.content_format == 60
    body = devicemsg.decode("resolve_response", resp.payload)
    assert body["code"] == devicemsg.OK and body["id"] == PUMP and body["source"] == devicemsg.SOURCE_UPSTREAM
    assert body["values"] == [
        [1, "URL", "https://example.com/pumps/0001", POSITIVE_TTL],
        [2, "EMAIL", "service@example.com", POSITIVE_TTL],
        [3, "SERIAL", b"\x00\x01\xfe\xff", POSITIVE_TTL],
    ]
    assert "ttl" not in body and "etag" not in body  # CoAP carries them as options
    assert resp.opt.max_age == POSITIVE_TTL
    assert resp.opt.etag == etag_of(sample_records()[PUMP], devicemsg.OK)
    assert len(resp.opt.etag) == 8


async def test_resolve_json_on_accept_50(env: Env) -> None:
    resp = await env.get(f"/r/{PUMP}", accept=50)
    assert resp.code == Code.CONTENT and resp.opt.content_format == 50
    assert json.loads(resp.payload) == sample_records()[PUMP].to_rest()
    assert resp.opt.etag == json_etag(
        etag_of(sample_records()[PUMP], devicemsg.OK)
    )  # its own representation tag


async def test_prefix_case_and_suffix_slashes(env: Env) -> None:
    env.resolver.records["88.123.99/A/B/c"] = Record("88.123.99/A/B/c", sample_records()[PUMP].values)
    resp = await env.get("/r/88.123.99/A/B/c")
    assert resp.code == Code.CONTENT
    assert env.resolver.calls[-1][0] == "88.123.99/A/B/c"
    await env.get("/r/88.abc.99/PUMP-0001")
    assert env.resolver.calls[-1][0] == "88.ABC.99/PUMP-0001"


async def test_filters_from_query(env: Env) -> None:
    resp = await env.get(f"/r/{PUMP}?type=EMAIL&index=3&type=URL")
    assert resp.code == Code.CONTENT
    assert env.resolver.calls[-1] == (PUMP, ("EMAIL", "URL"), (3,))
    values = devicemsg.decode("resolve_response", resp.payload)["values"]
    assert [v[0] for v in values] == [1, 2, 3]
    resp = await env.get(f"/r/{PUMP}?index=2")
    assert [v[0] for v in devicemsg.decode("resolve_response", resp.payload)["values"]] == [2]


async def test_etag_revalidation_gives_2_03(env: Env) -> None:
    first = await env.get(f"/r/{PUMP}")
    again = await env.get(f"/r/{PUMP}", etags=(b"\x00" * 8, first.opt.etag))
    assert again.code == Code.VALID
    assert again.payload == b""
    assert again.opt.etag == first.opt.etag
    assert again.opt.max_age == POSITIVE_TTL  # the fake resolver's answers live POSITIVE_TTL from now
    # a stale tag gets the full answer
    other = await env.get(f"/r/{PUMP}", etags=(b"\x01" * 8,))
    assert other.code == Code.CONTENT and other.payload
    # the CBOR tag does not validate the JSON representation
    js = await env.get(f"/r/{PUMP}", accept=50, etags=(first.opt.etag,))
    assert js.code == Code.CONTENT
    js2 = await env.get(f"/r/{PUMP}", accept=50, etags=(js.opt.etag,))
    assert js2.code == Code.VALID


async def test_max_age_counts_down(env: Env) -> None:
    # The fake resolver answers from "its cache": fix the expiry, then move the clock.
    first = await env.get(f"/r/{PUMP}")
    expires = env.clock() + first.opt.max_age
    real_resolve = env.resolver.resolve

    async def cached(handle: str, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()):  # type: ignore[no-untyped-def]
        answer = await real_resolve(handle, types, indexes)
        return type(answer)(
            answer.code, answer.handle, answer.record, devicemsg.SOURCE_CACHE, expires, answer.etag
        )

    env.resolver.resolve = cached  # type: ignore[method-assign]
    ages = []
    for _ in range(3):
        env.clock.advance(45.7)
        ages.append((await env.get(f"/r/{PUMP}")).opt.max_age)
    assert ages == [POSITIVE_TTL - 46, POSITIVE_TTL - 92, POSITIVE_TTL - 138]
    env.clock.advance(1000)
    assert (await env.get(f"/r/{PUMP}")).opt.max_age == 0  # never negative


async def test_block2_for_a_big_record(env: Env) -> None:
    expected = devicemsg.encode(
        "resolve_response",
        {"code": 1, "id": BIG, "values": sample_records()[BIG].to_device_values(env.clock()), "source": 2},
    )
    assert len(expected) > 4 * 1024
    raw = await env.get(f"/r/{BIG}", blockwise=False)
    assert raw.code == Code.CONTENT
    assert raw.opt.block2 is not None and raw.opt.block2.more and raw.opt.block2.block_number == 0
    assert len(raw.payload) == raw.opt.block2.size <= 1024
    assert raw.opt.etag and raw.opt.max_age == POSITIVE_TTL
    full = await env.get(f"/r/{BIG}")
    assert full.payload == expected
    assert raw.payload == expected[: len(raw.payload)]
    # the resolver rendered the answer once for block 0; later blocks came from the assembled response
    assert len([c for c in env.resolver.calls if c[0] == BIG]) == 2


async def test_errors(env: Env) -> None:
    bad = await env.get("/r/88.123.99")
    assert bad.code == Code.BAD_REQUEST
    err = _error(bad)
    assert err["code"] == devicemsg.BAD_REQUEST and "NO_SEPARATOR" in err["msg"]

    missing = await env.get("/r/88.123.99/NOPE")
    assert missing.code == Code.NOT_FOUND
    assert missing.opt.max_age == NEGATIVE_TTL
    err = _error(missing)
    assert err == {
        "code": devicemsg.NOT_FOUND,
        "msg": "handle not found",
        "id": "88.123.99/NOPE",
        "ttl": NEGATIVE_TTL,
    }

    novalue = await env.get(f"/r/{PUMP}?type=NOTHING")
    assert novalue.code == Code.NOT_FOUND and _error(novalue)["code"] == devicemsg.VALUES_NOT_FOUND

    env.resolver.errors["88.1/DOWN"] = AllUpstreamsFailed({"hdl://10.0.0.1:2641": UpstreamError("refused")})
    env.resolver.errors["88.1/SLOW"] = UpstreamTimeout("no answer in 5 s")
    down = await env.get("/r/88.1/DOWN")
    assert down.code == Code.SERVICE_UNAVAILABLE and _error(down)["code"] == devicemsg.UPSTREAM_UNAVAILABLE
    assert down.opt.max_age == 0
    slow = await env.get("/r/88.1/SLOW")
    assert slow.code == Code.GATEWAY_TIMEOUT and _error(slow)["code"] == devicemsg.UPSTREAM_TIMEOUT

    badq = await env.get(f"/r/{PUMP}?index=x")
    assert badq.code == Code.BAD_REQUEST and "index" in _error(badq)["msg"]

    cf = await env.get(f"/r/{PUMP}", accept=40)
    assert cf.code == Code.NOT_ACCEPTABLE

    assert (await env.get("/nothing/here")).code == Code.NOT_FOUND


async def test_request_metrics(env: Env) -> None:
    await env.get(f"/r/{PUMP}")
    await env.get(f"/r/{PUMP}")
    await env.get("/r/88.123.99/NOPE")
    assert env.metrics.value("ida_requests_total", {"frontend": "coap", "code": "1"}) == 2
    assert env.metrics.value("ida_requests_total", {"frontend": "coap", "code": "100"}) == 1


async def test_well_known_core(env: Env) -> None:
    resp = await env.get("/.well-known/core")
    assert resp.code == Code.CONTENT and resp.opt.content_format == 40
    text = resp.payload.decode()
    assert '</r>;rt="ida.resolve"' in text and '</d>;rt="ida.device"' in text


# -- reports and config ----------------------------------------------------------------------------------
async def test_report_is_acknowledged_and_deduplicated(env: Env) -> None:
    payload = devicemsg.encode("report", report_fields(boot=3, seq=7))
    for _ in range(2):
        resp = await env.post(f"/d/{PUMP}/rpt", payload)
        assert resp.code == Code.CHANGED
        assert devicemsg.decode("report_ack", resp.payload) == {"boot": 3, "seq": 7, "code": devicemsg.OK}
    stats = env.registry.stats()
    assert stats["reports_total"] == 1 and stats["duplicates_total"] == 1
    dev = env.registry.device(PUMP)
    assert dev is not None and dev["transport"] == "coap" and dev["last_report"]["seq"] == 7
    assert dev["peer"].startswith("127.0.0.1") or "127.0.0.1" in dev["peer"]


async def test_report_ack_names_the_desired_config_version(env: Env) -> None:
    env.registry.set_desired_config(PUMP, interval=120)
    env.registry.set_desired_config(PUMP, interval=60)  # cfgver 2
    resp = await env.post(f"/d/{PUMP}/rpt", devicemsg.encode("report", report_fields(boot=4, seq=1)))
    assert devicemsg.decode("report_ack", resp.payload) == {
        "boot": 4,
        "seq": 1,
        "code": devicemsg.OK,
        "cfgver": 2,
    }
    env.registry.clear_desired_config(PUMP)
    resp = await env.post(f"/d/{PUMP}/rpt", devicemsg.encode("report", report_fields(boot=4, seq=2)))
    assert devicemsg.decode("report_ack", resp.payload) == {"boot": 4, "seq": 2, "code": devicemsg.OK}


async def test_report_for_another_device_is_forbidden(env: Env) -> None:
    resp = await env.post("/d/88.123.99/OTHER/rpt", devicemsg.encode("report", report_fields()))
    assert resp.code == Code.FORBIDDEN and _error(resp)["code"] == devicemsg.FORBIDDEN
    assert env.registry.stats()["reports_total"] == 0


async def test_bad_reports(env: Env) -> None:
    assert (await env.post(f"/d/{PUMP}/rpt", b"\xff\x00")).code == Code.BAD_REQUEST
    no_seq = {k: v for k, v in report_fields().items() if k != "seq"}
    resp = await env.post(
        f"/d/{PUMP}/rpt", devicemsg.dumps({devicemsg.KEYS[k]: v for k, v in no_seq.items()})
    )
    assert resp.code == Code.BAD_REQUEST and "seq" in _error(resp)["msg"]
    assert (
        await env.post("/d/88.123.99/rpt", devicemsg.encode("report", report_fields()))
    ).code == Code.BAD_REQUEST
    msg = aiocoap.Message(code=Code.GET, uri=f"{env.base}/d/{PUMP}/rpt")
    assert (await env.client.request(msg).response).code == Code.METHOD_NOT_ALLOWED
    assert (await env.post(f"/d/{PUMP}/nope", b"")).code == Code.NOT_FOUND
    huge = await env.post(f"/d/{PUMP}/rpt", devicemsg.encode("report", report_fields(boot=2**63)))
    assert (
        huge.code == Code.BAD_REQUEST and "boot" in _error(huge)["msg"]
    )  # refused by the registry, not a 5.00


async def test_config_fetch_ack_and_observe(env: Env) -> None:
    missing = await env.get(f"/d/{PUMP}/cfg")
    assert missing.code == Code.NOT_FOUND and _error(missing)["code"] == devicemsg.NOT_FOUND

    first = env.registry.set_desired_config(PUMP, interval=60)
    resp = await env.get(f"/d/{PUMP}/cfg")
    assert resp.code == Code.CONTENT
    assert devicemsg.decode("config", resp.payload) == {"cfgver": first["cfgver"], "interval": 60}

    obs_req = env.client.request(aiocoap.Message(code=Code.GET, uri=f"{env.base}/d/{PUMP}/cfg", observe=0))
    initial = await asyncio.wait_for(obs_req.response, 10)
    assert initial.opt.observe is not None
    assert devicemsg.decode("config", initial.payload)["cfgver"] == first["cfgver"]
    notifications = obs_req.observation.__aiter__()
    second = env.registry.set_desired_config(PUMP, meta={"URL": "https://example.com/new"})
    note = await asyncio.wait_for(notifications.__anext__(), 10)
    assert devicemsg.decode("config", note.payload) == {
        "cfgver": second["cfgver"],
        "interval": 60,
        "meta": {"URL": "https://example.com/new"},
    }
    assert env.fe.devices.observers(PUMP) == 1
    obs_req.observation.cancel()

    ack = devicemsg.encode("config_ack", {"id": PUMP, "cfgver": second["cfgver"], "code": devicemsg.OK})
    resp = await env.post(f"/d/{PUMP}/cfg", ack)
    assert resp.code == Code.CHANGED
    dev = env.registry.device(PUMP)
    assert dev is not None and dev["config"]["acked_cfgver"] == second["cfgver"]
    assert dev["config"]["state"] == "applied"


# -- shutdown --------------------------------------------------------------------------------------------
async def test_stop_answers_requests_in_flight(env: Env) -> None:
    gate = env.resolver.gates.setdefault(PUMP, asyncio.Event())
    pending = asyncio.ensure_future(env.get(f"/r/{PUMP}"))
    for _ in range(200):
        if env.fe.in_flight:
            break
        await asyncio.sleep(0.01)
    assert env.fe.in_flight == 1
    stopping = asyncio.ensure_future(env.fe.stop(timeout=10))
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waiting for the request in flight
    late = await env.get("/r/88.1/LATE")
    assert late.code == Code.SERVICE_UNAVAILABLE  # not accepting new work
    gate.set()
    resp = await pending
    assert resp.code == Code.CONTENT
    await asyncio.wait_for(stopping, 10)


# -- libcoap -----------------------------------------------------------------------------------------------
@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls (libcoap3-bin) not installed")
async def test_libcoap_client_json(env: Env) -> None:
    rc, out, err = await coap_client("-m", "get", "-A", "50", f"coap://127.0.0.1:{env.port}/r/{PUMP}")
    assert rc == 0, err
    assert json.loads(out) == sample_records()[PUMP].to_rest()


@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls (libcoap3-bin) not installed")
async def test_libcoap_client_block2_and_report(env: Env, tmp_path) -> None:
    rc, out, err = await coap_client("-m", "get", "-A", "50", f"coap://127.0.0.1:{env.port}/r/{BIG}")
    assert rc == 0, err
    body = json.loads(out)
    assert len(out) > 8 * 1024 and len(body["values"]) == 100

    payload = tmp_path / "report.cbor"
    payload.write_bytes(devicemsg.encode("report", report_fields(boot=9, seq=1)))
    for _ in range(2):
        rc, out, err = await coap_client(
            "-m", "post", "-t", "60", "-f", str(payload), f"coap://127.0.0.1:{env.port}/d/{PUMP}/rpt"
        )
        assert rc == 0, err
        # coap-client prints the payload and a newline
        assert devicemsg.decode("report_ack", out.removesuffix(b"\n")) == {"boot": 9, "seq": 1, "code": 1}
    assert env.registry.stats()["reports_total"] == 1


# -- the 2.05 payload: written out by devicemsg.encode_resolve_response, the bytes of the general encoder ---------
_ints = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, 2**64, -1, -(2**64)]),
    st.booleans(),
)
_texts = st.one_of(st.text(max_size=30), st.sampled_from(["", "x" * 23, "x" * 24, "é" * 200, "\ud800", "𝄞"]))
_value = st.one_of(
    st.lists(st.one_of(_ints, _texts, st.binary(max_size=300)), min_size=4, max_size=4),
    st.tuples(_ints, _texts, st.one_of(_texts, st.binary(max_size=300)), _ints).map(list),
    st.lists(_ints, max_size=5),
)


def _wire_or_error(code: object, ident: object, values: object, source: object) -> object:
    try:
        return devicemsg.encode(
            "resolve_response", {"code": code, "id": ident, "values": values, "source": source}
        )
    except Exception as e:  # the same failure both ways
        return type(e)


@settings(max_examples=300, deadline=None)
@given(_ints, _texts, st.lists(_value, max_size=5), st.one_of(st.integers(-1, 5), st.booleans()))
def test_resolve_payload_is_wires_encoding(
    code: int, ident: str, values: list[list[object]], source: int
) -> None:
    want = _wire_or_error(code, ident, values, source)
    try:
        got: object = devicemsg.encode_resolve_response(
            {"code": code, "id": ident, "values": values, "source": source}
        )
    except Exception as e:
        got = type(e)
    assert got == want


def test_resolve_payload_of_real_records() -> None:
    for rec in sample_records().values():
        values = rec.to_device_values(0.0)
        for source in (devicemsg.SOURCE_UPSTREAM, devicemsg.SOURCE_CACHE):
            fields = {"code": devicemsg.OK, "id": rec.handle, "values": values, "source": source}
            assert devicemsg.encode_resolve_response(fields) == devicemsg.dumps(
                {devicemsg.KEYS[k]: v for k, v in fields.items()}
            )
