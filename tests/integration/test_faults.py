"""Faults with real processes on loopback (docs/reliability.md): broker restart mid-load, every upstream stopped,
``kill -9`` of a gateway during report ingestion, a device killed while writing its flash, the gateway's disk
full, and two gateways behind one broker and one Redis with one of them killed under load.

The gateway is always ``ida gateway`` in its own process (tests/support/faultkit.py), the broker a real Mosquitto, the
upstream a real ``ida node`` process, the device a real firmware under ``micropython`` (test d) or light MQTT /
CoAP devices that retry as the firmware does. Northbound, a webhook consumer in the test process counts every
raw delivery and de-duplicates by (id, boot, seq): the outbox promises at least once, the consumer makes it
exactly once. Each test prints a ``FIGURES`` line (run with ``-s``); docs/reliability.md quotes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiocoap
import aiohttp
import pytest
from aiocoap.numbers.codes import Code

from proto import devicemsg
from tests.support.brokers import Broker
from tests.support.faultkit import (
    GatewayProc,
    NodeProc,
    RedisServer,
    fill,
    integrity,
    sql,
    try_mount_tmpfs,
    umount,
    until,
)
from tests.support.fleet import Consumer, MqttFleet
from tests.support.fwdevice import CoapGateway, DeviceProc, free_udp_port, provision
from tests.support.mpcollect import ROOT
from tools.support.procs import micropython_binary

pytestmark = pytest.mark.slow

HANDLES = [f"88.123.99/PART-{i:04d}" for i in range(24)]

# every (device, boot, seq) a registry holds: the keys of a device's newest reports, then those of older ones
STORED_KEYS = (
    "SELECT COUNT(*) FROM (SELECT device FROM reports{where} UNION ALL SELECT device FROM seen{where})"
)


def records(path: Path, handles: list[str], ttl: int = 3600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            [
                {
                    "handle": h,
                    "values": [
                        {
                            "index": 1,
                            "type": "URL",
                            "data": {"format": "string", "value": f"https://example.com/{h}"},
                            "ttl": ttl,
                        },
                        {
                            "index": 2,
                            "type": "EMAIL",
                            "data": {"format": "string", "value": "ops@example.com"},
                            "ttl": ttl,
                        },
                    ],
                }
                for h in handles
            ]
        )
    )
    return path


def gw_config(
    upstreams: list[str], *, mqtt: str = "", webhook: str = "", **sections: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {
        "upstream": {"urls": upstreams, "timeout": 2.0, "attempt_timeout": 0.5},
        "limits": {"device_rate": 0.0},  # the fleets here are faster than real devices
        "log": {"level": "info"},
    }
    if mqtt:
        cfg["mqtt"] = {"url": mqtt, "group": "ida-gw"}
    if webhook:
        cfg["outbox"] = {"webhook_url": webhook}
    for name, table in sections.items():
        cfg.setdefault(name, {}).update(table)
    return cfg


def figures(name: str, **values: Any) -> None:
    print(f"\nFIGURES {name} " + json.dumps(values, sort_keys=True))


# -- CoAP as a device speaks it ------------------------------------------------------------------------------
async def coap_get(
    ctx: aiocoap.Context, port: int, handle: str, timeout: float = 6.0
) -> tuple[Code, dict[int, Any], int | None, float]:
    t0 = time.monotonic()
    msg = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{port}/r/{handle}")
    resp = await asyncio.wait_for(ctx.request(msg).response, timeout)
    body = devicemsg.loads(resp.payload) if resp.payload else {}
    return resp.code, body, resp.opt.max_age, time.monotonic() - t0


async def coap_report(
    ctx: aiocoap.Context,
    port: int,
    ident: str,
    boot: int,
    seq: int,
    *,
    attempt: float = 3.0,
    give_up: float = 60.0,
) -> tuple[int, list[Code]]:
    """POST the report until 2.04 (as the firmware's reporter: retry on no answer, 5.xx, ICMP unreachable)."""
    fields = {
        "id": ident,
        "boot": boot,
        "seq": seq,
        "uptime": seq,
        "heap": 50000,
        "rssi": -60,
        "queue": 0,
        "board": "unix",
        "fw": "fault",
    }
    payload = devicemsg.encode("report", fields)
    t0 = time.monotonic()
    attempts = 0
    codes: list[Code] = []
    while True:
        attempts += 1
        msg = aiocoap.Message(
            code=Code.POST, uri=f"coap://127.0.0.1:{port}/d/{ident}/rpt", payload=payload, content_format=60
        )
        try:
            resp = await asyncio.wait_for(ctx.request(msg).response, attempt)
            codes.append(resp.code)
            if resp.code == Code.CHANGED:
                return attempts, codes
        except (TimeoutError, aiocoap.error.Error, OSError):
            pass
        if time.monotonic() - t0 > give_up:
            raise AssertionError(f"{ident} report {seq} never acknowledged ({codes})")
        await asyncio.sleep(0.2)


async def http_json(port: int, path: str) -> tuple[int, Any]:
    status, doc, _ = await http_get(port, path)
    return status, doc


async def http_get(port: int, path: str) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


def idents(kind: str, n: int) -> list[str]:
    return [f"88.123.99/{kind}-{i:04d}" for i in range(n)]


# -- (a) broker restart mid-load --------------------------------------------------------------------------
async def test_broker_restart_mid_load_loses_nothing(tmp_path: Path, mosquitto: Broker) -> None:
    node = NodeProc(tmp_path / "node", records(tmp_path / "records.json", HANDLES))
    consumer = Consumer()
    await consumer.start()
    gw = GatewayProc(tmp_path / "gw", gw_config([node.url], mqtt=mosquitto.url, webhook=consumer.url))
    fleet = MqttFleet(mosquitto.url, idents("MQ", 8), HANDLES, cycles=12)
    try:
        await asyncio.gather(asyncio.to_thread(node.start), asyncio.to_thread(gw.start))
        await fleet.connect()
        run = asyncio.create_task(fleet.run())
        await until(lambda: fleet.progress >= 50, 30, "load running")
        p0 = fleet.progress
        t_restart = time.monotonic()
        await asyncio.to_thread(mosquitto.restart)
        down = time.monotonic() - t_restart
        await until(lambda: fleet.progress >= p0 + 4, 30, "answers again after the broker restart")
        recovery = time.monotonic() - t_restart
        st = await asyncio.wait_for(run, 120)
        assert not st.failures, st.failures
        total = 8 * 12
        assert st.resolves_answered == total and st.reports_acked == total == len(fleet.sent_keys)
        assert set(st.resolve_codes) == {devicemsg.OK}
        await until(lambda: set(consumer.keys) >= fleet.sent_keys, 30, "every report downstream")
        await asyncio.sleep(0.3)
        assert set(consumer.keys) == fleet.sent_keys
        assert sql(gw.registry, STORED_KEYS.format(where=""))[0][0] == total
        assert gw.logged("mqtt") and mosquitto.starts == 2
        assert gw.terminate() == 0
        assert integrity(gw.registry) == "ok" and integrity(gw.cache_db) == "ok"
        figures(
            "broker_restart",
            devices=8,
            resolves=total,
            reports=total,
            **st.figures(),
            delivered_raw=consumer.raw,
            delivered_unique=consumer.unique,
            broker_down_s=round(down, 2),
            recovery_s=round(recovery, 2),
        )
    finally:
        fleet.close()
        gw.kill9()
        node.kill()
        await consumer.stop()


# -- (b) every upstream stopped ---------------------------------------------------------------------------
async def test_every_upstream_stopped_stale_for_cached_clear_503_for_others(tmp_path: Path) -> None:
    recs = records(tmp_path / "records.json", HANDLES)
    nodes = [NodeProc(tmp_path / "n1", recs), NodeProc(tmp_path / "n2", recs)]
    gw = GatewayProc(tmp_path / "gw", gw_config([n.url for n in nodes], cache={"max_ttl": 1.0}))
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    cached, others = HANDLES[:6], HANDLES[6:12]
    try:
        await asyncio.gather(*(asyncio.to_thread(n.start) for n in nodes), asyncio.to_thread(gw.start))
        for h in cached:
            code, body, _, _ = await coap_get(ctx, gw.coap_port, h)
            assert code == Code.CONTENT and body[devicemsg.KEYS["source"]] == devicemsg.SOURCE_UPSTREAM
        for n in nodes:
            n.kill()
        await asyncio.sleep(1.1)  # every cached answer is now expired (max_ttl 1 s)

        stale_t, err_t = [], []
        for h in cached:
            code, body, max_age, took = await coap_get(ctx, gw.coap_port, h)
            assert code == Code.CONTENT, (h, code, body)
            assert body[devicemsg.KEYS["source"]] == devicemsg.SOURCE_STALE and max_age in (
                29,
                30,
            )  # stale_reply_ttl
            assert body[devicemsg.KEYS["values"]][0][2] == f"https://example.com/{h}"
            stale_t.append(took)
        for h in others:
            code, body, max_age, took = await coap_get(ctx, gw.coap_port, h)
            assert code == Code.SERVICE_UNAVAILABLE, (h, code, body)
            assert body[devicemsg.KEYS["code"]] == devicemsg.UPSTREAM_UNAVAILABLE and max_age == 0
            assert "upstream" in body[devicemsg.KEYS["msg"]]
            err_t.append(took)
        status, doc = await http_json(gw.http_port, f"/api/handles/{others[0]}")
        assert status == 503 and doc["responseCode"] == 2
        status, doc, headers = await http_get(gw.http_port, f"/api/handles/{cached[0]}")
        assert status == 200 and doc["responseCode"] == 1
        assert headers["Cache-Control"] in ("max-age=29", "max-age=30"), (
            headers
        )  # the stale answer's lifetime
        assert max(stale_t) < 1.0 and max(err_t) < 1.0, (stale_t, err_t)  # stopped nodes refuse at once

        await asyncio.to_thread(nodes[0].start)  # one node comes back on its port: fresh answers again
        t_back = time.monotonic()
        fresh_after = None
        while time.monotonic() - t_back < 20:
            code, body, _, _ = await coap_get(ctx, gw.coap_port, cached[0])
            if code == Code.CONTENT and body[devicemsg.KEYS["source"]] == devicemsg.SOURCE_UPSTREAM:
                fresh_after = time.monotonic() - t_back
                break
            await asyncio.sleep(0.2)
        assert fresh_after is not None, "no fresh answer after the upstream came back"

        # a node that is up but silent (SIGUSR1: drops every request) is worse than a dead one: time-outs
        assert nodes[0].proc is not None
        nodes[0].proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1.1)
        silent = await asyncio.gather(
            *(coap_get(ctx, gw.coap_port, h) for h in (cached[0], cached[1], others[0], others[1]))
        )
        (c1, b1, _, t1), (c2, b2, _, t2), (c3, b3, _, t3), (c4, b4, _, t4) = silent
        assert (
            c1 == c2 == Code.CONTENT
            and b1[devicemsg.KEYS["source"]] == b2[devicemsg.KEYS["source"]] == devicemsg.SOURCE_STALE
        )
        assert max(t1, t2) < 2.0, (
            t1,
            t2,
        )  # the pool gives up (attempt_timeout 0.5 s) or stale_answer_after (1.8 s)
        assert {c3, c4} <= {Code.SERVICE_UNAVAILABLE, Code.GATEWAY_TIMEOUT}, (c3, b3, c4, b4)
        assert max(t3, t4) < 3.0, (t3, t4)  # [upstream] timeout 2 s bounds the wait for an uncached answer
        figures(
            "upstreams_stopped",
            stale_answers=len(stale_t),
            stale_max_ms=round(max(stale_t) * 1000, 1),
            errors_503=len(err_t),
            error_max_ms=round(max(err_t) * 1000, 1),
            fresh_again_after_s=round(fresh_after, 2),
            silent_stale_s=round(max(t1, t2), 2),
            silent_error_s=round(max(t3, t4), 2),
            silent_error_codes=sorted({str(c3), str(c4)}),
        )
    finally:
        await ctx.shutdown()
        gw.kill9()
        for n in nodes:
            n.kill()


