"""The report ingest path (gateway/ingest.py, gateway/reportstore.py through gateway/registry.py): a bad report
fails alone and before its batch (issue 19 item 1), a row that fails while storing fails alone, anything
validation accepts stores, overload is refused at once and explicitly, the outbox gets the same payload shape,
and a registry file of the previous layout is moved over with its reports and de-duplication keys."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import Overloaded
from gateway.ingest import IdentifierCache
from gateway.outbox import Outbox, report_payload
from gateway.registry import Registry
from proto import devicemsg, identifier
from tests.unit.gateway.test_registry import DEV, Clock, NullSink, report


def dev(i: int) -> str:
    return f"88.123.99/PUMP-{i:04d}"


def wire(fields: dict[str, Any]) -> bytes:
    """A report payload as a device (or an attacker) sends it: any value under any key."""
    return cbor2.dumps({devicemsg.KEYS[k]: v for k, v in fields.items()})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "registry.sqlite3"


async def test_issue_19_bad_report_does_not_fail_its_batch(db: Path) -> None:
    """5 rounds of 20 valid reports + 1 carrying a byte string under a known key of another message (`etag`,
    `token`), decoded and stored as the MQTT front end does, all in one commit batch each: every valid report
    is stored and acknowledged (on the registry before this change, 100/100 got the batch's TypeError)."""
    ob = Outbox(db, [NullSink()])
    reg = Registry(db, ob, batch_delay=0.05)
    try:
        outcomes: list[Any] = []
        for rnd in range(5):
            calls = [
                reg.record_report_async(
                    dev(i), devicemsg.decode("report", wire(report(1, rnd + 1, dev(i)))), "mqtt"
                )
                for i in range(20)
            ]
            bad = report(
                1, rnd + 1, dev(99), **({"etag": b"\x01\x02"} if rnd % 2 else {"token": b"\xfe" * 8})
            )
            calls.insert(7, reg.record_report_async(dev(99), devicemsg.decode("report", wire(bad)), "mqtt"))
            commits = reg.commits
            outcomes += await asyncio.gather(*calls, return_exceptions=True)
            assert reg.commits == commits + 1  # one batch per round
        assert outcomes == [True] * 105  # the foreign key is dropped, the report itself stored
        assert reg.stats()["reports_total"] == 105
        d = reg.device(dev(99))
        assert d is not None and "etag" not in d["last_report"] and "token" not in d["last_report"]
        assert all("etag" not in r["payload"] and "token" not in r["payload"] for r in ob.rows())
    finally:
        reg.close()
        ob.close()


async def test_a_batch_mixing_good_and_invalid_reports_stores_every_good_one(db: Path) -> None:
    ob = Outbox(db, [NullSink()])
    reg = Registry(db, ob, batch_delay=0.05)
    bad_fields = [
        {"board": b"esp32"},  # a byte string under a text key
        {"heap": True},  # a bool for an int
        {"sensors": {"t": math.nan}},
        {"sensors": {f"s{i}": i for i in range(devicemsg.SENSORS_MAX + 1)}},
        {"seq": 2**63},
    ]
    try:
        calls = []
        for i in range(30):
            calls.append(reg.record_report_async(dev(i), report(1, 1, dev(i)), "coap", "10.0.0.1:5683"))
            if i % 6 == 0:
                calls.append(
                    reg.record_report_async(dev(i), {**report(1, 2, dev(i)), **bad_fields[i // 6]}, "coap")
                )
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        bad = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(bad) == 5 and all(isinstance(o, devicemsg.InvalidReport) for o in bad)
        assert [o for o in outcomes if not isinstance(o, BaseException)] == [True] * 30
        assert reg.commits == 1 and reg.stats()["reports_total"] == 30 and ob.depth() == 30
    finally:
        reg.close()
        ob.close()


async def test_a_row_that_fails_while_storing_fails_alone(db: Path) -> None:
    """A statement that raises for one row (here a trigger) gets that row its error; every other report of
    the same batch is stored, enqueued and answered; the failed one is new again once it can be stored."""
    ob = Outbox(db, [NullSink()])
    reg = Registry(db, ob, batch_delay=0.05)
    try:
        reg._conn.execute(  # type: ignore[attr-defined]
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON reports WHEN NEW.device = '88.123.99/PUMP-0003'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        calls = [reg.record_report_async(dev(i), report(1, 1, dev(i)), "mqtt") for i in range(8)]
        calls.append(
            reg.record_report_async(dev(1), report(1, 1, dev(1)), "mqtt")
        )  # a duplicate in the batch
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes[3], sqlite3.IntegrityError)
        assert outcomes[:3] + outcomes[4:] == [True] * 7 + [False]
        assert reg.commits == 1
        assert reg.device(dev(3)) is None  # nothing of it: no device row, no key, no outbox row
        assert reg.stats()["reports_total"] == 7 and reg.stats()["duplicates_total"] == 1
        assert sorted(r["payload"]["id"] for r in ob.rows()) == [dev(i) for i in range(8) if i != 3]
        reg._conn.execute("DROP TRIGGER refuse")  # type: ignore[attr-defined]
        assert await reg.record_report_async(dev(3), report(1, 1, dev(3)), "mqtt") is True
    finally:
        reg.close()
        ob.close()


async def test_submit_report_is_the_checked_entry(db: Path) -> None:
    reg = Registry(db, clock=Clock())
    try:
        r = devicemsg.decode_report(wire(report(2, 9, "88.abc/Pump", sensors={"t": 1.5})))
        assert await reg.submit_report("88.ABC/Pump", r, "coap", "[::1]:5683") is True  # its id, normalised
        assert await reg.submit_report("88.abc/Pump", r, "coap") is False
        d = reg.device("88.ABC/Pump")
        assert d is not None and d["last_report"]["sensors"] == {"t": 1.5} and d["peer"] == "[::1]:5683"
        with pytest.raises(ValueError, match="does not match"):
            reg.submit_report("88.123.99/OTHER", r, "coap")
        assert reg.ingest_stats() == {"waiting": 0, "queue_max": 10_000, "refused_total": 0}
    finally:
        reg.close()


async def test_overload_is_refused_at_once_and_nothing_acknowledged_is_lost(db: Path) -> None:
    """The writer is held (the registry's lock taken here) while reports pile up: past queue_max a submit is
    refused at once with Overloaded and a retry-after; nothing refused is stored or counted; every accepted
    report is stored once the writer goes on, and the refused ones store when sent again."""
    reg = Registry(db, batch_max=4, batch_delay=0.001, queue_max=10)
    accepted: list[asyncio.Future[bool]] = []
    refused: list[tuple[int, Overloaded]] = []
    reg._lock.acquire()  # type: ignore[attr-defined]
    try:
        for seq in range(1, 31):
            try:
                accepted.append(reg.submit_report(DEV, devicemsg.check_report(report(1, seq)), "coap"))
            except Overloaded as e:
                refused.append((seq, e))
            await asyncio.sleep(0.002)
        assert len(accepted) == 10 and len(refused) == 20
        assert all(e.retry_after >= 1 for _, e in refused)
        assert reg.ingest_stats() == {"waiting": 10, "queue_max": 10, "refused_total": 20}
        assert not any(f.done() for f in accepted)  # nothing answered before its commit
    finally:
        reg._lock.release()  # type: ignore[attr-defined]
    try:
        assert await asyncio.gather(*accepted) == [True] * 10
        assert reg.stats()["reports_total"] == 10  # the refused ones are not counted
        assert [x["seq"] for x in reg.recent_reports(DEV, 30)] == list(range(10, 0, -1))
        for seq, _ in refused:  # the devices send them again
            assert await reg.record_report_async(DEV, report(1, seq), "coap") is True
        assert reg.stats()["reports_total"] == 30 and reg.ingest_stats()["waiting"] == 0
    finally:
        reg.close()
    again = Registry(db)
    try:
        assert again.stats()["reports_total"] == 30
        assert again.record_report(DEV, report(1, 1), "coap") is False
    finally:
        again.close()


async def test_retry_after_follows_the_commit_rate(db: Path) -> None:
    reg = Registry(db, queue_max=5, batch_delay=0.001)
    try:
        for i in range(10):
            assert await reg.record_report_async(dev(i), report(1, 1, dev(i)), "mqtt") is True
        q = reg._queue  # type: ignore[attr-defined]
        assert q._rate > 0 and q.retry_after() == 1  # commits measured, nothing waits
        q._rate = 2.0  # two reports a second
        q._inflight = 5
        assert q.retry_after() == 3
        with pytest.raises(Overloaded) as e:
            reg.submit_report(DEV, devicemsg.check_report(report()), "mqtt")
        assert e.value.retry_after == 3 and "5 reports wait" in str(e.value)
        q._rate = 0.01
        assert q.retry_after() == 60  # capped
        q._inflight = 0
    finally:
        reg.close()


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "boot": st.integers(0, 2**63 - 1),
    "seq": st.integers(0, 2**63 - 1),
    "uptime": st.integers(0, 2**64 - 1),
    "heap": st.integers(0, 2**64 - 1),
    "rssi": st.integers(-(2**63), 2**63 - 1),
    "queue": st.integers(0, 2**64 - 1),
    "board": st.text(max_size=devicemsg.REPORT_TEXT_MAX),
    "fw": st.text(max_size=devicemsg.REPORT_TEXT_MAX),
    "dropped": st.integers(0, 2**64 - 1),
    "time": st.integers(0, 2**64 - 1),
    "sensors": st.dictionaries(
        st.text(min_size=1, max_size=devicemsg.SENSOR_NAME_MAX),
        st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=devicemsg.REPORT_TEXT_MAX),
        max_size=devicemsg.SENSORS_MAX,
    ),
}
ANY_VALUE = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
)


@st.composite
def reports(draw: st.DrawFn) -> dict[str, Any]:
    """Reports of every shape the check accepts, plus values that may break it and keys it drops."""
    required, optional = devicemsg.MESSAGES["report"]
    out: dict[str, Any] = {"id": DEV}
    for k in (*required, *optional):
        if k == "id" or (k in optional and not draw(st.booleans())):
            continue
        out[k] = draw(FIELD_VALUES[k] | ANY_VALUE) if draw(st.integers(0, 9)) == 0 else draw(FIELD_VALUES[k])
    for k in draw(
        st.lists(st.sampled_from(["token", "etag", "code", "msg", "values", "online"]), max_size=2)
    ):
        out[k] = draw(ANY_VALUE)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=reports())
