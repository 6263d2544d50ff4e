"""HTTP front end with a real aiohttp client on loopback: Handle REST, devices API, /healthz, /metrics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.errors import AllUpstreamsFailed, NameNotServed, UpstreamRefused, UpstreamTimeout
from gateway.frontends.http import HttpFrontEnd
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.service import Gateway
from tests.support.gwhelpers import (
    PUMP,
    Clock,
    FakeResolver,
    RestNode,
    http_base,
    loopback_config,
    report_fields,
    sample_records,
)
from tools import cli


@dataclass
class Env:
    fe: HttpFrontEnd
    base: str
    resolver: FakeResolver
    registry: Registry
    metrics: Metrics
    session: aiohttp.ClientSession


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = Clock()
    resolver = FakeResolver(clock=clock)
    registry = Registry(tmp_path / "registry.sqlite3")
    metrics = Metrics()
    fe = HttpFrontEnd(
        "127.0.0.1", 0, resolver, registry, metrics, clock=clock, health=lambda: {"coap": "listening"}
    )
    _host, port = await fe.start()
    async with aiohttp.ClientSession() as session:
        try:
            yield Env(fe, f"http://127.0.0.1:{port}", resolver, registry, metrics, session)
        finally:
            await fe.stop()
            registry.close()


# -- Handle REST -----------------------------------------------------------------------------------------
async def test_handle_rest_json(env: Env) -> None:
    async with env.session.get(f"{env.base}/api/handles/{PUMP}") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.json() == sample_records()[PUMP].to_rest()
        assert r.headers["Cache-Control"] == "max-age=300"
        etag = r.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{16}"', etag)
    async with env.session.get(f"{env.base}/api/handles/{PUMP}", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
        assert r.headers["ETag"] == etag


async def test_handle_rest_filters(env: Env) -> None:
    async with env.session.get(f"{env.base}/api/handles/{PUMP}?type=URL&index=2") as r:
        body = await r.json()
    assert [v["index"] for v in body["values"]] == [1, 2]
    assert env.resolver.calls[-1] == (PUMP, ("URL",), (2,))
    # Handle.Net answers "values not found" with HTTP 200 and responseCode 200
    async with env.session.get(f"{env.base}/api/handles/{PUMP}?type=NOTHING") as r:
        assert r.status == 200
        assert await r.json() == {"responseCode": 200, "handle": PUMP}


async def test_handle_rest_errors(env: Env) -> None:
    async with env.session.get(f"{env.base}/api/handles/88.123.99/NOPE") as r:
        assert r.status == 404
        assert await r.json() == {"responseCode": 100, "handle": "88.123.99/NOPE"}
        assert r.headers["Cache-Control"] == "max-age=60"
    async with env.session.get(f"{env.base}/api/handles/no-slash") as r:
        assert r.status == 400
        body = await r.json()
        assert body["responseCode"] == 102 and "NO_SEPARATOR" in body["message"]
    async with env.session.get(f"{env.base}/api/handles/{PUMP}?index=-1") as r:
        assert r.status == 400 and (await r.json())["responseCode"] == 2
    env.resolver.errors["88.1/DOWN"] = AllUpstreamsFailed({})
    env.resolver.errors["88.1/SLOW"] = UpstreamTimeout("5 s")
    async with env.session.get(f"{env.base}/api/handles/88.1/DOWN") as r:
        assert r.status == 503 and (await r.json())["responseCode"] == 2
    async with env.session.get(f"{env.base}/api/handles/88.1/SLOW") as r:
        assert r.status == 504 and (await r.json())["responseCode"] == 2
    # every node said it does not serve the prefix (301): an answer about the name, not an outage
    env.resolver.errors["99.9/X"] = NameNotServed("99.9/X", {"n": UpstreamRefused("no", "n", code=301)})
    async with env.session.get(f"{env.base}/api/handles/99.9/X") as r:
        body = await r.json()
        assert r.status == 404 and body["responseCode"] == 2 and "prefix 99.9" in body["message"]
    assert env.metrics.value("ida_requests_total", {"frontend": "http", "code": "503"}) == 1


# -- devices and remote management -----------------------------------------------------------------------
async def test_devices_api(env: Env) -> None:
    async with env.session.get(f"{env.base}/api/devices") as r:
        assert r.status == 200 and await r.json() == {"devices": []}
    env.registry.record_report(PUMP, report_fields(boot=2, seq=5), "coap", "127.0.0.1:5683")
    async with env.session.get(f"{env.base}/api/devices") as r:
        devices = (await r.json())["devices"]
    assert [d["id"] for d in devices] == [PUMP]
    async with env.session.get(f"{env.base}/api/devices/88.123.99/PUMP-0001") as r:
        dev = await r.json()
    assert dev["last_report"]["seq"] == 5 and dev["board"] == "esp32-devkitc"
    async with env.session.get(f"{env.base}/api/devices/88.123.99/UNKNOWN") as r:
        assert r.status == 404
    async with env.session.get(f"{env.base}/api/devices/bad") as r:
        assert r.status == 400


async def test_set_desired_config_over_http(env: Env) -> None:
    url = f"{env.base}/api/devices/{PUMP}/config"
    async with env.session.put(url, json={"interval": 120, "meta": {"URL": "https://example.com/x"}}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["id"] == PUMP and body["config"]["interval"] == 120 and body["config"]["cfgver"] >= 1
    assert env.registry.desired_config(PUMP) == body["config"]
    async with env.session.post(url, json={"interval": 5}) as r:
        assert r.status == 400 and "10-86400" in (await r.json())["error"]
    async with env.session.put(url, json={"colour": "red"}) as r:
        assert r.status == 400 and "colour" in (await r.json())["error"]
    async with env.session.put(url, data=b"{not json") as r:
        assert r.status == 400
    big = {f"TYPE{i}": "x" * 100 for i in range(40)}  # more than a device is asked to hold
    async with env.session.put(url, json={"meta": big}) as r:
        assert r.status == 400 and "bytes" in (await r.json())["error"]


async def test_devices_cli_talks_to_the_http_api(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.registry.record_report(PUMP, report_fields(), "mqtt")
    rc = await asyncio.to_thread(
        cli.main,
        [
            "devices",
            "--gateway",
            env.base,
            "config",
            PUMP,
            "--interval",
            "90",
            "--meta",
            "URL=https://example.com/p",
        ],
    )
    assert rc == 0
    assert "cfgver=1 interval=90" in capsys.readouterr().out
    assert env.registry.desired_config(PUMP) == {
        "cfgver": 1,
        "interval": 90,
        "meta": {"URL": "https://example.com/p"},
    }
    rc = await asyncio.to_thread(cli.main, ["devices", "--gateway", env.base])
    out = capsys.readouterr().out
    assert rc == 0 and PUMP in out and "config=pending" in out
    rc = await asyncio.to_thread(cli.main, ["devices", "--gateway", env.base, "show", "88.123.99/NONE"])
    assert rc == 1
    rc = await asyncio.to_thread(
        cli.main, ["devices", "--gateway", env.base, "config", PUMP, "--interval", "1"]
    )
    assert rc == 2 and "10-86400" in capsys.readouterr().err


def test_devices_cli_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["devices", "--gateway", "http://127.0.0.1:9", "--timeout", "2"])
    assert rc == 3 and "not reachable" in capsys.readouterr().err


# -- health and metrics ----------------------------------------------------------------------------------
async def test_healthz(env: Env) -> None:
    async with env.session.get(f"{env.base}/healthz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "ok" and body["components"] == {"coap": "listening"} and body["uptime"] >= 0


SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$'
)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format 0.0.4 -> {'name{labels}': value}; fails on any line that does not parse."""
    out: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or base in types, f"sample without TYPE: {line!r}"
        out[name + (m.group(2) or "")] = float(m.group(3))
    return out