# -- (c) kill -9 of a gateway during report ingestion -------------------------------------------------------
async def test_kill9_during_report_ingestion_loses_and_doubles_nothing(
    tmp_path: Path, mosquitto: Broker
) -> None:
    node = NodeProc(tmp_path / "node", records(tmp_path / "records.json", HANDLES))
    consumer = Consumer(delay=0.01)  # widens the window between delivery and the outbox delete
    await consumer.start()
    gw = GatewayProc(tmp_path / "gw", gw_config([node.url], mqtt=mosquitto.url, webhook=consumer.url))
    fleet = MqttFleet(mosquitto.url, idents("MQK", 6), HANDLES, cycles=14)
    coap_devs, coap_reports = idents("COAPK", 4), 14
    coap_sent: set[tuple[str, int, int]] = set()
    coap_attempts = [0]
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    kills: list[float] = []
    rng = random.Random(1)
    try:
        await asyncio.gather(asyncio.to_thread(node.start), asyncio.to_thread(gw.start))
        warm = HANDLES[:4]
        for h in warm:
            assert (await coap_get(ctx, gw.coap_port, h))[0] == Code.CONTENT
        await asyncio.sleep(0.8)  # > flush_interval: the cache is in SQLite
        await fleet.connect()

        async def coap_device(ident: str) -> None:
            for seq in range(1, coap_reports + 1):
                coap_sent.add((ident, 1, seq))
                n, _ = await coap_report(ctx, gw.coap_port, ident, 1, seq)
                coap_attempts[0] += n
                fleet.progress += 1
                await asyncio.sleep(0.03)

        coap_load = asyncio.gather(*(coap_device(d) for d in coap_devs))
        load = asyncio.gather(fleet.run(), coap_load)
        for k in range(3):
            await until(lambda k=k: fleet.progress >= 35 * (k + 1), 60, f"load before kill {k + 1}")  # type: ignore[misc]
            await asyncio.sleep(rng.uniform(0, 0.3))
            gw.kill9()
            t_kill = time.monotonic()
            await asyncio.sleep(0.2)
            await asyncio.to_thread(gw.start)
            kills.append(time.monotonic() - t_kill)
        st, _ = await asyncio.wait_for(load, 150)
        assert not st.failures, st.failures
        sent = fleet.sent_keys | coap_sent
        await until(lambda: set(consumer.keys) >= sent, 40, "every report downstream")
        await asyncio.sleep(0.3)
        assert set(consumer.keys) == sent, "nothing lost, nothing invented"
        assert max(consumer.keys.values()) >= 1 and consumer.raw >= consumer.unique
        assert sql(gw.registry, STORED_KEYS.format(where=""))[0][0] == len(sent)  # stored once each
        assert integrity(gw.registry) == "ok" and integrity(gw.cache_db) == "ok"
        await until(lambda: sql(gw.registry, "SELECT COUNT(*) FROM outbox")[0][0] == 0, 20, "outbox drained")

        node.kill()  # the cache kept before the first kill answers without any upstream
        for h in warm:
            code, body, _, _ = await coap_get(ctx, gw.coap_port, h)
            assert code == Code.CONTENT and body[devicemsg.KEYS["source"]] == devicemsg.SOURCE_CACHE, (
                h,
                code,
                body,
            )
        assert gw.terminate() == 0
        assert integrity(gw.registry) == "ok" and integrity(gw.cache_db) == "ok"
        figures(
            "kill9_ingestion",
            kills=len(kills),
            restart_s=[round(k, 2) for k in kills],
            reports=len(sent),
            mqtt_publishes=st.reports_sent,
            coap_posts=coap_attempts[0],
            delivered_raw=consumer.raw,
            delivered_unique=consumer.unique,
            duplicates=consumer.duplicates,
            by_transport=dict(consumer.by_transport),
        )
    finally:
        fleet.close()
        await ctx.shutdown()
        gw.kill9()
        node.kill()
        await consumer.stop()