def test_any_report_validation_accepts_stores(tmp_path: Path, fields: dict[str, Any]) -> None:
    """Property: whatever check_report accepts, record_report stores (True), the device view and the outbox
    give back its fields (foreign keys dropped), and the same report again is a duplicate."""
    path = tmp_path / f"{uuid.uuid4().hex}.sqlite3"
    ob = Outbox(path, [NullSink()])
    reg = Registry(path, ob, clock=Clock())
    try:
        try:
            checked = devicemsg.check_report(fields)
        except devicemsg.InvalidReport:  # and what it refuses, the registry refuses before storing anything
            with pytest.raises(devicemsg.InvalidReport):
                reg.record_report(DEV, fields, "coap")
            assert reg.commits == 0 and ob.depth() == 0
            return
        assert reg.record_report(DEV, fields, "coap", "10.0.0.9:5683") is True
        own = {k: v for k, v in checked.fields.items() if k != "id"}
        d = reg.device(DEV)
        assert d is not None
        assert d["last_report"] == {**own, "received": round(Clock().t, 3), "transport": "coap"}
        assert d["recent_reports"][0] == {
            **own,
            "received": Clock().t,
            "transport": "coap",
            "peer": "10.0.0.9:5683",
        }
        want = report_payload(DEV, checked.fields, Clock().t, "coap", "10.0.0.9:5683")
        assert [r["payload"] for r in ob.rows()] == [want]
        assert json.loads(json.dumps(want)) == want  # northbound JSON carries it as it is
        assert reg.record_report(DEV, fields, "coap") is False
    finally:
        reg.close()
        ob.close()


