"""The status page: the /api/status snapshot (unit), and the page itself rendered by headless Chromium against a
real gateway with a recursive node upstream, three CoAP devices and a few resolutions (end to end)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiocoap
import aiohttp
import pytest
from aiocoap.numbers.codes import Code

from gateway import status
from gateway.errors import AllUpstreamsFailed, UpstreamTimeout
from gateway.outbox import Outbox
from gateway.registry import Registry
from gateway.resolution import resolve_noted
from gateway.resolver import Resolver, ResolverConfig
from gateway.service import Gateway
from gateway.sinks import make_sink
from proto import devicemsg
from proto.identifier import IdentifierError
from tests.support.gwhelpers import PUMP, FakeResolver, http_base, loopback_config, report_fields
from tests.support.upstream_fakes import free_port
from tools.harness.node.server import NodeServer

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOT_COPY = ROOT / "docs" / "status-page.png"


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# -- unit: recorder, series, snapshot ---------------------------------------------------------------------
def test_recent_resolutions_is_a_bounded_ring_newest_first() -> None:
    ring = status.RecentResolutions(size=5)
    for i in range(8):
        ring.add(f"88.1/{i}", "coap", "cache" if i % 2 else "upstream", 1, 0.5, at=1000.0 + i)
    assert len(ring) == 5
    assert [r.id for r in ring.items()] == ["88.1/7", "88.1/6", "88.1/5", "88.1/4", "88.1/3"]
    assert ring.by_source == {"cache": 4, "upstream": 4}  # counted since start, not only what is kept
    long = ring.add("88.1/" + "x" * 1000, "http", "error", 400, 0.1)
    assert len(long.id) == status.MAX_ID_CHARS + 1 and long.id.endswith("\u2026")


def test_hit_ratio_series_per_interval_and_live_point() -> None:
    series = status.HitRatioSeries(interval=5.0, points=3)
    series.sample(100.0, 0, 0)
    series.sample(105.0, 3, 1)  # 3 hits of 4
    series.sample(110.0, 3, 1)  # idle: no ratio
    series.sample(115.0, 13, 1)
    assert len(series.points(117.0, 14, 3)) == 3  # a live point waits for half an interval
    pts = series.points(118.0, 14, 3)  # live point: 1 hit, 2 misses
    assert [p["t"] for p in pts] == [105.0, 110.0, 115.0, 118.0]
    assert [p["ratio"] for p in pts] == [0.75, None, 1.0, round(1 / 3, 4)]
    assert [p["lookups"] for p in pts] == [4, 0, 10, 3]
    assert pts[-1]["total_ratio"] == round(14 / 17, 4)
    series.sample(120.0, 20, 3)  # the oldest sample falls out: 3 points + 1 baseline kept
    assert len(series) == 4 and [p["t"] for p in series.points()] == [110.0, 115.0, 120.0]
    assert series.window == 15.0


async def test_resolve_noted_notes_answers_and_failures() -> None:
    fake = FakeResolver()
    fake.errors["88.123.99/DOWN"] = AllUpstreamsFailed({})
    fake.errors["88.123.99/SLOW"] = UpstreamTimeout("slow")
    board = status.board_for(fake)
    assert status.board_for(fake) is board  # one board per resolver: every front end notes on it
    note = board.recent.add
    assert (await resolve_noted(fake, note, "coap", PUMP)).code == devicemsg.OK
    assert (await resolve_noted(fake, note, "http", "88.123.99/NOPE")).code == devicemsg.NOT_FOUND
    for ident, exc in (
        ("88.123.99/DOWN", AllUpstreamsFailed),
        ("88.123.99/SLOW", UpstreamTimeout),
        ("no-slash", IdentifierError),
    ):
        with pytest.raises(exc):
            await resolve_noted(fake, note, "coap", ident)
    assert board.recent.items() == []  # noted on the next loop turn, once the answer is on its way
    await asyncio.sleep(0)
    got = [(r.id, r.frontend, r.source, r.code) for r in reversed(board.recent.items())]
    assert got == [
        (PUMP, "coap", "upstream", 1),
        ("88.123.99/NOPE", "http", "upstream", 100),
        ("88.123.99/DOWN", "coap", "error", 503),
        ("88.123.99/SLOW", "coap", "error", 504),
        ("no-slash", "coap", "error", 400),
    ]
    assert all(r.ms >= 0 for r in board.recent.items())
    assert await resolve_noted(fake, None, "coap", PUMP) == await fake.resolve(PUMP)  # no hook: plain resolve


async def test_snapshot_with_fake_resolver_and_registry(tmp_path: Path) -> None:
    now = time.time()
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        registry.record_report(PUMP, report_fields(PUMP, queue=2, dropped=1), "coap", "127.0.0.1:5")
        registry.record_report(
            "88.123.99/MQTT-1", report_fields("88.123.99/MQTT-1", board="esp32-s3-devkitc-1"), "mqtt"
        )
        registry.set_status("88.123.99/MQTT-1", False, "mqtt")
        fake = FakeResolver()
        await resolve_noted(fake, status.board_for(fake).recent.add, "coap", PUMP)
        await asyncio.sleep(0)
        snap = status.status_snapshot(
            fake, registry, components={"coap": "listening", "mqtt": "down"}, now=now
        )
    finally:
        registry.close()
    assert snap["status"] == "degraded" and snap["components"]["mqtt"] == "down"
    assert snap["devices_total"] == 2 and snap["devices_online"] == 1
    rows = {d["id"]: d for d in snap["devices"]}
    pump, mq = rows[PUMP], rows["88.123.99/MQTT-1"]
    assert (pump["board"], pump["transport"], pump["online"], pump["state"]) == (
        "esp32-devkitc",
        "coap",
        None,
        "active",
    )
    assert (pump["queue"], pump["dropped"], pump["reports"], pump["seq"]) == (2, 1, 1, 1)
    assert abs(pump["last_report"] - now) < 60
    assert (mq["state"], mq["online"], mq["board"]) == ("offline", False, "esp32-s3-devkitc-1")
    # no cache here: the hit ratio comes from the recorded sources
    assert snap["cache"]["hits"] == 0 and snap["cache"]["misses"] == 1 and snap["upstream"] == []
    assert snap["recent"][0]["id"] == PUMP and snap["resolutions"]["total"] == 1
    assert snap["outbox"] == {"depth": 0}
    # a device silent for more than three report intervals
    later = status.status_snapshot(fake, _Devices([{"id": "88.1/A", "last_seen": now - 1000}]), now=now)
    assert later["devices"][0]["state"] == "silent" and later["devices_online"] == 0


class _Devices:
    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self._devices = devices

    def devices(self) -> list[dict[str, Any]]:
        return self._devices

    def stats(self) -> dict[str, Any]:
        return {"outbox_depth": 7}


async def test_snapshot_with_real_resolver_cache_upstream_and_outbox(tmp_path: Path) -> None:
    async with NodeServer(http=None) as node:
        resolver = Resolver(ResolverConfig(upstreams=[node.handle_url, "http://127.0.0.1:9"], timeout=3.0))
        db = tmp_path / "registry.sqlite3"
        outbox = Outbox(db, [make_sink("http://127.0.0.1:9/hook")])  # not started: reports wait
        registry = Registry(db, outbox)
        try:
            registry.record_report(PUMP, report_fields(PUMP), "coap")
            board = status.board_for(resolver)
            board.series.sample(time.time() - 5, 0, 0)
            for _ in range(3):
                await resolve_noted(resolver, board.recent.add, "http", PUMP)
            await asyncio.sleep(0)
            snap = status.status_snapshot(resolver, registry)
        finally:
            await resolver.close()
            registry.close()
            outbox.close()
    c = snap["cache"]
    assert (c["hits"], c["misses"], c["hit_ratio"]) == (2, 1, round(2 / 3, 4))
    assert c["entries"] == 1 and c["bytes"] > 0 and c["max_entries"] == 100_000 and c["stale"] == 0
    nodes = {n["url"]: n for n in snap["upstream"]}
    assert set(nodes) == {node.handle_url, "http://127.0.0.1:9"}
    live = nodes[node.handle_url]
    assert live["healthy"] and live["answers"] == 1 and live["latency_ewma_ms"] > 0
    assert [r["source"] for r in snap["recent"]] == ["cache", "cache", "upstream"]
    assert snap["outbox"]["depth"] == 1 and len(snap["outbox"]["sinks"]) == 1
    (pt,) = snap["series"]["points"]  # one sample + the live point
    assert (pt["lookups"], pt["hits"], pt["ratio"]) == (3, 2, round(2 / 3, 4))


# -- end to end: a real gateway and headless Chromium ----------------------------------------------------
DEVICES: dict[str, dict[str, Any]] = {
    PUMP: {"board": "esp32-devkitc", "queue": 0},
    "88.123.99/VALVE-0001": {"board": "esp32-s3-devkitc-1", "queue": 3},
    # identifiers are user data: this one must show up as text, not as markup
    '88.123.99/<img src=x onerror="document.title=1">&amp;': {
        "board": "esp32-c3-devkitm-1",
        "queue": 1,
        "dropped": 2,
    },
}
KNOWN = [PUMP, "88.123.99/VALVE-0001", "88.123.99/VALVE-0002", "88.123.99/MANY-0001", "88.123.99/TTL-0001"]


class DomSummary(HTMLParser):
    """What the test needs from Chromium's --dump-dom output."""

    def __init__(self) -> None:
        super().__init__()
        self.device_ids: list[str] = []
        self.device_states: list[str] = []
        self.tags: list[str] = []
        self.testids: list[str] = []
        self._capture: str | None = None
        self.texts: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        tid = a.get("data-testid")
        if tid:
            self.testids.append(tid)
        if tid == "device-row":
            self.device_ids.append(a.get("data-id") or "")
            self.device_states.append(a.get("data-state") or "")
        if a.get("id") in ("outbox-depth", "hit-ratio", "status-pill"):
            self._capture = a["id"]

    def handle_data(self, data: str) -> None:
        if self._capture:
            self.texts[self._capture] = self.texts.get(self._capture, "") + data

    def handle_endtag(self, tag: str) -> None:
        self._capture = None


