"""gateway/registry.py: de-duplication, bounded history, desired config versions and acks, status,
the report + outbox row in one transaction, and state kept across a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.outbox import Outbox
from gateway.registry import Registry
from proto import devicemsg
from proto.identifier import IdentifierError
from tests.support.gwhelpers import report_fields

DEV = "88.123.99/PUMP-0001"


class NullSink:
    """A sink that is never started here: it only makes the outbox enqueue."""

    name = "null"

    async def start(self) -> None: ...

    async def deliver(self, payload: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def report(boot: int = 1, seq: int = 1, ident: str = DEV, **extra: Any) -> dict[str, Any]:
    return report_fields(ident, boot, seq, **{"uptime": 10 * seq, "heap": 80000, "queue": 2, **extra})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "gateway.db"


@pytest.fixture
def reg(db: Path) -> Any:
    r = Registry(db, clock=Clock())
    yield r
    r.close()


def test_new_then_duplicate(reg: Registry) -> None:
    assert reg.record_report(DEV, report(1, 1), "mqtt") is True
    assert reg.record_report(DEV, report(1, 1), "coap", peer="10.0.0.7:5683") is False
    assert reg.record_report(DEV, report(1, 2), "mqtt") is True
    assert reg.record_report(DEV, report(2, 1), "mqtt") is True  # new boot, seq starts again
    s = reg.stats()
    assert s["reports_total"] == 3 and s["duplicates_total"] == 1 and s["devices_total"] == 1
    d = reg.device(DEV)
    assert d is not None
    assert d["reports_total"] == 3 and d["duplicates_total"] == 1
    assert d["board"] == "esp32-devkitc" and d["fw"] == "0.1.0" and d["queue"] == 2
    assert [(r["boot"], r["seq"]) for r in d["recent_reports"]] == [(2, 1), (1, 2), (1, 1)]
    assert d["last_report"]["boot"] == 2 and d["last_report"]["transport"] == "mqtt"


def test_identifier_is_normalised(reg: Registry) -> None:
    assert reg.record_report("88.abc/Pump", report(ident="88.ABC/Pump"), "mqtt")
    assert reg.record_report("88.ABC/Pump", report(ident="88.abc/Pump"), "mqtt") is False
    assert reg.device("88.abc/Pump")["id"] == "88.ABC/Pump"  # type: ignore[index]
    assert reg.device("88.ABC/pump") is None  # the suffix keeps its case


def test_bad_reports_are_rejected(reg: Registry) -> None:
    with pytest.raises(ValueError):
        reg.record_report(DEV, report(ident="88.123.99/OTHER"), "mqtt")  # id names another device
    with pytest.raises(ValueError):
        reg.record_report(DEV, {**report(), "seq": -1}, "mqtt")
    with pytest.raises(ValueError):
        reg.record_report(DEV, {**report(), "seq": True}, "mqtt")
    with pytest.raises(devicemsg.WireError):
        reg.record_report(DEV, {**report(), "rssi": "weak"}, "mqtt")
    with pytest.raises(IdentifierError):
        reg.record_report("no-slash", report(ident="no-slash"), "mqtt")
    assert reg.stats()["reports_total"] == 0


def test_history_and_dedupe_window_are_bounded(db: Path) -> None:
    r = Registry(db, history=3, dedupe=5, prune_every=1)  # windows applied after every report: exact
    for seq in range(1, 11):
        assert r.record_report(DEV, report(1, seq), "mqtt")
    d = r.device(DEV)
    assert d is not None and [x["seq"] for x in d["recent_reports"]] == [10, 9, 8]
    assert r.record_report(DEV, report(1, 10), "mqtt") is False  # inside the window
    assert r.record_report(DEV, report(1, 6), "mqtt") is False
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 5
    assert conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 3
    conn.close()
    r.close()


def test_windows_pruned_amortised(db: Path) -> None:
    """By default a device's windows are applied every ``history`` new reports: ``reports`` stays within
    window + history - 1 rows of it and ``seen`` (trimmed every ``dedupe // history`` prunes) within twice its
    window, reads show exactly the newest ``history``, and every key of the window is still a duplicate."""
    history, dedupe = 4, 10
    r = Registry(db, history=history, dedupe=dedupe)
    conn = sqlite3.connect(db)
    try:
        for seq in range(1, 41):
            assert r.record_report(DEV, report(1, seq), "mqtt")
            n_reports = conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0]
            n_seen = conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
            assert history <= n_reports <= 2 * history - 1 or n_reports == seq
            assert n_seen <= 2 * dedupe
            d = r.device(DEV)
            assert d is not None
            assert [x["seq"] for x in d["recent_reports"]] == list(range(seq, max(0, seq - history), -1))
            assert d["last_report"]["seq"] == seq
        for seq in range(40 - history - dedupe + 1, 41):  # the whole window
            assert r.record_report(DEV, report(1, seq), "mqtt") is False
        assert r.stats()["reports_total"] == 40
    finally:
        conn.close()
        r.close()


def test_status_online_offline(db: Path) -> None:
    clock = Clock()
    reg = Registry(db, clock=clock)
    reg.set_status(DEV, True, "mqtt")
    d = reg.device(DEV)
    assert d is not None and d["online"] is True and d["status_changed"] == clock.t
    t0 = clock.t
    clock.t += 10
    reg.set_status(DEV, True, "mqtt")  # a retained status seen again: no change
    assert reg.device(DEV)["status_changed"] == t0  # type: ignore[index]
    clock.t += 10
    reg.set_status(DEV, False, "mqtt")
    d = reg.device(DEV)
    assert d is not None and d["online"] is False and d["status_changed"] == clock.t
    assert reg.stats()["devices_online"] == 0
    reg.set_status("88.123.99/PUMP-0002", True, "mqtt")
    assert reg.stats() == {
        "devices_online": 1,
        "devices_total": 2,
        "reports_total": 0,
        "duplicates_total": 0,
        "outbox_depth": 0,
    }
    reg.close()


def test_desired_config_versions(reg: Registry) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    reg.on_config_change(lambda ident, cfg: seen.append((ident, cfg)))
    assert reg.desired_config(DEV) is None
    c1 = reg.set_desired_config(DEV, interval=60)
    assert c1 == {"cfgver": 1, "interval": 60}
    c2 = reg.set_desired_config(DEV, meta={"URL": "https://example.com/pump"})
    assert c2 == {"cfgver": 2, "interval": 60, "meta": {"URL": "https://example.com/pump"}}  # interval kept
    c3 = reg.set_desired_config(DEV, interval=300, meta={})
    assert c3 == {"cfgver": 3, "interval": 300}  # empty meta removes it
    assert reg.desired_config(DEV) == c3
    assert seen == [(DEV, c1), (DEV, c2), (DEV, c3)]
    devicemsg.encode("config", c3)  # a valid `config` message
    assert reg.clear_desired_config(DEV) is True
    assert reg.clear_desired_config(DEV) is False
    assert seen[-1] == (DEV, {}) and reg.desired_config(DEV) is None
    assert reg.set_desired_config(DEV, interval=10)["cfgver"] == 4  # never reused after a clear
    # another device has its own counter
    assert reg.set_desired_config("88.123.99/PUMP-0002", interval=86400)["cfgver"] == 1
    assert [i for i, _ in reg.desired_configs()] == [DEV, "88.123.99/PUMP-0002"]


@pytest.mark.parametrize("interval", [9, 86401, 0, -5, True, 60.0, "60"])
def test_interval_is_validated(reg: Registry, interval: Any) -> None:
    with pytest.raises(ValueError):
        reg.set_desired_config(DEV, interval=interval)
    assert reg.desired_config(DEV) is None


@pytest.mark.parametrize("meta", [{"URL": 5}, {"": "x"}, ["URL", "x"], {"URL": "x" * 3000}])
def test_meta_is_validated(reg: Registry, meta: Any) -> None:
    with pytest.raises(ValueError):
        reg.set_desired_config(DEV, meta=meta)


def test_listener_failure_does_not_break_the_change(reg: Registry) -> None:
    def boom(ident: str, cfg: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    got: list[int] = []
    reg.on_config_change(boom)
    reg.on_config_change(lambda i, c: got.append(c["cfgver"]))
    assert reg.set_desired_config(DEV, interval=20)["cfgver"] == 1
    assert got == [1]
    reg.off_config_change(boom)


def test_config_ack(reg: Registry) -> None:
    reg.set_desired_config(DEV, interval=60)
    assert reg.device(DEV)["config"]["state"] == "pending"  # type: ignore[index]
    reg.record_config_ack(DEV, 1, devicemsg.OK)
    cfg = reg.device(DEV)["config"]  # type: ignore[index]
    assert cfg["acked_cfgver"] == 1 and cfg["ack_code"] == 1 and cfg["state"] == "applied"
    reg.set_desired_config(DEV, interval=5000)
    reg.record_config_ack(DEV, 2, devicemsg.BAD_REQUEST, "interval not supported")
    cfg = reg.device(DEV)["config"]  # type: ignore[index]
    assert (cfg["acked_cfgver"], cfg["ack_code"], cfg["ack_msg"], cfg["state"]) == (
        2,
        400,
        "interval not supported",
        "rejected",
    )
    reg.record_config_ack(DEV, 1, devicemsg.OK)  # a late retransmission of an older ack: ignored
    assert reg.device(DEV)["config"]["acked_cfgver"] == 2  # type: ignore[index]
    with pytest.raises(ValueError):
        reg.record_config_ack(DEV, -1, 1)


def test_report_and_outbox_row_in_one_transaction(db: Path) -> None:
    ob = Outbox(db, [NullSink()])
    r = Registry(db, ob)
    assert r.record_report(DEV, report(1, 1), "mqtt", peer="10.1.2.3")
    rows = ob.rows()
    assert len(rows) == 1
    p = rows[0]["payload"]
    assert (p["id"], p["boot"], p["seq"], p["transport"], p["peer"]) == (DEV, 1, 1, "mqtt", "10.1.2.3")
    assert p["board"] == "esp32-devkitc" and isinstance(p["received"], float)
    assert r.stats()["outbox_depth"] == 1
    # The outbox insert fails -> the report is not stored either (and is new again once it can be).
    r._conn.execute(  # type: ignore[attr-defined]
        "CREATE TEMP TRIGGER no_outbox BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    with pytest.raises(sqlite3.DatabaseError):
        r.record_report(DEV, report(1, 2), "mqtt")
    d = r.device(DEV)
    assert d is not None and d["reports_total"] == 1 and len(d["recent_reports"]) == 1
    r._conn.execute("DROP TRIGGER no_outbox")  # type: ignore[attr-defined]
    assert r.record_report(DEV, report(1, 2), "mqtt") is True
    assert r.record_report(DEV, report(1, 2), "mqtt") is False  # duplicates are not enqueued again
    assert [x["payload"]["seq"] for x in ob.rows()] == [1, 2]
    r.close()
    ob.close()


def test_outbox_must_share_the_database(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "other.db", [NullSink()])
    with pytest.raises(ValueError):
        Registry(tmp_path / "gateway.db", ob)
    ob.close()


def test_restart_keeps_state(db: Path) -> None:
    r = Registry(db)
    r.record_report(DEV, report(3, 7), "mqtt")
    r.set_status(DEV, True, "mqtt")
    r.set_desired_config(DEV, interval=120, meta={"EMAIL": "ops@example.com"})
    r.record_config_ack(DEV, 1, devicemsg.OK)
    r.close()
    r2 = Registry(db)
    assert r2.record_report(DEV, report(3, 7), "mqtt") is False  # still a duplicate after the restart
    assert r2.desired_config(DEV) == {"cfgver": 1, "interval": 120, "meta": {"EMAIL": "ops@example.com"}}
    assert r2.set_desired_config(DEV, interval=130)["cfgver"] == 2
    d = r2.device(DEV)
    assert d is not None and d["online"] is True and d["config"]["acked_cfgver"] == 1
    assert d["reports_total"] == 1 and d["duplicates_total"] == 1
    assert [x["id"] for x in r2.devices()] == [DEV]
    assert "recent_reports" not in r2.devices()[0]
    r2.close()


def test_devices_view_is_json_ready(reg: Registry) -> None:
    import json

    reg.record_report(DEV, report(sensors={"temp": 21.5, "ok": True}, dropped=3), "coap", peer="[::1]:5683")
    reg.set_desired_config("88.123.99/NEW", interval=60)  # pre-provisioned, never seen
    out = json.loads(json.dumps({"devices": reg.devices(), "one": reg.device(DEV)}))
    assert [d["id"] for d in out["devices"]] == ["88.123.99/NEW", DEV]
    one = out["one"]
    assert one["dropped"] == 3 and one["last_report"]["sensors"] == {"temp": 21.5, "ok": True}
    assert one["peer"] == "[::1]:5683" and one["transport"] == "coap" and one["online"] is None
    assert out["devices"][0]["last_report"] is None and out["devices"][0]["config"]["state"] == "pending"


def test_desired_cfgver_follows_set_and_clear_and_survives_a_reopen(db: Path) -> None:
    ident = "88.123.99/PUMP-0001"
    r = Registry(db)
    try:
        assert r.desired_cfgver(ident) is None
        r.set_desired_config(ident, interval=60)
        r.set_desired_config(ident, interval=30)
        r.set_desired_config("88.123.99/OTHER", interval=60)
        assert r.desired_cfgver(ident) == 2
        r.clear_desired_config("88.123.99/OTHER")
        assert r.desired_cfgver("88.123.99/OTHER") is None
    finally:
        r.close()
    again = Registry(db)
    try:
        assert again.desired_cfgver(ident) == 2 and again.desired_cfgver("88.123.99/OTHER") is None
    finally:
        again.close()
