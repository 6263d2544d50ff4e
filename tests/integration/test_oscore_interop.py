"""OSCORE end to end: the real firmware (carrier/oscore.py under the real micropython) against the real CoAP front
end wrapped by gateway/frontends/coap_security.py (aiocoap's OSCORE server) on 127.0.0.1.

Shows: protected resolve / report / config (observe + notification) with Echo recovery; a device with the wrong
key, or unknown to the keystore, can neither resolve nor report (401); a device with a valid key cannot report as
another identifier (403); unprotected requests get 4.01 in oscore mode and pass in plain mode, which is flagged;
no key (nor derived key) appears in any log line or device output. Also measures the wire and heap cost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from gateway.frontends import coap_security as cs
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.resolution import Answer, etag_of
from proto import devicemsg, identifier
from proto.records import HandleValue, Record
from tests.support.mpcollect import ROOT
from tools.commands.flash.keystore import Keystore
from tools.support.procs import micropython_binary

coapfe = pytest.importorskip("gateway.frontends.coap")

ID_A = "88.123.99/PUMP-0001-ABCD"  # 24 characters
ID_B = "88.123.99/PUMP-0002-ABCD"
ID_C = "88.123.99/PUMP-0003-ABCD"  # never provisioned
KEY_A = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY_B = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")
WRONG = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
DEVICE = ROOT / "tests" / "device" / "oscore_device.py"


class Resolver:
    """Every identifier resolves to one URL value."""

    async def resolve(
        self, handle: str, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()
    ) -> Answer:
        name = identifier.normalise(handle)
        rec = Record(name, (HandleValue(1, "URL", f"https://example.com/{name}".encode(), ttl=300),))
        return Answer(
            devicemsg.OK, name, rec, devicemsg.SOURCE_UPSTREAM, time.time() + 300, etag_of(rec, devicemsg.OK)
        )


@dataclass
class Gw:
    port: int
    registry: Registry
    security: cs.CoapSecurity
    fe: Any
    tmp: Path


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    started: list[Gw] = []

    async def start(mode: str) -> Gw:
        ks = Keystore.in_dir(tmp_path / "station")
        ks.put(ID_A, KEY_A)
        ks.put(ID_B, KEY_B)
        registry = Registry(tmp_path / "registry.sqlite3")
        fe = coapfe.CoapFrontEnd("127.0.0.1", 0, Resolver(), registry, Metrics())
        sec = cs.secure_frontend(fe, mode, ks.path, tmp_path / "gw")
        _host, port = await fe.start()
        gw = Gw(port, registry, sec, fe, tmp_path)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.fe.stop()
        gw.registry.close()


async def device(
    gw: Gw,
    ident: str,
    key: bytes,
    *actions: str,
    secure: bool = True,
    name: str = "dev",
    on_line: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the micropython device; returns {action: result line} (and "_output": all of its output)."""
    doc = {"id": ident, "coap": f"coap://127.0.0.1:{gw.port}", "key": key.hex(), "secure": secure}
    data = gw.tmp / name
    data.mkdir(exist_ok=True)
    env = dict(os.environ, MICROPYPATH=f"{ROOT / 'firmware'}:.frozen")
    proc = await asyncio.create_subprocess_exec(
        micropython_binary(),
        str(DEVICE),
        str(data),
        json.dumps(doc),
        *actions,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    results: dict[str, Any] = {}
    lines = []
    async with asyncio.timeout(60):
        while line := await proc.stdout.readline():
            text = line.decode()
            lines.append(text)
            if text.startswith("{"):
                d = json.loads(text)
                results.setdefault(d["a"], []).append(d)
                if on_line:
                    on_line(d)
        err = (await proc.stderr.read()).decode()
        await proc.wait()
    results["_output"] = "".join(lines) + err
    assert proc.returncode == 0, results["_output"]
    return results


def no_secrets(caplog: pytest.LogCaptureFixture, *outputs: str) -> None:
    """No key, and no key derived from it, in any log record or device output."""
    secrets = []
    for ident, key in ((ID_A, KEY_A), (ID_B, KEY_B), (ID_A, WRONG)):
        ctx = cs.DeviceContext(ident, key, cs.SequenceNumbers(os.devnull))
        secrets += [key, ctx.sender_key, ctx.recipient_key]
    text = "\n".join(r.getMessage() + " " + repr(r.args) for r in caplog.records) + "\n".join(outputs)
    text = text.lower()
    assert caplog.records, "logs were captured"
    for s in secrets:
        assert s.hex() not in text
        assert repr(s)[2:-1].lower() not in text


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


async def test_protected_resolve_report_config_and_notification(gateway, debug_logs) -> None:
    gw = await gateway(cs.OSCORE)
    gw.registry.set_desired_config(ID_A, interval=60)

    def on_line(d: dict[str, Any]) -> None:
        if d["a"] == "cfg_ack":  # the device observes /cfg now: change the desired config -> notification
            gw.registry.set_desired_config(ID_A, interval=120)

    r = await device(gw, ID_A, KEY_A, "resolve", "report", "cfg", "notify", on_line=on_line)
    res = r["resolve"][0]
    assert res["code"] == 1 and res["id"] == ID_A
    assert res["values"] == [[1, "URL", f"https://example.com/{ID_A}", 300]]
    assert r["report"][0]["code"] == 1
    assert [x["seq"] for x in gw.registry.recent_reports(ID_A)] == [1]
    assert r["cfg"][0]["config"]["21"] == 60 and r["cfg"][0]["observing"]
    assert r["cfg_ack"][0]["done"]
    assert r["notify"][0]["config"]["21"] == 120
    end = r["end"][0]
    assert end["auth_fail"] == 0
    # requests: resolve (+ its Echo repetition), report, cfg, cfg ack -> at least 5 sequence numbers used
    assert end["seq"] >= 5
    assert gw.security.counts["authenticated"] >= 4 and gw.security.counts["unauthenticated"] == 0
    no_secrets(debug_logs, r["_output"])


async def test_wrong_or_unknown_key_cannot_resolve_or_report(gateway, debug_logs) -> None:
    gw = await gateway(cs.OSCORE)
    wrong = await device(gw, ID_A, WRONG, "resolve", "report", name="wrong")
    unknown = await device(gw, ID_C, KEY_A, "resolve", "report", name="unknown")
    for r in (wrong, unknown):
        assert r["resolve"][0]["code"] == 401, r["resolve"]
        assert "did not authenticate" in r["resolve"][0]["msg"]
        assert r["report"][0]["code"] == 401
    assert gw.registry.recent_reports(ID_A) == [] and gw.registry.recent_reports(ID_C) == []
    assert gw.security.counts["authenticated"] == 0
    no_secrets(debug_logs, wrong["_output"], unknown["_output"])


async def test_valid_device_cannot_report_as_another(gateway, debug_logs) -> None:
    gw = await gateway(cs.OSCORE)
    # path /d/A (its own), payload claims B; then path /d/B with payload B
    r = await device(gw, ID_A, KEY_A, f"report={ID_B}", f"path={ID_B}", f"report={ID_B}", "resolve")
    assert [x["code"] for x in r["report"]] == [403, 403]
    assert r["resolve"][0]["code"] == 1  # still a valid device otherwise
    assert gw.registry.recent_reports(ID_B) == [] and gw.registry.recent_reports(ID_A) == []
    assert gw.security.counts["forbidden"] == 2
    no_secrets(debug_logs, r["_output"])


async def test_unprotected_requests_get_401_in_oscore_mode(gateway) -> None:
    gw = await gateway(cs.OSCORE)
    r = await device(gw, ID_A, KEY_A, "resolve", "report", secure=False, name="plain")
    assert r["resolve"][0]["code"] == 401 and r["report"][0]["code"] == 401
    assert gw.registry.recent_reports(ID_A) == []
    assert gw.security.counts["unauthenticated"] == 2
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        uri = f"coap://127.0.0.1:{gw.port}"
        wkc = await asyncio.wait_for(
            ctx.request(aiocoap.Message(code=Code.GET, uri=uri + "/.well-known/core")).response, 10
        )
        assert wkc.code == Code.CONTENT  # discovery stays open
        rpt = await asyncio.wait_for(
            ctx.request(aiocoap.Message(code=Code.POST, uri=f"{uri}/d/{ID_A}/rpt")).response, 10
        )
        assert rpt.code == Code.UNAUTHORIZED
    finally:
        await ctx.shutdown()
    assert gw.security.health() == {"coap_security": "oscore"}


async def test_plain_mode_for_the_factory_bench_is_flagged(gateway, debug_logs) -> None:
    gw = await gateway(cs.PLAIN)
    assert any("PLAIN" in rec.getMessage() and rec.levelno == logging.WARNING for rec in debug_logs.records)
    assert gw.security.health() == {"coap_security": cs.PLAIN_WARNING}
    assert "ida_coap_plain_mode 1" in gw.fe.metrics.render()
    plain = await device(gw, ID_A, KEY_A, "resolve", "report", secure=False, name="plain")
    assert plain["resolve"][0]["code"] == 1 and plain["report"][0]["code"] == 1
    # protected devices still work (and are still held to their own identity) on a plain gateway
    sec = await device(gw, ID_B, KEY_B, "resolve", "report", f"report={ID_A}", name="sec")
    assert sec["resolve"][0]["code"] == 1 and [x["code"] for x in sec["report"]] == [1, 403]
    assert gw.security.counts["plain"] == 2


async def test_cost_on_the_wire_and_heap(gateway, capsys) -> None:
    gw = await gateway(cs.OSCORE)
    r = await device(gw, ID_A, KEY_A, "measure", name="measure")
    m = r["measure"][0]
    plain, sec = m["plain"], m["secure"]
    with capsys.disabled():
        print(
            f"\nOSCORE cost, 24-char identifier resolve request: {plain['request_bytes']} B plain -> "
            f"{sec['request_bytes']} B protected; client heap {plain['client_heap']} B plain -> "
            f"{sec['client_heap']} B with OSCORE"
        )
    assert sec["request_bytes"] - plain["request_bytes"] <= 20
    assert sec["client_heap"] - plain["client_heap"] <= 6000