@pytest.fixture
def fast_sampling(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(status, "SAMPLE_INTERVAL", 0.25)  # the chart gets a dozen points in three seconds
    yield


async def test_status_page_in_headless_chromium(tmp_path: Path, fast_sampling: None) -> None:
    chromium = chromium_binary()
    if chromium is None:
        pytest.skip("chromium is not installed (make setup installs Debian's chromium)")
    dead = f"http://127.0.0.1:{free_port()}"  # a node that refuses connections: shown failing
    async with NodeServer(http=None) as node:
        gw = Gateway(loopback_config(tmp_path / "data", upstream=[dead, node.handle_url]))
        await gw.start()
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            assert gw.addresses.coap is not None
            coap = f"coap://127.0.0.1:{gw.addresses.coap[1]}"
            base = http_base(gw)

            async def coap_request(
                code: Code, path: str, payload: bytes = b"", query: str = ""
            ) -> aiocoap.Message:
                msg = aiocoap.Message(
                    code=code,
                    uri=coap + quote(path, safe="/") + query,
                    payload=payload,
                    content_format=60 if payload else None,
                )
                return await asyncio.wait_for(client.request(msg).response, 10)

            for n, (ident, extra) in enumerate(DEVICES.items()):
                report = devicemsg.encode("report", report_fields(ident, seq=n + 1, **extra))
                ack = await coap_request(Code.POST, f"/d/{ident}/rpt", report)
                assert devicemsg.decode("report_ack", ack.payload)["code"] == devicemsg.OK

            async with aiohttp.ClientSession() as session:

                async def http_resolve(ident: str) -> int:
                    async with session.get(f"{base}/api/handles/{quote(ident, safe='/')}") as r:
                        return r.status

                # misses first (upstream), then more and more cache hits: the chart climbs
                for ident in KNOWN[:3]:
                    assert (await coap_request(Code.GET, f"/r/{ident}")).code == Code.CONTENT
                assert await http_resolve("88.123.99/NOPE-0404") == 404
                assert await http_resolve("not an identifier") == 400
                for rnd in range(10):
                    await asyncio.sleep(0.25)
                    for ident in KNOWN[: 3 + rnd // 4]:
                        assert (await coap_request(Code.GET, f"/r/{ident}")).code == Code.CONTENT
                    assert await http_resolve(KNOWN[rnd % 2]) == 200

                async with session.get(f"{base}/api/status") as r:
                    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
                    snap = await r.json()
                async with session.get(f"{base}/status") as r:
                    assert r.status == 200 and r.content_type == "text/html"
                    assert "'unsafe-inline'" in r.headers["Content-Security-Policy"]
                    page = await r.text()
            assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
            assert snap["devices_total"] == 3 and snap["cache"]["hits"] > snap["cache"]["misses"] > 0
            assert {r["frontend"] for r in snap["recent"]} == {"coap", "http"}
            assert len(snap["series"]["points"]) >= 8

            async def keep_busy() -> None:  # traffic while the page loads, so the chart runs up to "now"
                for n in range(1000):
                    await coap_request(Code.GET, f"/r/{KNOWN[n % len(KNOWN)]}")
                    if (
                        n % 7 == 6
                    ):  # a key not cached yet: a miss that goes upstream (no such index: code 200)
                        await coap_request(Code.GET, f"/r/{PUMP}", query=f"?index={n}")
                    await asyncio.sleep(0.1)

            busy = asyncio.create_task(keep_busy())
            shot = tmp_path / "status-page.png"
            try:
                dom = await _chromium(chromium, f"{base}/", shot, tmp_path / "chromium")
            finally:
                busy.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await busy
        finally:
            await client.shutdown()
            await gw.stop()

    summary = DomSummary()
    summary.feed(dom)
    assert sorted(summary.device_ids) == sorted(DEVICES), dom[:4000]  # one row per device, drawn by the JS
    assert set(summary.device_states) == {"active"}
    assert "img" not in summary.tags  # the identifier stayed text
    assert summary.testids.count("hit-point") >= 8 and "hit-line" in summary.testids
    assert summary.testids.count("upstream-row") == 2
    assert summary.testids.count("recent-row") >= 20
    assert (
        summary.texts.get("status-pill") == "ok" and summary.texts.get("outbox-depth", "").strip().isdigit()
    )
    assert summary.texts.get("hit-ratio", "").endswith("%")

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    SCREENSHOT_COPY.parent.mkdir(exist_ok=True)
    if os.environ.get("IDA_UPDATE_SCREENSHOT"):  # refresh the README picture on request only
        shutil.copyfile(shot, SCREENSHOT_COPY)


async def _chromium(binary: str, url: str, screenshot: Path, profile: Path) -> str:
    """Load ``url`` in headless Chromium, let its scripts run (virtual time), save a screenshot, return the DOM."""
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,800",
        "--virtual-time-budget=5000",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    env = {**os.environ, "TMPDIR": tempfile.gettempdir()}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("chromium did not finish within 90 s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    assert screenshot.exists(), err.decode(errors="replace")[-3000:]
    return out.decode()
