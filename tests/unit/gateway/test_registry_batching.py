"""gateway/registry.py group commit and cheap status writes: many concurrent reports -> few transactions, a
duplicate inside one batch stored once, nothing answered before its batch committed (a failing commit fails
every caller of that batch), unchanged status -> no write."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway.registry as registry_mod
from gateway.errors import StorageError
from gateway.outbox import Outbox
from gateway.registry import Registry
from tests.unit.gateway.test_registry import DEV, NullSink, report


def dev(i: int) -> str:
    return f"88.123.99/PUMP-{i:04d}"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "gateway.db"


def wal_size(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def wal_changes(reg: Registry) -> int:
    return reg._conn.total_changes


async def test_many_concurrent_reports_few_transactions(db: Path) -> None:
    with (
        contextlib.closing(Outbox(db, [NullSink()])) as ob,
        contextlib.closing(Registry(db, ob, batch_max=64, batch_delay=0.005)) as reg,
    ):
        n = 300
        results = await asyncio.gather(
            *(reg.record_report_async(dev(i), report(1, 1, dev(i)), "mqtt") for i in range(n))
        )
        assert results == [True] * n
        assert reg.commits <= 8, reg.commits  # 300 / 64 -> 5 batches, not 300 transactions
        assert reg.stats()["reports_total"] == n
        assert ob.depth() == n  # each stored and enqueued northbound in its batch's transaction
        assert len(reg.devices()) == n
        assert reg.device(dev(7))["last_report"]["seq"] == 1  # type: ignore[index]


async def test_duplicates_inside_one_batch_stored_once(db: Path) -> None:
    with (
        contextlib.closing(Outbox(db, [NullSink()])) as ob,
        contextlib.closing(Registry(db, ob, batch_max=100, batch_delay=0.01)) as reg,
    ):
        calls = [reg.record_report_async(DEV, report(1, 5), "mqtt") for _ in range(3)]
        calls.append(reg.record_report_async(DEV, report(1, 6), "coap", "10.0.0.7:5683"))
        calls.append(reg.record_report_async(DEV, report(1, 5), "mqtt"))
        results = await asyncio.gather(*calls)
        assert results == [True, False, False, True, False]
        assert reg.commits == 1
        d = reg.device(DEV)
        assert d is not None and d["reports_total"] == 2 and d["duplicates_total"] == 3
        assert [r["seq"] for r in d["recent_reports"]] == [6, 5]
        assert ob.depth() == 2
        # and a duplicate of an earlier batch is still one
        assert await reg.record_report_async(DEV, report(1, 6), "mqtt") is False


async def test_no_answer_before_commit_and_failed_commit_fails_the_batch(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(db, batch_max=100, batch_delay=0.01)
    real = registry_mod.transaction
    fail = True
    committed_before_answer: list[bool] = []

    @contextlib.contextmanager
    def flaky(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        if not fail:
            with real(conn) as c:
                yield c
            committed_before_answer.append(True)
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")
        raise OSError(errno.EIO, "I/O error (injected at commit)")

    monkeypatch.setattr(registry_mod, "transaction", flaky)
    try:
        answered: list[int] = []

        async def one(seq: int) -> None:
            await reg.record_report_async(DEV, report(1, seq), "mqtt")
            answered.append(seq)  # what a front end would acknowledge

        outcomes = await asyncio.gather(*(one(s) for s in range(1, 6)), return_exceptions=True)
        assert all(isinstance(o, StorageError) for o in outcomes), outcomes
        assert answered == []
        assert reg.commits == 0
        assert reg.device(DEV) is None  # nothing stored

        fail = False
        tasks = [asyncio.ensure_future(one(s)) for s in range(1, 6)]
        await asyncio.sleep(0)
        assert answered == []  # queued, not answered: the batch waits for its delay and its commit
        await asyncio.gather(*tasks)
        assert sorted(answered) == [1, 2, 3, 4, 5]
        assert committed_before_answer == [True]  # one commit, and it completed before the answers
        d = reg.device(DEV)
        assert d is not None and d["reports_total"] == 5  # the devices sent them again: stored now
    finally:
        reg.close()


async def test_bad_report_raises_at_once(db: Path) -> None:
    with contextlib.closing(Registry(db)) as reg:
        with pytest.raises(ValueError):
            await reg.record_report_async(DEV, {**report(), "id": "88.123.99/OTHER"}, "mqtt")
        with pytest.raises(ValueError):
            await reg.record_report_async(DEV, {**report(), "seq": -1}, "mqtt")
        assert reg.commits == 0


def test_status_unchanged_no_write(db: Path) -> None:
    with contextlib.closing(Registry(db)) as reg:
        reg.set_status(DEV, True, "mqtt")
        assert reg.commits == 1
        before, wal = wal_changes(reg), wal_size(db)
        for _ in range(50):
            reg.set_status(DEV, True, "mqtt")  # a retained status seen again, reconnects
        assert reg.commits == 1 and wal_changes(reg) == before and wal_size(db) == wal
        reg.set_status(DEV, True, "coap")  # transport changed: written
        assert reg.commits == 2
        reg.set_status(DEV, False, "coap")
        assert reg.commits == 3
        d = reg.device(DEV)
        assert d is not None and d["online"] is False and d["transport"] == "coap"
    # after a restart the in-memory copy is empty: the write is attempted but changes no row
    with contextlib.closing(Registry(db)) as reg2:
        reg2.set_status(DEV, False, "coap")
        assert wal_changes(reg2) == 0  # the INSERT ... DO NOTHING and the conditional UPDATE touch no row


def test_status_after_report_on_another_transport(db: Path) -> None:
    with contextlib.closing(Registry(db)) as reg:
        reg.set_status(DEV, True, "mqtt")
        reg.record_report(DEV, report(1, 1), "coap")
        reg.set_status(DEV, True, "mqtt")  # the report moved transport to coap: this is a change again
        assert reg.device(DEV)["transport"] == "mqtt"  # type: ignore[index]


async def test_status_batched_without_fsync_and_with_reports(db: Path) -> None:
    with contextlib.closing(Registry(db, batch_delay=0.002)) as reg:
        for i in range(200):
            reg.set_status(dev(i), True, "mqtt")
        assert reg.commits == 0  # queued on the loop: one write shortly after
        await asyncio.sleep(registry_mod.STATUS_DELAY * 4)
        assert reg.commits == 1
        assert reg.stats()["devices_online"] == 200
        # a status queued just before a report rides in the report's transaction
        reg.set_status(dev(0), False, "mqtt")
        assert await reg.record_report_async(dev(0), report(1, 1, dev(0)), "mqtt") is True
        assert reg.commits == 2
        assert reg._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again for reports
        d = reg.device(dev(0))
        assert d is not None and d["online"] is False and d["reports_total"] == 1


async def test_close_commits_what_is_queued(db: Path) -> None:
    reg = Registry(db, batch_delay=10.0)
    task = asyncio.ensure_future(reg.record_report_async(DEV, report(1, 1), "mqtt"))
    await asyncio.sleep(0)
    reg.set_status(DEV, True, "mqtt")
    reg.close()
    assert await task is True
    with contextlib.closing(Registry(db)) as reg2:
        d = reg2.device(DEV)
        assert d is not None and d["reports_total"] == 1 and d["online"] is True
