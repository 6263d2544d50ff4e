"""The assembled gateway: `ida gateway` as a real process (start, serve, SIGTERM -> clean exit 0) and the
in-process Gateway across a restart (reports de-duplicated, outbox delivers once, cache warm)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiocoap
import aiohttp
import pytest
from aiocoap.numbers.codes import Code
from aiohttp import web

from gateway import config as gwconfig
from gateway.service import Gateway
from proto import devicemsg
from tests.support.gwhelpers import PUMP, RestNode, http_base, loopback_config, report_fields, sample_records
from tests.support.webapp import LoopbackApp

ROOT = Path(__file__).resolve().parents[3]
LISTENING = re.compile(r"(coap|http) listening on (\S+):(\d+)")


async def _spawn(*args: str, data_dir: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k not in ("IDA_DATA", "IDA_UPSTREAM")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.cli",
        "gateway",
        "--data-dir",
        str(data_dir),
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _wait_listening(proc: asyncio.subprocess.Process, log: list[str]) -> dict[str, int]:
    ports: dict[str, int] = {}
    assert proc.stderr is not None
    while len(ports) < 2:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert line, "gateway exited before listening:\n" + "".join(log)
        log.append(line)
        m = LISTENING.search(line)
        if m:
            ports[m.group(1)] = int(m.group(3))
    return ports


async def test_ida_gateway_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    node = RestNode()
    await node.start()
    proc = await _spawn(
        "--coap", "127.0.0.1:0", "--http", "127.0.0.1:0", "--upstream", node.url, data_dir=tmp_path / "data"
    )
    log: list[str] = []
    client = None
    try:
        ports = await _wait_listening(proc, log)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{ports['http']}/healthz") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with session.get(f"http://127.0.0.1:{ports['http']}/api/handles/{PUMP}") as r:
                assert await r.json() == sample_records()[PUMP].to_rest()
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        msg = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{ports['coap']}/r/{PUMP}")
        resp = await asyncio.wait_for(client.request(msg).response, 10)
        assert resp.code == Code.CONTENT
        assert devicemsg.decode("resolve_response", resp.payload)["source"] == devicemsg.SOURCE_CACHE

        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
        assert proc.stderr is not None
        log.append((await proc.stderr.read()).decode())
        text = "".join(log)
        assert rc == 0, text
        assert "gateway stopping" in text and "gateway stopped" in text
        assert "Traceback" not in text
        assert (tmp_path / "data" / "registry.sqlite3").exists() and (
            tmp_path / "data" / "cache.sqlite3"
        ).exists()
    finally:
        if client is not None:
            await client.shutdown()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await node.stop()


async def test_ida_gateway_sigint_and_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await _spawn("--coap", "127.0.0.1:0", "--http", f"127.0.0.1:{port}", data_dir=tmp_path / "d1")
        _out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1, err.decode()
    assert f"http: cannot listen on 127.0.0.1:{port}" in err.decode()

    proc = await _spawn("--coap", "127.0.0.1:0", "--http", "127.0.0.1:0", data_dir=tmp_path / "d2")
    await _wait_listening(proc, [])
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


class Webhook(LoopbackApp):
    """A northbound consumer: records every report POSTed by the outbox."""

    path = "/reports"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict] = []

    async def _post(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(status=204)

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(self.path, self._post)


async def _until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_restart_keeps_reports_deduplicated_and_cache_warm(tmp_path: Path) -> None:
    node, hook = RestNode(), Webhook()
    await node.start()
    await hook.start()
    cfg = loopback_config(tmp_path / "data", upstream=[node.url])
    cfg = dataclasses.replace(cfg, outbox=gwconfig.OutboxConfig(webhook_url=hook.url))
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    report = devicemsg.encode("report", report_fields(boot=4, seq=11))

    async def post_report(gw: Gateway) -> aiocoap.Message:
        assert gw.addresses.coap is not None
        uri = f"coap://127.0.0.1:{gw.addresses.coap[1]}/d/{PUMP}/rpt"
        msg = aiocoap.Message(code=Code.POST, uri=uri, payload=report, content_format=60)
        return await asyncio.wait_for(client.request(msg).response, 10)

    async def resolve(gw: Gateway) -> aiocoap.Message:
        assert gw.addresses.coap is not None
        msg = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{gw.addresses.coap[1]}/r/{PUMP}")
        return await asyncio.wait_for(client.request(msg).response, 10)

    try:
        gw = Gateway(cfg)
        await gw.start()
        for _ in range(2):
            assert devicemsg.decode("report_ack", (await post_report(gw)).payload)["code"] == devicemsg.OK
        assert (
            devicemsg.decode("resolve_response", (await resolve(gw)).payload)["source"]
            == devicemsg.SOURCE_UPSTREAM
        )
        await _until(lambda: len(hook.received) == 1)
        await gw.stop()
        await node.stop()  # the upstream is gone for the second run

        gw = Gateway(cfg)
        await gw.start()
        try:
            ack = await post_report(gw)
            assert devicemsg.decode("report_ack", ack.payload) == {"boot": 4, "seq": 11, "code": devicemsg.OK}
            warm = await resolve(gw)
            assert warm.code == Code.CONTENT
            assert devicemsg.decode("resolve_response", warm.payload)["source"] == devicemsg.SOURCE_CACHE
            assert gw.registry is not None
            stats = gw.registry.stats()
            assert (
                stats["reports_total"] == 1 and stats["duplicates_total"] == 2 and stats["outbox_depth"] == 0
            )
            await asyncio.sleep(0.2)  # a second delivery would show up by now
            assert gw.metrics.value("ida_reports_duplicate_total") == 2
        finally:
            await gw.stop()
        assert len(hook.received) == 1
        delivered = hook.received[0]
        assert (delivered["id"], delivered["boot"], delivered["seq"], delivered["transport"]) == (
            PUMP,
            4,
            11,
            "coap",
        )
    finally:
        await client.shutdown()
        await hook.stop()
        await node.stop()


class NorthboundSubscriber:
    """A northbound consumer on the broker: every outbox message on ``topic``, decoded."""

    def __init__(self, url: str, topic: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from gateway.broker import parse_url

        self.received: list[dict] = []
        self._subscribed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        addr = parse_url(url)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="north-consumer", protocol=paho.MQTTv311
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._loop.call_soon_threadsafe(
            self._subscribed.set
        )
        self.client.on_message = lambda c, u, m: self._loop.call_soon_threadsafe(
            self.received.append, json.loads(m.payload)
        )
        self.client.connect_async(addr.host, addr.port)
        self.client.loop_start()

    async def ready(self) -> None:
        await asyncio.wait_for(self._subscribed.wait(), 10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_reports_over_mqtt_and_coap_reach_the_outbox_once_across_a_restart(
    tmp_path: Path, mosquitto
) -> None:  # type: ignore[no-untyped-def]
    """docs: "a report published over MQTT and one posted over CoAP both appear in /api/devices/<id> and in the
    outbox sink once, even when sent twice or across a gateway restart"."""
    from tests.support.brokers import Device

    mqtt_dev, coap_dev = "88.123.99/MQTT-0001", "88.123.99/COAP-0001"
    north = NorthboundSubscriber(mosquitto.url, "ida/v1/north/reports")
    await north.ready()
    cfg = loopback_config(tmp_path / "data", mqtt=mosquitto.url)
    cfg = dataclasses.replace(cfg, outbox=gwconfig.OutboxConfig(mqtt_topic="ida/v1/north/reports"))
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    device = Device(mosquitto.url, mqtt_dev)
    await device.connect()
    coap_report = devicemsg.encode("report", report_fields(coap_dev, boot=1, seq=1))
    try:
        for run in range(2):
            gw = Gateway(cfg)
            await gw.start()
            try:
                assert gw.mqtt is not None and gw.mqtt.ready
                assert gw.addresses.coap is not None and gw.addresses.http is not None
                for _ in range(2):
                    device.report(boot=1, seq=1)
                    assert (await device.recv_message("ack", "report_ack")) == {
                        "boot": 1,
                        "seq": 1,
                        "code": 1,
                    }
                    uri = f"coap://127.0.0.1:{gw.addresses.coap[1]}/d/{coap_dev}/rpt"
                    msg = aiocoap.Message(code=Code.POST, uri=uri, payload=coap_report, content_format=60)
                    ack = await asyncio.wait_for(client.request(msg).response, 10)
                    assert devicemsg.decode("report_ack", ack.payload)["code"] == devicemsg.OK
                await _until(lambda: len(north.received) >= 2)
                base = http_base(gw)
                async with aiohttp.ClientSession() as session:
                    for ident, transport in ((mqtt_dev, "mqtt"), (coap_dev, "coap")):
                        async with session.get(f"{base}/api/devices/{ident}") as r:
                            dev = await r.json()
                        assert dev["last_report"]["seq"] == 1 and dev["transport"] == transport
                        assert dev["reports_total"] == 1 and dev["duplicates_total"] == 2 * run + 1
                    async with session.get(f"{base}/healthz") as r:
                        assert (await r.json())["components"]["mqtt"] == "ready"
                assert gw.metrics.value("ida_requests_total", {"frontend": "mqtt", "code": "1"}) >= 2
            finally:
                await gw.stop()
        await asyncio.sleep(0.3)  # a duplicate delivery would have arrived by now
        assert sorted((m["id"], m["transport"]) for m in north.received) == [
            (coap_dev, "coap"),
            (mqtt_dev, "mqtt"),
        ]
    finally:
        device.disconnect()
        north.stop()
        await client.shutdown()


async def test_gateway_start_failure_cleans_up(tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path / "data")
    first = Gateway(cfg)
    await first.start()
    try:
        assert first.addresses.http is not None
        taken = gwconfig.with_overrides(cfg, http=f"127.0.0.1:{first.addresses.http[1]}")
        second = Gateway(taken)
        with pytest.raises(OSError, match="http: cannot listen"):
            await second.start()
        assert (
            second.coap is not None and second.coap.address is not None
        )  # had started, and was stopped again
    finally:
        await first.stop()
