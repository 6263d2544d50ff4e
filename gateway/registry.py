"""Device registry: who is out there, what they last reported, their desired config and its acknowledgement.

One SQLite file (WAL) under the data dir, shared with the report outbox (``gateway/outbox.py``) so that an
accepted report is stored and enqueued northbound in one transaction. Front ends (MQTT here, CoAP and HTTP in
``gateway/frontends/``) call it from the asyncio loop; every call is a short synchronous SQLite transaction
(a lock makes it safe from other threads too).

Reports are de-duplicated by (device, boot, seq): a duplicate returns False, is counted, and is not stored or
enqueued again; front ends still acknowledge it with code 1 so the device drops it from its flash queue.
History is bounded: the newest ``history`` reports per device are kept for the API and the newest ``dedupe``
(device, boot, seq) keys per device for de-duplication; the outbox is the durable path northbound.

Desired config: ``set_desired_config`` bumps a per-device ``cfgver`` (monotonic, never reused, survives
restarts and clears) and notifies ``on_config_change`` listeners (the MQTT front end publishes it retained on
``ida/v1/d/<dev>/cfg``; CoAP devices fetch or observe it). A parameter left as None keeps its current value;
a given one replaces it (``meta`` is replaced as a whole map). The device's ``config_ack`` is recorded with
``record_config_ack``; an ack for an older cfgver than one already recorded is ignored.

Identifiers are stored normalised (``gateway.identifier.normalise``). Times are Unix seconds (floats).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gateway import wire
from gateway.errors import StorageError
from gateway.identifier import normalise
from gateway.logfmt import kv
from gateway.outbox import Outbox, connect, report_payload, transaction

log = logging.getLogger(__name__)

INTERVAL_MIN = 10
INTERVAL_MAX = 86400
MAX_CONFIG_BYTES = 2048  # encoded `config` message; devices hold it in RAM
MAX_SQL_INT = 2**63 - 1

ConfigListener = Callable[[str, dict[str, Any]], None]

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,            -- normalised identifier
    board TEXT, fw TEXT,
    transport TEXT, peer TEXT,      -- last transport / peer address seen
    online INTEGER,                 -- 1 / 0, NULL = never told
    status_changed REAL,
    first_seen REAL NOT NULL,
    last_seen REAL,
    last_report TEXT,               -- JSON: fields of the newest accepted report + received, transport
    reports INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    cfgver INTEGER NOT NULL DEFAULT 0,   -- highest desired-config version issued (0 = never)
    cfg TEXT,                       -- JSON `config` fields of the desired config, NULL = none
    cfg_set REAL,
    ack_cfgver INTEGER, ack_code INTEGER, ack_msg TEXT, ack_time REAL
);
CREATE TABLE IF NOT EXISTS seen (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL,
    UNIQUE (device, boot, seq)
);
CREATE INDEX IF NOT EXISTS seen_by_device ON seen(device, id);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL,
    received REAL NOT NULL, transport TEXT NOT NULL, peer TEXT,
    fields TEXT NOT NULL            -- JSON
);
CREATE INDEX IF NOT EXISTS reports_by_device ON reports(device, id);
"""


