"""Reports over MQTT (gateway/frontends/mqtt_reports.py on the device link, gateway/frontends/mqtt_link.py) against a
real Mosquitto, with paho clients playing the devices: acknowledged only after the commit, a bad report refused
alone, identity, overload, duplicates, and the paho link without the device link."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.frontends.mqtt import MqttFrontEnd
from gateway.ingest import Outcome, Row
from gateway.metrics import Metrics
from gateway.registry import Registry
from proto import devicemsg
from tests.support.brokers import Broker, Device, with_device
from tests.support.gwhelpers import FakeResolver, eventually, report_fields

DEV = "88.123.99/PUMP-0001"


class HeldRegistry(Registry):
    """A registry whose commits wait until ``release()`` (then each commit goes through at once)."""

    def __init__(self, path: Path, **kw: Any) -> None:
        self.gate = threading.Event()
        self.commits_started = 0
        super().__init__(path, **kw)

    def _commit_rows(self, rows: list[Row]) -> list[Outcome]:
        self.commits_started += 1
        self.gate.wait(30)
        return super()._commit_rows(rows)

    def release(self) -> None:
        self.gate.set()


class Env:
    def __init__(self, registry: Registry, url: str, **kw: Any) -> None:
        self.registry = registry
        self.metrics = Metrics()
        self.fe = MqttFrontEnd(url, FakeResolver(), registry, self.metrics, reconnect_max=1, **kw)
        self.dev = Device(url, DEV)

    def report(self, seq: int, boot: int = 1, **extra: Any) -> None:
        """A report of the device, its fields written as they are (a bad one too)."""
        fields = report_fields(DEV, boot, seq, **extra)
        self.dev.publish("rpt", devicemsg.dumps({devicemsg.KEYS[k]: v for k, v in fields.items()}), qos=1)

    async def acks(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [devicemsg.decode("report_ack", (await self.dev.recv("ack", timeout))[0]) for _ in range(n)]

    async def no_ack(self, wait: float = 0.5) -> None:
        with pytest.raises(TimeoutError):
            await self.dev.recv("ack", timeout=wait)

    def stored(self) -> int:
        return int(self.registry.stats()["reports_total"])

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.value(name, labels)
        assert isinstance(value, float)
        return value


@contextlib.asynccontextmanager
async def _env(registry: Registry, url: str, **kw: Any) -> AsyncIterator[Env]:
    env = Env(registry, url, **kw)
    release = registry.release if isinstance(registry, HeldRegistry) else None
    async with with_device(env.fe, env.dev, registry, before_stop=release):
        yield env


@pytest.fixture
async def held(tmp_path: Path, mosquitto: Broker) -> AsyncIterator[Env]:
    async with _env(HeldRegistry(tmp_path / "registry.sqlite3"), mosquitto.url) as env:
        yield env


def _waiting(env: Env) -> int:
    return env.registry.ingest_stats()["waiting"]


async def test_the_ack_leaves_only_after_the_commit(held: Env) -> None:
    assert held.fe.fast is not None and not any(
        t.endswith("/rpt") for t in held.fe.topics
    )  # the link has them
    held.report(seq=1)
    await eventually(lambda: _waiting(held) == 1)
    await eventually(lambda: held.registry.commits_started == 1)  # type: ignore[attr-defined]
    await held.no_ack(0.5)  # committing, not committed: no ack yet
    assert held.stored() == 0
    held.registry.release()  # type: ignore[attr-defined]
    assert await held.acks(1) == [{"boot": 1, "seq": 1, "code": devicemsg.OK}]
    assert held.stored() == 1 and held.fe.fast.reports == 1
    assert held.metric("ida_requests_total", frontend="mqtt", code=str(devicemsg.OK)) == 1


# issue 19's MQTT reproduction: 5 rounds of 20 valid reports + 1 bad one, all in one commit batch each
BAD: list[dict[str, Any]] = [
    {"sensors": {"t": float("nan")}},  # not storable (the northbound JSON cannot carry NaN)
    {"rssi": "weak"},  # the wrong type
    {"board": "x" * 256},  # too long
    {"sensors": {"": 1}},  # an empty sensor name
    {"uptime": -1},  # a negative count
]


async def test_a_bad_report_is_refused_alone_and_every_good_one_is_stored(held: Env) -> None:
    registry = held.registry
    assert isinstance(registry, HeldRegistry)
    registry.release()
    for rnd, bad in enumerate(BAD):
        boot = rnd + 1
        registry.gate.clear()  # the round's reports wait for one commit together
        for seq in range(1, 11):
            held.report(seq, boot)
        held.report(99, boot, **bad)
        for seq in range(11, 21):
            held.report(seq, boot)
        await eventually(lambda: _waiting(held) == 20)
        registry.release()
        acks = await held.acks(21)
        assert {(a["seq"], a["code"]) for a in acks} == {(s, devicemsg.OK) for s in range(1, 21)} | {
            (99, devicemsg.BAD_REQUEST)
        }
        assert all(a["boot"] == boot for a in acks)
    assert held.stored() == 100  # every good one, and not one of the bad
    d = registry.device(DEV)
    assert d is not None and d["duplicates_total"] == 0
    assert held.metric("ida_requests_total", frontend="mqtt", code=str(devicemsg.BAD_REQUEST)) == 5


async def test_a_report_naming_another_device_gets_403_and_is_not_stored(held: Env) -> None:
    held.registry.release()  # type: ignore[attr-defined]
    other = report_fields("88.123.99/PUMP-0002", boot=3, seq=4)
    held.dev.publish("rpt", devicemsg.encode("report", other), qos=1)
    assert await held.acks(1) == [{"boot": 3, "seq": 4, "code": devicemsg.FORBIDDEN}]
    held.dev.publish("rpt", b"\xff\x00 not cbor", qos=1)  # nothing to answer: dropped, counted
    await eventually(lambda: held.fe.counters["dropped"] == 1)
    await held.no_ack(0.3)
    assert held.stored() == 0 and held.registry.device("88.123.99/PUMP-0002") is None


async def test_duplicates_are_acked_and_stored_once(held: Env) -> None:
    registry = held.registry
    assert isinstance(registry, HeldRegistry)
    for _ in range(2):  # the same report twice in one commit batch
        held.report(seq=7)
    await eventually(lambda: _waiting(held) == 2)
    registry.release()
    assert await held.acks(2) == [{"boot": 1, "seq": 7, "code": devicemsg.OK}] * 2
    held.report(seq=7)  # and again in a later batch (the device missed the ack)
    assert await held.acks(1) == [{"boot": 1, "seq": 7, "code": devicemsg.OK}]
    d = registry.device(DEV)
    assert d is not None and d["reports_total"] == 1 and d["duplicates_total"] == 2
    assert held.metric("ida_requests_total", frontend="mqtt", code=str(devicemsg.OK)) == 3


async def test_overload_gets_no_ack_nothing_stored_and_the_device_drains_later(
    tmp_path: Path, mosquitto: Broker
) -> None:
    registry = HeldRegistry(tmp_path / "registry.sqlite3", queue_max=5)
    async with _env(registry, mosquitto.url) as env:
        for seq in range(1, 9):
            env.report(seq)
        await eventually(lambda: env.fe.counters["overloaded"] == 3)
        assert _waiting(env) == 5  # refused at once: never queued
        await env.no_ack(0.3)
        assert env.metric("ida_reports_overloaded_total", frontend="mqtt") == 3
        registry.release()
        acked = {a["seq"] for a in await env.acks(5)}
        assert acked == {1, 2, 3, 4, 5} and env.stored() == 5
        await env.no_ack(0.3)  # nothing for the refused ones
        stored = {r["seq"] for r in registry.recent_reports(DEV, 20)}
        assert stored == {1, 2, 3, 4, 5}
        for seq in range(6, 9):  # the device sends them again after its timeout: the queue drains
            env.report(seq)
        assert {a["seq"] for a in await env.acks(3)} == {6, 7, 8}
        assert env.stored() == 8 and _waiting(env) == 0
        assert env.fe.counters["overloaded"] == 3


async def test_a_failed_commit_gets_no_ack_and_the_report_sent_again_is_stored(
    tmp_path: Path, mosquitto: Broker
) -> None:
    class FailingOnce(Registry):
        failed = False

        def _commit_rows(self, rows: list[Row]) -> list[Outcome]:
            if not self.failed:
                self.failed = True
                from gateway.errors import StorageError

                raise StorageError("disk full: report not stored")
            return super()._commit_rows(rows)

    async with _env(FailingOnce(tmp_path / "registry.sqlite3"), mosquitto.url) as env:
        env.report(seq=1)
        await env.no_ack(0.5)
        assert env.stored() == 0
        assert env.metric("ida_requests_total", frontend="mqtt", code=str(devicemsg.INTERNAL)) == 1
        env.report(seq=1)
        assert await env.acks(1) == [{"boot": 1, "seq": 1, "code": devicemsg.OK}]
        assert env.stored() == 1


async def test_without_the_device_link_reports_use_the_paho_link(tmp_path: Path, mosquitto: Broker) -> None:
    registry = HeldRegistry(tmp_path / "registry.sqlite3")
    async with _env(registry, mosquitto.url, fast_path=False) as env:
        assert env.fe.fast is None and any(t.endswith("/rpt") for t in env.fe.topics)
        env.report(seq=1)
        env.report(seq=2, rssi="weak")
        assert await env.acks(1) == [{"boot": 1, "seq": 2, "code": devicemsg.BAD_REQUEST}]
        await eventually(lambda: _waiting(env) == 1)
        await env.no_ack(0.3)  # the good one waits for its commit
        registry.release()
        assert await env.acks(1) == [{"boot": 1, "seq": 1, "code": devicemsg.OK}]
        assert env.stored() == 1


async def test_stop_waits_for_the_commit_and_sends_the_ack(held: Env) -> None:
    held.report(seq=3)
    await eventually(lambda: _waiting(held) == 1)
    stopping = asyncio.create_task(held.fe.stop())
    await asyncio.sleep(0.3)
    held.registry.release()  # type: ignore[attr-defined]
    await stopping
    assert await held.acks(1) == [{"boot": 1, "seq": 3, "code": devicemsg.OK}]