# -- (d) a device killed in the middle of writing its queue or identity --------------------------------------
WRITER = ROOT / "tests" / "device" / "fault_writer.py"
DEV = "88.123.99/FLASH-0001"


def _writer(*args: str, stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MICROPYPATH=str(ROOT / "firmware"))
    return subprocess.Popen(
        [micropython_binary(), str(WRITER), *args], stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=ROOT
    )


def _check(data: Path) -> dict[str, Any]:
    p = _writer("check", str(data) + "/", DEV, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err.decode()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def _consistent(state: dict[str, Any], announced: set[tuple[int, int]]) -> None:
    keys = [tuple(k) for k in state["keys"]]
    assert len(keys) == len(set(keys)), f"duplicate (boot, seq) in the queue: {keys}"
    assert keys == sorted(keys), f"queue out of order: {keys}"
    assert set(keys) <= announced, f"a report nobody wrote: {set(keys) - announced}"
    assert state["payload_ok"], "a queued payload is not the report that was put"
    assert state["identity"] in (0, 1), f"identity not usable: {state['identity']}"


def test_device_killed_while_writing_flash_boots_and_recovers(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    data.mkdir()
    stub_port = free_udp_port()
    url = f"coap://127.0.0.1:{stub_port}"
    provision(data, DEV, coap=url)  # as the factory left it (key 0 of the writer's two)
    rng = random.Random(8)
    announced: set[tuple[int, int]] = set()
    boots_used: list[set[int]] = []
    corrupt = torn_tmp = 0
    runs = 16
    for _ in range(runs):
        p = _writer("write", str(data) + "/", DEV, url)
        early: list[str] = []
        if rng.random() < 0.2:  # now and then during boot (boot counter, queue replay)
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # else somewhere in the write loop
            assert p.stdout is not None
            while not (line := p.stdout.readline().decode()).startswith("L") and line:
                early.append(line)
            early.append(line)
            time.sleep(rng.uniform(0.0, 0.12))
        p.kill()  # SIGKILL
        assert p.stdout is not None
        out = p.stdout.read()  # (not communicate(): it would skip what readline() buffered)
        p.wait(10)
        lines = "".join(early).splitlines() + out.decode().splitlines()
        run_boots = {int(x.split()[1]) for x in lines if x.startswith("W ")}
        announced |= {(int(x.split()[1]), int(x.split()[2])) for x in lines if x.startswith("W ")}
        boots_used.append(run_boots)
        torn_tmp += (data / "q.dat.tmp").exists() or (data / "identity.json.tmp").exists()
        state = _check(data)  # what the next boot finds
        corrupt += state["corrupt"]
        _consistent(state, announced)
    # a boot number is never reused, so (id, boot, seq) stays unique across kills
    for i, a in enumerate(boots_used):
        for b in boots_used[i + 1 :]:
            assert not a & b, f"boot number reused after a kill: {a & b}"
    assert sum(1 for b in boots_used if b) >= runs // 2, "the kills came too early to exercise writes"

    # a power cut can also tear the last record (SIGKILL cannot): cut the file at random points
    q = data / "q.dat"
    torn_ok = torn_detected = 0
    for cut in range(5):
        aside = tmp_path / f"torn{cut}"
        shutil.copytree(data, aside)
        size = (aside / "q.dat").stat().st_size
        with open(aside / "q.dat", "r+b") as f:
            f.truncate(rng.randrange(16, size))
            if cut == 4:
                f.seek(0, 2)
                f.write(b"\x01\xff\xff garbage")
        state = _check(aside)
        _consistent(state, announced)
        torn_ok += 1
        torn_detected += state["corrupt"]
    assert q.exists() and torn_detected >= 3, torn_detected  # most cuts land inside a record

    # the real firmware boots on what the kills left and drains the queue to a gateway, each report once
    final = _check(data)
    expected = [tuple(k) for k in final["keys"]]
    gw = CoapGateway(DEV, port=stub_port)
    gw.start()
    dev = DeviceProc(data, {"IDA_INTERVAL": "3600"})
    try:
        dev.start()
        m = dev.expect(r"boot=(\d+) .* queue=(\d+) dropped=\d+ corrupt=(\d+)", 20)
        assert int(m.group(2)) == len(expected)
        assert int(m.group(1)) > max((k[0] for k in expected), default=0)
        deadline = time.monotonic() + 60
        while len({(r[10], r[11]) for r in gw.reports}) < len(expected) + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        dev.stop()
        gw.stop()
    got = [(r[10], r[11]) for r in gw.reports]
    old = [k for k in got if k in set(expected)]
    assert old == expected, "every queued report delivered once, in order"
    figures(
        "device_flash_kills",
        kills=runs,
        writes_announced=len(announced),
        corrupt_tails_dropped=corrupt,
        leftover_tmp_files=torn_tmp,
        torn_cuts_recovered=torn_ok,
        torn_tails_dropped=torn_detected,
        drained=len(old),
    )


# -- (e) disk full on the gateway -----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
async def test_disk_full_clear_error_no_corruption_recovers(tmp_path: Path, how: str) -> None:
    """``tmpfs``: the data dir on a 16 MiB tmpfs that a filler file fills (needs root and mount). ``rlimit``
    (anywhere): RLIMIT_FSIZE of the gateway process lowered to the current file sizes, so SQLite's next write
    fails with EFBIG (SQLITE_IOERR_WRITE, "disk write failed") -- the substitute when no tmpfs can be mounted."""
    data = tmp_path / "data"
    mounted = False
    if how == "tmpfs":
        mounted = try_mount_tmpfs(data, "16m")
        if not mounted:
            pytest.skip(
                "cannot mount a tmpfs here (not root, or no mount permission): the rlimit case covers it"
            )
    consumer = Consumer()
    await consumer.start()
    node = NodeProc(tmp_path / "node", records(tmp_path / "records.json", HANDLES))
    gw = GatewayProc(tmp_path / "gw", gw_config([node.url], webhook=consumer.url), data_dir=data)
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    dev = "88.123.99/DISK-0001"
    filler = data / "filler"
    try:
        await asyncio.gather(asyncio.to_thread(node.start), asyncio.to_thread(gw.start))
        for seq in range(1, 6):
            await coap_report(ctx, gw.coap_port, dev, 1, seq, give_up=10)
        assert (await coap_get(ctx, gw.coap_port, HANDLES[0]))[0] == Code.CONTENT
        await until(lambda: consumer.unique == 5, 10, "first reports downstream")
        if how == "tmpfs":
            fill(filler)
        else:
            biggest = max(p.stat().st_size for p in data.iterdir() if p.is_file())
            gw.set_file_size_limit(biggest)

        refused: list[tuple[Code, str]] = []
        t0 = time.monotonic()
        for seq in range(6, 11):
            payload = devicemsg.encode(
                "report",
                {
                    "id": dev,
                    "boot": 1,
                    "seq": seq,
                    "uptime": 1,
                    "heap": 1,
                    "rssi": 0,
                    "queue": 0,
                    "board": "unix",
                    "fw": "x" * 200,
                },
            )
            msg = aiocoap.Message(
                code=Code.POST,
                uri=f"coap://127.0.0.1:{gw.coap_port}/d/{dev}/rpt",
                payload=payload,
                content_format=60,
            )
            resp = await asyncio.wait_for(ctx.request(msg).response, 5)
            body = devicemsg.loads(resp.payload) if resp.payload else {}
            refused.append((resp.code, str(body.get(devicemsg.KEYS["msg"], ""))))
        answer_s = (time.monotonic() - t0) / 5
        assert all(c == Code.INTERNAL_SERVER_ERROR for c, _ in refused), refused
        word = "disk full" if how == "tmpfs" else "disk write failed"
        assert all(word in m for _, m in refused), refused
        assert gw.logged(word)
        # the rest of the gateway still works: resolutions (memory cache / upstream), health
        for h in HANDLES[:3]:
            assert (await coap_get(ctx, gw.coap_port, h))[0] == Code.CONTENT
        status, _ = await http_json(gw.http_port, "/healthz")
        assert status == 200
        assert gw.alive

        t_free = time.monotonic()
        if how == "tmpfs":
            filler.unlink()
        else:
            gw.set_file_size_limit(None)
        for seq in range(6, 11):  # the device sends the refused reports again
            await coap_report(ctx, gw.coap_port, dev, 1, seq, give_up=15)
        await until(lambda: consumer.unique == 10, 20, "every report downstream after space came back")
        recovered = time.monotonic() - t_free
        assert sql(gw.registry, STORED_KEYS.format(where=""))[0][0] == 10
        assert integrity(gw.registry) == "ok" and integrity(gw.cache_db) == "ok"
        assert gw.terminate() == 0
        assert integrity(gw.registry) == "ok" and integrity(gw.cache_db) == "ok"
        figures(
            f"disk_full_{how}",
            refused=len(refused),
            refused_ms=round(answer_s * 1000, 1),
            recovered_s=round(recovered, 2),
            delivered_raw=consumer.raw,
            delivered_unique=consumer.unique,
        )
    finally:
        await ctx.shutdown()
        gw.kill9()
        node.kill()
        await consumer.stop()
        if mounted:
            umount(data)


# -- (f) two gateways, one broker, one Redis; one gateway killed under load ----------------------------------
async def test_two_gateways_one_killed_under_load(
    tmp_path: Path, mosquitto: Broker, redis_server: RedisServer
) -> None:
    node = NodeProc(tmp_path / "node", records(tmp_path / "records.json", HANDLES), extra=("--latency", "20"))
    consumer = Consumer()
    await consumer.start()
    cfg = gw_config(
        [node.url], mqtt=mosquitto.url, webhook=consumer.url, cache={"redis_url": redis_server.url}
    )
    a = GatewayProc(tmp_path / "a", cfg, name="A")
    b = GatewayProc(tmp_path / "b", cfg, name="B", coap_port=a.coap_port)  # one CoAP port: SO_REUSEPORT
    n_dev, cycles = 12, 15
    fleet = MqttFleet(mosquitto.url, idents("TWO", n_dev), HANDLES, cycles=cycles)
    coap_devs = idents("TWOC", 6)
    coap_sent: set[tuple[str, int, int]] = set()
    coap_resolves: list[int] = []  # attempts per answered resolve
    ctxs = [
        await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in coap_devs
    ]  # own source ports

    async def coap_device(i: int, ident: str) -> None:
        for seq in range(1, cycles + 1):
            handle = HANDLES[(i + seq) % len(HANDLES)]
            tries = 0
            while True:
                tries += 1
                try:
                    code, _, _, _ = await coap_get(ctxs[i], a.coap_port, handle, timeout=3.0)
                    if code == Code.CONTENT:
                        break
                except (TimeoutError, aiocoap.error.Error, OSError):
                    pass
                assert tries < 20, f"{ident} resolve never answered"
                await asyncio.sleep(0.2)
            coap_resolves.append(tries)
            coap_sent.add((ident, 1, seq))
            await coap_report(ctxs[i], a.coap_port, ident, 1, seq)
            fleet.progress += 2
            await asyncio.sleep(0.05)

    try:
        await asyncio.gather(
            asyncio.to_thread(node.start), asyncio.to_thread(a.start), asyncio.to_thread(b.start)
        )
        await fleet.connect()
        coap_run = asyncio.gather(*(coap_device(i, d) for i, d in enumerate(coap_devs)))
        run = asyncio.create_task(fleet.run())
        await until(
            lambda: fleet.progress >= (n_dev + len(coap_devs)) * cycles * 2 * 0.3, 60, "load on both gateways"
        )
        served_a = sql(a.registry, STORED_KEYS.format(where=""))[0][0]
        served_b = sql(b.registry, STORED_KEYS.format(where=""))[0][0]
        assert served_a > 0 and served_b > 0, "the shared subscription splits the devices' reports"
        a.kill9()
        t_kill = time.monotonic()
        p0 = fleet.progress
        await until(lambda: fleet.progress >= p0 + n_dev, 30, "B answers every device after A died")
        takeover = time.monotonic() - t_kill
        await asyncio.sleep(1.0)
        await asyncio.to_thread(a.start)  # as a supervisor would: A comes back and drains its outbox
        st = await asyncio.wait_for(run, 120)
        await asyncio.wait_for(coap_run, 120)
        assert not st.failures, st.failures
        total = n_dev * cycles
        assert st.resolves_answered == total and st.reports_acked == total
        assert set(st.resolve_codes) == {devicemsg.OK}
        sent = fleet.sent_keys | coap_sent
        assert len(coap_sent) == len(coap_devs) * cycles == len(coap_resolves)
        await until(lambda: set(consumer.keys) >= sent, 40, "every report downstream")
        await asyncio.sleep(0.3)
        assert set(consumer.keys) == sent, "exactly once after de-duplication"
        coap_split = {
            g.name: sql(g.registry, STORED_KEYS.format(where=" WHERE device LIKE '%TWOC%'"))[0][0]
            for g in (a, b)
        }
        stored = (
            sql(a.registry, STORED_KEYS.format(where=""))[0][0]
            + sql(b.registry, STORED_KEYS.format(where=""))[0][0]
        )
        assert stored >= len(sent)  # a report A stored but could not acknowledge is stored again by B
        for g in (a, b):
            assert g.terminate() == 0
            assert integrity(g.registry) == "ok" and integrity(g.cache_db) == "ok"
        upstream = node.terminate()
        assert upstream is not None and upstream <= 2 * len(HANDLES), upstream  # shared cache + single-flight
        figures(
            "two_gateways_kill",
            devices=n_dev,
            resolves=total,
            reports=total,
            **st.figures(),
            stored_in_registries=stored,
            delivered_raw=consumer.raw,
            delivered_unique=consumer.unique,
            duplicates=consumer.duplicates,
            takeover_s=round(takeover, 2),
            upstream_requests=upstream,
            distinct_handles=len(HANDLES),
            served_before_kill={"A": served_a, "B": served_b},
            coap_devices=len(coap_devs),
            coap_reports=len(coap_sent),
            coap_resolve_retries=sum(coap_resolves) - len(coap_resolves),
            coap_reports_by_gateway=coap_split,
        )
    finally:
        for c in ctxs:
            await c.shutdown()
        fleet.close()
        a.kill9()
        b.kill9()
        node.kill()
        await consumer.stop()