def test_invalid_reports_raise_before_anything_is_stored(db: Path) -> None:
    reg = Registry(db)
    try:
        for bad in ({"sensors": {"t": math.inf}}, {"fw": b"0.1"}, {"board": None}, {"uptime": 1.5}):
            with pytest.raises(devicemsg.InvalidReport):
                reg.record_report(DEV, report(**bad), "mqtt")
        assert reg.commits == 0 and reg.device(DEV) is None
    finally:
        reg.close()


def test_outbox_rows_old_json_and_stored_reports(db: Path) -> None:
    """Report rows keep the report's CBOR and make the payload at delivery: the same shape as report_payload;
    rows of the JSON kind (enqueue(), older files) still read as they are."""
    ob = Outbox(db, [NullSink()])
    reg = Registry(db, ob, clock=Clock())
    try:
        ob.enqueue({"id": "x/y", "boot": 1, "seq": 1, "legacy": True})
        fields = report(4, 2, sensors={"temp": -3.25, "mode": "auto"}, dropped=1, time=5)
        reg.record_report(DEV, {**fields, "etag": b"\x00"}, "mqtt")
        rows = ob.rows()
        assert rows[0]["payload"] == {"id": "x/y", "boot": 1, "seq": 1, "legacy": True}
        assert rows[1]["payload"] == report_payload(DEV, fields, Clock().t, "mqtt")
        assert list(rows[1]["payload"])[:5] == ["id", "boot", "seq", "received", "transport"]
    finally:
        reg.close()
        ob.close()