@contextlib.contextmanager
def _storage(what: str, path: Path) -> Iterator[None]:
    """Turn a failed SQLite write (disk full, I/O error, file size limit) into StorageError, logged once here.
    SQLite rolls the transaction back; nothing is half-stored and the next write works once space is back."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as e:
        name = getattr(e, "sqlite_errorname", "") or ""
        full = name == "SQLITE_FULL" or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        if not (full or name.startswith("SQLITE_IOERR") or isinstance(e, OSError)):
            raise  # locked, busy, a bug: not a storage fault
        kind = "disk full" if full else "disk write failed"
        log.error("%s: %s not stored %s", kind, what, kv(path=path, error=str(e)))
        raise StorageError(f"{kind}: {what} not stored") from e


def _uint(fields: Mapping[str, Any], name: str) -> int:
    v = fields.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SQL_INT:
        raise ValueError(f"report field {name!r} must be an unsigned integer below 2^63, got {v!r}")
    return v


def validate_interval(interval: Any) -> int:
    if (
        not isinstance(interval, int)
        or isinstance(interval, bool)
        or not INTERVAL_MIN <= interval <= INTERVAL_MAX
    ):
        raise ValueError(
            f"interval must be an integer number of seconds in {INTERVAL_MIN}..{INTERVAL_MAX}, got {interval!r}"
        )
    return interval


def validate_meta(meta: Any) -> dict[str, str]:
    if not isinstance(meta, Mapping):
        raise ValueError("meta must be a map of value type -> text")
    for k, v in meta.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValueError(f"meta entries must be non-empty text keys with text values, got {k!r}: {v!r}")
    return dict(meta)


class Registry:
    def __init__(self, path: Path, outbox: Outbox | None = None, *, history: int = 20, dedupe: int = 1024,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.path = Path(path)
        if outbox is not None and outbox.path.resolve() != self.path.resolve():
            raise ValueError(
                f"the outbox must live in the registry's database ({self.path}), not {outbox.path}: "
                "a report is stored and enqueued in one transaction"
            )
        if history < 1 or dedupe < history:
            raise ValueError("need history >= 1 and dedupe >= history")
        self.outbox = outbox
        self._history = history
        self._dedupe = dedupe
        self._clock = clock
        self._lock = threading.RLock()
        self._listeners: list[ConfigListener] = []
        self._conn = connect(self.path)
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- reports ---------------------------------------------------------------------------------------
    def record_report(
        self, identifier: str, fields: Mapping[str, Any], transport: str, peer: str | None = None
    ) -> bool:
        """Store a report; True if new, False if a duplicate by (device, boot, seq).

        A new report is stored and enqueued to the outbox in one transaction. Raises ValueError (incl.
        IdentifierError and wire.WireError) for a bad identifier or fields, or when ``fields['id']`` names
        another device (front ends check that first and answer 403); StorageError when the disk is full (or
        the write fails): nothing stored, the front end answers 5.00 and the device sends it again.
        """
        ident = normalise(identifier)
        if "id" in fields and normalise(str(fields["id"])) != ident:
            raise ValueError(f"report id {fields['id']!r} does not match device {ident!r}")
        boot, seq = _uint(fields, "boot"), _uint(fields, "seq")
        body = {k: v for k, v in fields.items() if k != "id"}
        wire.encode("report", {**body, "id": ident})  # same checks as a decoded payload (WireError)
        now = self._clock()
        stored = {**body, "received": round(now, 3), "transport": transport}
        with self._lock, _storage("report", self.path):
            with transaction(self._conn) as c:
                self._ensure_device(c, ident, now)
                cur = c.execute(
                    "INSERT OR IGNORE INTO seen(device, boot, seq) VALUES (?, ?, ?)", (ident, boot, seq)
                )
                if cur.rowcount == 0:
                    c.execute(
                        "UPDATE devices SET duplicates = duplicates + 1, last_seen = ?, transport = ?,"
                        " peer = COALESCE(?, peer) WHERE id = ?",
                        (now, transport, peer, ident),
                    )
                    new = False
                else:
                    c.execute(
                        "INSERT INTO reports(device, boot, seq, received, transport, peer, fields)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (ident, boot, seq, now, transport, peer, json.dumps(body, ensure_ascii=False)),
                    )
                    c.execute(
                        "UPDATE devices SET board = COALESCE(?, board), fw = COALESCE(?, fw), transport = ?,"
                        " peer = COALESCE(?, peer), last_seen = ?, last_report = ?, reports = reports + 1"
                        " WHERE id = ?",
                        (body.get("board"), body.get("fw"), transport, peer, now,
                         json.dumps(stored, ensure_ascii=False), ident),
                    )  # fmt: skip
                    self._prune(c, "seen", ident, self._dedupe)
                    self._prune(c, "reports", ident, self._history)
                    if self.outbox is not None:
                        self.outbox.enqueue_on(c, report_payload(ident, fields, now, transport, peer), now)
                    new = True
        if new and self.outbox is not None:
            self.outbox.notify()
        log.debug("report %s", kv(device=ident, boot=boot, seq=seq, transport=transport, new=new))
        return new

    @staticmethod
    def _prune(c: sqlite3.Connection, table: str, ident: str, keep: int) -> None:
        c.execute(
            f"DELETE FROM {table} WHERE device = ? AND id <= "
            f"(SELECT id FROM {table} WHERE device = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (ident, ident, keep),
        )

    @staticmethod
    def _ensure_device(c: sqlite3.Connection, ident: str, now: float) -> None:
        c.execute(
            "INSERT INTO devices(id, first_seen) VALUES (?, ?) ON CONFLICT(id) DO NOTHING", (ident, now)
        )

    # -- status ----------------------------------------------------------------------------------------
    def set_status(self, identifier: str, online: bool, transport: str) -> None:
        """Online/offline (MQTT retained status and last will). ``status_changed`` moves only on a change."""
        ident = normalise(identifier)
        now = self._clock()
        flag = 1 if online else 0
        with self._lock, transaction(self._conn) as c:
            self._ensure_device(c, ident, now)
            c.execute(
                "UPDATE devices SET status_changed = CASE WHEN online IS ? THEN status_changed ELSE ? END,"
                " online = ?, transport = ?, last_seen = CASE WHEN ? THEN ? ELSE last_seen END WHERE id = ?",
                (flag, now, flag, transport, flag, now, ident),
            )
        log.debug("device status %s", kv(device=ident, online=online, transport=transport))

    # -- desired config --------------------------------------------------------------------------------
    def on_config_change(self, callback: ConfigListener) -> None:
        """``callback(identifier, config_fields)`` after every change; ``{}`` means the config was cleared.

        Called synchronously in the thread that changed the config, after the commit."""
        with self._lock:
            self._listeners.append(callback)

    def off_config_change(self, callback: ConfigListener) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def _notify(self, ident: str, cfg: dict[str, Any]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(ident, dict(cfg))
            except Exception:
                log.exception("config listener failed %s", kv(device=ident))

    def set_desired_config(self, identifier: str, interval: int | None = None,
                           meta: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        """Issue a new desired config (next cfgver) and return its ``config`` message fields.

        The device need not be known yet (pre-provisioning). ValueError for a bad identifier, an interval
        outside 10..86400 or a meta map that is not text -> text."""
        ident = normalise(identifier)
        if interval is not None:
            validate_interval(interval)
        if meta is not None:
            meta = validate_meta(meta)
        now = self._clock()
        with self._lock:
            with transaction(self._conn) as c:
                self._ensure_device(c, ident, now)
                ver, cur_text = c.execute("SELECT cfgver, cfg FROM devices WHERE id = ?", (ident,)).fetchone()
                current = json.loads(cur_text) if cur_text else {}
                cfg: dict[str, Any] = {"cfgver": int(ver) + 1}
                if interval is not None:
                    cfg["interval"] = interval
                elif "interval" in current:
                    cfg["interval"] = current["interval"]
                if meta is not None:
                    if meta:
                        cfg["meta"] = meta
                elif "meta" in current:
                    cfg["meta"] = current["meta"]
                size = len(wire.encode("config", cfg))
                if size > MAX_CONFIG_BYTES:
                    raise ValueError(f"config would be {size} bytes on the wire, at most {MAX_CONFIG_BYTES}")
                c.execute(
                    "UPDATE devices SET cfgver = ?, cfg = ?, cfg_set = ? WHERE id = ?",
                    (cfg["cfgver"], json.dumps(cfg, ensure_ascii=False), now, ident),
                )
        log.info("desired config set %s", kv(device=ident, cfgver=cfg["cfgver"], interval=cfg.get("interval"),
                                             meta_keys=len(cfg.get("meta", {}))))  # fmt: skip
        self._notify(ident, cfg)
        return cfg

    def clear_desired_config(self, identifier: str) -> bool:
        """Remove the desired config (MQTT: an empty retained message). False if there was none."""
        ident = normalise(identifier)
        with self._lock:
            with transaction(self._conn) as c:
                cur = c.execute("UPDATE devices SET cfg = NULL, cfg_set = ? WHERE id = ? AND cfg IS NOT NULL",
                                (self._clock(), ident))  # fmt: skip
                changed = cur.rowcount > 0
        if changed:
            log.info("desired config cleared %s", kv(device=ident))
            self._notify(ident, {})
        return changed

    def desired_config(self, identifier: str) -> dict[str, Any] | None:
        ident = normalise(identifier)
        with self._lock:
            row = self._conn.execute("SELECT cfg FROM devices WHERE id = ?", (ident,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def desired_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """(identifier, config fields) for every device with a desired config (published at MQTT connect)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, cfg FROM devices WHERE cfg IS NOT NULL ORDER BY id"
            ).fetchall()
        return [(r[0], json.loads(r[1])) for r in rows]

    def record_config_ack(self, identifier: str, cfgver: int, code: int, msg: str | None = None) -> None:
        """The device's ``config_ack`` (code 1 applied, 400 rejected). Older than the recorded ack: ignored."""
        ident = normalise(identifier)
        if not isinstance(cfgver, int) or isinstance(cfgver, bool) or not 0 <= cfgver <= MAX_SQL_INT:
            raise ValueError(f"cfgver must be an unsigned integer, got {cfgver!r}")
        if not isinstance(code, int) or isinstance(code, bool) or code < 0:
            raise ValueError(f"code must be an unsigned integer, got {code!r}")
        now = self._clock()
        with self._lock, transaction(self._conn) as c:
            self._ensure_device(c, ident, now)
            cur = c.execute(
                "UPDATE devices SET ack_cfgver = ?, ack_code = ?, ack_msg = ?, ack_time = ?, last_seen = ?"
                " WHERE id = ? AND (ack_cfgver IS NULL OR ack_cfgver <= ?)",
                (cfgver, code, msg, now, now, ident, cfgver),
            )
            issued = c.execute("SELECT cfgver FROM devices WHERE id = ?", (ident,)).fetchone()[0]
        if cur.rowcount == 0:
            log.info("config ack older than the recorded one ignored %s", kv(device=ident, cfgver=cfgver))
        elif cfgver > issued:
            log.warning(
                "config ack for a cfgver never issued %s", kv(device=ident, cfgver=cfgver, issued=issued)
            )
        else:
            log.info("config ack %s", kv(device=ident, cfgver=cfgver, code=code))

    # -- views -----------------------------------------------------------------------------------------
    _COLUMNS = (
        "id, board, fw, transport, peer, online, status_changed, first_seen, last_seen, last_report, reports,"
        " duplicates, cfgver, cfg, cfg_set, ack_cfgver, ack_code, ack_msg, ack_time"
    )

    @staticmethod
    def _device_dict(r: tuple[Any, ...]) -> dict[str, Any]:
        (ident, board, fw, transport, peer, online, status_changed, first_seen, last_seen, last_report, reports,
         duplicates, _issued, cfg_text, cfg_set, ack_ver, ack_code, ack_msg, ack_time) = r  # fmt: skip
        last = json.loads(last_report) if last_report else None
        desired = json.loads(cfg_text) if cfg_text else None
        if desired is None:
            state = "none"
        elif ack_ver == desired["cfgver"]:
            state = "applied" if ack_code == wire.OK else "rejected"
        else:
            state = "pending"
        return {
            "id": ident,
            "board": board,
            "fw": fw,
            "transport": transport,
            "peer": peer,
            "online": None if online is None else bool(online),
            "status_changed": status_changed,
            "first_seen": first_seen,
            "last_seen": last_seen,
            "queue": last.get("queue") if last else None,
            "dropped": last.get("dropped") if last else None,
            "reports_total": reports,
            "duplicates_total": duplicates,
            "last_report": last,
            "config": {
                "desired": desired,
                "set_at": cfg_set,
                "acked_cfgver": ack_ver,
                "ack_code": ack_code,
                "ack_msg": ack_msg,
                "acked_at": ack_time,
                "state": state,  # none | pending | applied | rejected
            },
        }

    def devices(self) -> list[dict[str, Any]]:
        """Every device, JSON-ready (as ``device()`` without ``recent_reports``), ordered by id."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {self._COLUMNS} FROM devices ORDER BY id").fetchall()
        return [self._device_dict(r) for r in rows]

    def device(self, identifier: str) -> dict[str, Any] | None:
        """One device, JSON-ready, with ``recent_reports`` (newest first, at most ``history``); None if unknown."""
        try:
            ident = normalise(identifier)
        except ValueError:
            return None
        with self._lock:
            row = self._conn.execute(f"SELECT {self._COLUMNS} FROM devices WHERE id = ?", (ident,)).fetchone()
            if row is None:
                return None
            out = self._device_dict(row)
            out["recent_reports"] = self._recent(ident, self._history)
        return out

    def recent_reports(self, identifier: str, limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return self._recent(normalise(identifier), limit or self._history)

    def _recent(self, ident: str, limit: int) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT boot, seq, received, transport, peer, fields FROM reports WHERE device = ?"
            " ORDER BY id DESC LIMIT ?",
            (ident, limit),
        ).fetchall()
        out = []
        for boot, seq, received, transport, peer, fields in rows:
            d = json.loads(fields)
            d.update(boot=boot, seq=seq, received=received, transport=transport)
            if peer is not None:
                d["peer"] = peer
            out.append(d)
        return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            online, total, reports, dups = self._conn.execute(
                "SELECT COALESCE(SUM(online = 1), 0), COUNT(*), COALESCE(SUM(reports), 0),"
                " COALESCE(SUM(duplicates), 0) FROM devices"
            ).fetchone()
            has_outbox = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"
            ).fetchone()
            depth = self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] if has_outbox else 0
        return {
            "devices_online": int(online),
            "devices_total": int(total),
            "reports_total": int(reports),
            "duplicates_total": int(dups),
            "outbox_depth": int(depth),
        }