async def test_metrics_text_format(env: Env) -> None:
    async with env.session.get(f"{env.base}/api/handles/{PUMP}") as r:
        assert r.status == 200
    async with env.session.get(f"{env.base}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = parse_metrics(await r.text())
    assert samples['ida_requests_total{code="1",frontend="http"}'] == 1
    assert samples["ida_cache_hits_total"] == 0  # no resolver counters here (fake resolver): declared, zero


# -- through the whole gateway: real resolver and cache, a Handle REST node upstream -----------------------
async def test_second_request_is_a_cache_hit_in_metrics(tmp_path: Path) -> None:
    node = RestNode()
    await node.start()
    gw = Gateway(loopback_config(tmp_path / "data", upstream=[node.url]))
    await gw.start()
    try:
        base = http_base(gw)
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(f"{base}/api/handles/{PUMP}") as r:
                    assert r.status == 200
                    assert await r.json() == sample_records()[PUMP].to_rest()
            async with session.get(f"{base}/metrics") as r:
                samples = parse_metrics(await r.text())
            async with session.get(f"{base}/healthz") as r:
                health = await r.json()
    finally:
        await gw.stop()
        await node.stop()
    assert node.requests == [PUMP]  # the second answer came from the cache
    assert samples["ida_cache_misses_total"] == 1
    assert samples["ida_cache_hits_total"] == 1
    assert samples["ida_cache_entries"] == 1
    assert samples[f'ida_upstream_requests_total{{node="{node.url}"}}'] == 1
    assert samples[f'ida_upstream_latency_seconds_count{{node="{node.url}"}}'] == 1
    assert samples[f'ida_upstream_latency_seconds_bucket{{node="{node.url}",le="+Inf"}}'] == 1
    assert samples['ida_requests_total{code="1",frontend="http"}'] == 2
    assert health["status"] == "ok" and health["components"]["upstream"] == "1/1 healthy"