OLD_SCHEMA = """
CREATE TABLE devices (
    id TEXT PRIMARY KEY, board TEXT, fw TEXT, transport TEXT, peer TEXT, online INTEGER, status_changed REAL,
    first_seen REAL NOT NULL, last_seen REAL, last_report TEXT, reports INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0, cfgver INTEGER NOT NULL DEFAULT 0, cfg TEXT, cfg_set REAL,
    ack_cfgver INTEGER, ack_code INTEGER, ack_msg TEXT, ack_time REAL
);
CREATE TABLE seen (
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL,
    UNIQUE (device, boot, seq)
);
CREATE INDEX seen_by_device ON seen(device, id);
CREATE TABLE reports (
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL,
    received REAL NOT NULL, transport TEXT NOT NULL, peer TEXT, fields TEXT NOT NULL
);
CREATE INDEX reports_by_device ON reports(device, id);
"""


def test_a_registry_file_of_the_previous_layout_is_moved_over(db: Path) -> None:
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.executescript(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO devices(id, board, fw, transport, first_seen, last_seen, last_report, reports, cfg, cfgver)"
        " VALUES (?, 'esp32-devkitc', '0.1.0', 'mqtt', 1.0, 3.0, ?, 3, ?, 2)",
        (DEV, json.dumps({"boot": 1, "seq": 3, "received": 3.0, "transport": "mqtt"}), '{"cfgver": 2}'),
    )
    for seq in (1, 2, 3):
        conn.execute("INSERT INTO seen(device, boot, seq) VALUES (?, 1, ?)", (DEV, seq))
        body = {k: v for k, v in report(1, seq).items() if k != "id"}
        conn.execute(
            "INSERT INTO reports(device, boot, seq, received, transport, fields) VALUES (?, 1, ?, ?, 'mqtt', ?)",
            (DEV, seq, float(seq), json.dumps(body)),
        )
    conn.commit()
    conn.close()
    reg = Registry(db, clock=Clock())
    try:
        for seq in (1, 2, 3):
            assert reg.record_report(DEV, report(1, seq), "mqtt") is False  # known from before
        assert reg.record_report(DEV, report(1, 4), "coap") is True
        d = reg.device(DEV)
        assert d is not None and d["reports_total"] == 4 and d["duplicates_total"] == 3
        assert [(r["seq"], r["transport"]) for r in d["recent_reports"]] == [
            (4, "coap"),
            (3, "mqtt"),
            (2, "mqtt"),
            (1, "mqtt"),
        ]
        assert d["recent_reports"][1]["uptime"] == 30  # a JSON row of the old layout, read as it was
        assert d["last_report"]["seq"] == 4 and d["config"]["desired"] == {"cfgver": 2}
        assert reg.desired_cfgver(DEV) == 2
    finally:
        reg.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "seen_v1" not in names and "seen_by_device" not in names and "reports_by_device" not in names
    finally:
        conn.close()


def test_identifier_cache_is_identifier_normalise() -> None:
    ids = IdentifierCache(size=4)
    for text in ["88.abc/Pump", "0.na/x", "88.1/a/b c", "88.ÄÖ/x", "x/\u00e9", "88.1/x" + "y" * 300]:
        try:
            want: str | type = identifier.normalise(text)
        except identifier.IdentifierError:
            want = identifier.IdentifierError
        for _ in range(2):  # a miss, then from memory
            if want is identifier.IdentifierError:
                with pytest.raises(identifier.IdentifierError):
                    ids.normalise(text)
            else:
                assert ids.normalise(text) == want
