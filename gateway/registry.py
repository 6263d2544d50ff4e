"""Device registry: who is out there, what they last reported, their desired config and its acknowledgement.

One SQLite file (WAL) under the data dir, shared with the report outbox (``gateway/outbox.py``) so that an
accepted report is stored and enqueued northbound in one transaction. Front ends (MQTT here, CoAP and HTTP in
``gateway/frontends/``) call it from the asyncio loop; most calls are a short synchronous SQLite transaction
(a lock makes it safe from other threads too).

Group commit: ``record_report_async`` (what the front ends use) does not commit on its own. It validates the
report at once (ValueError as ``record_report``), queues it, and awaits the commit of the batch it is in: a
batch is flushed when ``batch_max`` reports wait or ``batch_delay`` seconds after the first one, whichever
comes first, and while one batch commits (in the registry's single writer thread, off the event loop) the next
one fills. One batch = one transaction (store + outbox enqueue for every report, de-duplication by
(device, boot, seq) applied in order, so a duplicate inside the same batch is stored once) = one fsync
(synchronous=FULL). Only after that commit does any caller in the batch get its result, so a front end never
acknowledges a report that is not durable; if the commit fails every caller in the batch gets the error and
nothing is acknowledged (the devices send again). ``record_report`` (synchronous, one transaction) still works.

Status (MQTT online/offline) is deliberately *not* fsync-durable on its own: ``set_status`` skips the write
when the device's online flag and transport are unchanged (an in-memory copy of what was last written, and the
UPDATE itself is conditional), otherwise queues the change; pending changes are written in one transaction
with synchronous=NORMAL (WAL: no fsync at commit) shortly after, or as part of the next report batch (then they
ride on its fsync), and before any read of the registry. Losing a status flip in a power cut is acceptable (the
device's retained status / last will says it again); losing an acknowledged report is not, so reports always
commit with synchronous=FULL.

Reports are de-duplicated by (device, boot, seq): a duplicate returns False, is counted, and is not stored or
enqueued again; front ends still acknowledge it with code 1 so the device drops it from its flash queue.
History is bounded: the newest ``history`` reports per device are kept for the API and the newest ``dedupe``
(device, boot, seq) keys per device for de-duplication; the outbox is the durable path northbound.

Desired config: ``set_desired_config`` bumps a per-device ``cfgver`` (monotonic, never reused, survives
restarts and clears) and notifies ``on_config_change`` listeners (the MQTT front end publishes it retained on
``ida/v1/d/<dev>/cfg``; CoAP devices fetch or observe it). A parameter left as None keeps its current value;
a given one replaces it (``meta`` is replaced as a whole map). The device's ``config_ack`` is recorded with
``record_config_ack``; an ack for an older cfgver than one already recorded is ignored.

Identifiers are stored normalised (``proto.identifier.normalise``). Times are Unix seconds (floats).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import StorageError
from gateway.logfmt import kv
from gateway.outbox import Outbox, connect, report_payload, transaction
from proto import devicemsg
from proto.identifier import normalise

log = logging.getLogger(__name__)

INTERVAL_MIN = 10
INTERVAL_MAX = 86400
MAX_CONFIG_BYTES = 2048  # encoded `config` message; devices hold it in RAM
MAX_SQL_INT = 2**63 - 1

BATCH_MAX = 256  # reports per group commit
BATCH_DELAY = 0.005  # seconds a report waits for others before its batch commits
STATUS_DELAY = 0.05  # seconds a status change waits before it is written (without fsync)

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


@dataclass
class _Report:
    """A validated report, ready to store (``record_report`` / ``record_report_async``)."""

    ident: str
    boot: int
    seq: int
    body: dict[str, Any]
    fields: Mapping[str, Any]
    now: float
    transport: str
    peer: str | None


_Waiting = tuple[_Report, "asyncio.Future[bool]"]


def _settle(fut: asyncio.Future[bool], *, result: bool = False, error: BaseException | None = None) -> None:
    if fut.done():  # the caller gave up (cancelled): the report is stored all the same
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _log_status_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and (e := fut.exception()) is not None and not isinstance(e, StorageError):
        log.error("status changes not written %s", kv(error=repr(e)))  # StorageError: logged by _storage


class Registry:
    def __init__(
        self,
        path: Path,
        outbox: Outbox | None = None,
        *,
        history: int = 20,
        dedupe: int = 1024,
        clock: Callable[[], float] = time.time,
        batch_max: int = BATCH_MAX,
        batch_delay: float = BATCH_DELAY,
    ) -> None:
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
        if batch_max < 1 or batch_delay < 0:
            raise ValueError("need batch_max >= 1 and batch_delay >= 0")
        self.batch_max = batch_max
        self.batch_delay = batch_delay
        self.commits = 0  # report and status transactions committed (tests and diagnostics)
        self._conn = connect(self.path)
        self._conn.executescript(SCHEMA)
        # the desired config version of every device that has one, for report acks (read without the lock)
        self._desired: dict[str, int] = dict(
            self._conn.execute("SELECT id, cfgver FROM devices WHERE cfg IS NOT NULL").fetchall()
        )
        # group commit (record_report_async): touched on the event loop thread only
        self._batch: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[list[bool]] | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        # status: (online flag, transport) last written or queued per device, and the queued changes
        self._status_known: dict[str, tuple[int, str]] = {}
        self._status_pending: dict[str, tuple[int, str, float]] = {}
        self._status_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        """Commit what is still queued (reports waiting for a batch, status changes), then close."""
        self._closed = True
        for h in (self._timer, self._status_timer):
            if h is not None:
                h.cancel()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        batch, self._batch = self._batch, []
        if batch:
            try:
                results = self._commit_reports([r for r, _ in batch])
            except Exception as e:
                for _, fut in batch:
                    _settle(fut, error=e)
            else:
                for (_, fut), new in zip(batch, results, strict=True):
                    _settle(fut, result=new)
        with self._lock:
            with contextlib.suppress(sqlite3.Error, StorageError):
                self._flush_status_locked()
            self._conn.close()

    def _committed(self) -> None:
        self.commits += 1

    # -- reports ---------------------------------------------------------------------------------------
    def _prepare(
        self, identifier: str, fields: Mapping[str, Any], transport: str, peer: str | None
    ) -> _Report:
        ident = normalise(identifier)
        if "id" in fields and normalise(str(fields["id"])) != ident:
            raise ValueError(f"report id {fields['id']!r} does not match device {ident!r}")
        boot, seq = _uint(fields, "boot"), _uint(fields, "seq")
        body = {k: v for k, v in fields.items() if k != "id"}
        devicemsg.encode("report", {**body, "id": ident})  # same checks as a decoded payload (WireError)
        return _Report(ident, boot, seq, body, fields, self._clock(), transport, peer)

    def record_report(
        self, identifier: str, fields: Mapping[str, Any], transport: str, peer: str | None = None
    ) -> bool:
        """Store a report; True if new, False if a duplicate by (device, boot, seq).

        A new report is stored and enqueued to the outbox in one transaction. Raises ValueError (incl.
        IdentifierError and devicemsg.WireError) for a bad identifier or fields, or when ``fields['id']`` names
        another device (front ends check that first and answer 403); StorageError when the disk is full (or
        the write fails): nothing stored, the front end answers 5.00 and the device sends it again.
        """
        return self._commit_reports([self._prepare(identifier, fields, transport, peer)])[0]

    async def record_report_async(
        self, identifier: str, fields: Mapping[str, Any], transport: str, peer: str | None = None
    ) -> bool:
        """``record_report`` with group commit: returns (True new / False duplicate) only once the batch holding
        this report has committed with fsync; raises what the commit raised (StorageError, ...) if it failed.
        ValueError for a bad report is raised at once, before anything is queued."""
        item = self._prepare(identifier, fields, transport, peer)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._batch.append((item, fut))
        if self._flushing is None:  # else the batch in flight starts the next one when it is done
            if len(self._batch) >= self.batch_max or self._closed:
                self._start_flush()
            elif self._timer is None:
                self._timer = loop.call_later(self.batch_delay, self._start_flush)
        return await fut

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None or not self._batch:
            return
        batch, self._batch = self._batch[: self.batch_max], self._batch[self.batch_max :]
        loop = asyncio.get_running_loop()
        if self._closed:  # close() ran: no writer thread any more
            flushing: asyncio.Future[list[bool]] = loop.create_future()
            try:
                flushing.set_result(self._commit_reports([r for r, _ in batch]))
            except Exception as e:
                flushing.set_exception(e)
        else:
            flushing = loop.run_in_executor(self._writer_pool(), self._commit_reports, [r for r, _ in batch])
        self._flushing = flushing
        flushing.add_done_callback(lambda f: self._flushed(f, batch))

    def _flushed(self, done: asyncio.Future[list[bool]], batch: list[_Waiting]) -> None:
        self._flushing = None
        error = done.exception()
        for i, (_, fut) in enumerate(batch):
            if error is not None:
                _settle(fut, error=error)
            else:
                _settle(fut, result=done.result()[i])
        if self._batch:  # they waited for a whole commit already: no extra delay
            self._start_flush()

    def _writer_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry-writer")
        return self._writer

    def _commit_reports(self, items: list[_Report]) -> list[bool]:
        """Store ``items`` in order in one transaction (one fsync) with the pending status changes."""
        with (
            self._lock,
            _storage("report" if len(items) == 1 else f"batch of {len(items)} reports", self.path),
        ):
            statuses = self._status_pending
            self._status_pending = {}
            try:
                with transaction(self._conn) as c:
                    self._write_status(c, statuses)
                    results = [self._store(c, item) for item in items]
            except BaseException:
                for ident in statuses:  # not written: let the next status for them write again
                    self._status_known.pop(ident, None)
                raise
            self._committed()
            for item in items:
                known = self._status_known.get(item.ident)
                if known is not None:
                    self._status_known[item.ident] = (known[0], item.transport)
        if any(results) and self.outbox is not None:
            self.outbox.notify()
        for item, new in zip(items, results, strict=True):
            log.debug(
                "report %s",
                kv(device=item.ident, boot=item.boot, seq=item.seq, transport=item.transport, new=new),
            )
        return results

    def _store(self, c: sqlite3.Connection, r: _Report) -> bool:
        ident, now, transport, peer = r.ident, r.now, r.transport, r.peer
        self._ensure_device(c, ident, now)
        cur = c.execute(
            "INSERT OR IGNORE INTO seen(device, boot, seq) VALUES (?, ?, ?)", (ident, r.boot, r.seq)
        )
        if cur.rowcount == 0:
            c.execute(
                "UPDATE devices SET duplicates = duplicates + 1, last_seen = ?, transport = ?,"
                " peer = COALESCE(?, peer) WHERE id = ?",
                (now, transport, peer, ident),
            )
            return False
        body = r.body
        stored = {**body, "received": round(now, 3), "transport": transport}
        c.execute(
            "INSERT INTO reports(device, boot, seq, received, transport, peer, fields)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ident, r.boot, r.seq, now, transport, peer, json.dumps(body, ensure_ascii=False)),
        )
        c.execute(
            "UPDATE devices SET board = COALESCE(?, board), fw = COALESCE(?, fw), transport = ?,"
            " peer = COALESCE(?, peer), last_seen = ?, last_report = ?, reports = reports + 1"
            " WHERE id = ?",
            (
                body.get("board"),
                body.get("fw"),
                transport,
                peer,
                now,
                json.dumps(stored, ensure_ascii=False),
                ident,
            ),
        )
        self._prune(c, "seen", ident, self._dedupe)
        self._prune(c, "reports", ident, self._history)
        if self.outbox is not None:
            self.outbox.enqueue_on(c, report_payload(ident, r.fields, now, transport, peer), now)
        return True

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
        """Online/offline (MQTT retained status and last will). ``status_changed`` moves only on a change.

        No write at all when online flag and transport are as last written; otherwise the change is queued and
        written soon without fsync (see the module docstring: a status flip may be lost in a power cut)."""
        ident = normalise(identifier)
        flag = 1 if online else 0
        with self._lock:
            if self._status_known.get(ident) == (flag, transport):
                return
            self._status_known[ident] = (flag, transport)
            self._status_pending[ident] = (flag, transport, self._clock())
        log.debug("device status %s", kv(device=ident, online=online, transport=transport))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: write now
            self.flush_status()
            return
        if self._status_timer is None and not self._closed:
            self._status_timer = loop.call_later(STATUS_DELAY, self._status_due)

    def _status_due(self) -> None:
        self._status_timer = None
        if self._closed:
            return
        fut = asyncio.get_running_loop().run_in_executor(self._writer_pool(), self.flush_status)
        fut.add_done_callback(_log_status_failure)

    def flush_status(self) -> None:
        """Write the queued status changes now (one transaction, synchronous=NORMAL: no fsync)."""
        with self._lock:
            self._flush_status_locked()

    def _flush_status_locked(self) -> None:
        if not self._status_pending:
            return
        statuses = self._status_pending
        self._status_pending = {}
        self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with _storage("status", self.path), transaction(self._conn) as c:
                self._write_status(c, statuses)
            self._committed()
        except BaseException:
            for ident in statuses:
                self._status_known.pop(ident, None)
            raise
        finally:
            self._conn.execute("PRAGMA synchronous=FULL")

    def _flush_status_quietly(self) -> None:
        """Before a read (lock held): queued changes become visible; a failed write does not fail the read."""
        with contextlib.suppress(sqlite3.Error, StorageError):
            self._flush_status_locked()

    @staticmethod
    def _write_status(c: sqlite3.Connection, statuses: dict[str, tuple[int, str, float]]) -> None:
        if not statuses:
            return
        c.executemany(
            "INSERT INTO devices(id, first_seen) VALUES (?, ?) ON CONFLICT(id) DO NOTHING",
            [(ident, now) for ident, (_, _, now) in statuses.items()],
        )
        c.executemany(  # unchanged (e.g. after a restart emptied the in-memory copy): the row is not touched
            "UPDATE devices SET status_changed = CASE WHEN online IS ? THEN status_changed ELSE ? END,"
            " online = ?, transport = ?, last_seen = CASE WHEN ? THEN ? ELSE last_seen END"
            " WHERE id = ? AND (online IS NOT ? OR transport IS NOT ?)",
            [
                (flag, now, flag, transport, flag, now, ident, flag, transport)
                for ident, (flag, transport, now) in statuses.items()
            ],
        )

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

    def set_desired_config(
        self, identifier: str, interval: int | None = None, meta: dict[str, str] | None = None
    ) -> dict[str, Any]:
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
                size = len(devicemsg.encode("config", cfg))
                if size > MAX_CONFIG_BYTES:
                    raise ValueError(f"config would be {size} bytes on the wire, at most {MAX_CONFIG_BYTES}")
                c.execute(
                    "UPDATE devices SET cfgver = ?, cfg = ?, cfg_set = ? WHERE id = ?",
                    (cfg["cfgver"], json.dumps(cfg, ensure_ascii=False), now, ident),
                )
            self._desired[ident] = cfg["cfgver"]
        log.info(
            "desired config set %s",
            kv(
                device=ident,
                cfgver=cfg["cfgver"],
                interval=cfg.get("interval"),
                meta_keys=len(cfg.get("meta", {})),
            ),
        )
        self._notify(ident, cfg)
        return cfg

    def clear_desired_config(self, identifier: str) -> bool:
        """Remove the desired config (MQTT: an empty retained message). False if there was none."""
        ident = normalise(identifier)
        with self._lock:
            with transaction(self._conn) as c:
                cur = c.execute(
                    "UPDATE devices SET cfg = NULL, cfg_set = ? WHERE id = ? AND cfg IS NOT NULL",
                    (self._clock(), ident),
                )
                changed = cur.rowcount > 0
            self._desired.pop(ident, None)
        if changed:
            log.info("desired config cleared %s", kv(device=ident))
            self._notify(ident, {})
        return changed

    def desired_config(self, identifier: str) -> dict[str, Any] | None:
        ident = normalise(identifier)
        with self._lock:
            row = self._conn.execute("SELECT cfg FROM devices WHERE id = ?", (ident,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def desired_cfgver(self, identifier: str) -> int | None:
        """The version of the device's desired config, None when it has none (``identifier`` normalised; from
        memory: report acks carry it, so a device that missed a config asks for it)."""
        return self._desired.get(identifier)

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
        (
            ident,
            board,
            fw,
            transport,
            peer,
            online,
            status_changed,
            first_seen,
            last_seen,
            last_report,
            reports,
            duplicates,
            _issued,
            cfg_text,
            cfg_set,
            ack_ver,
            ack_code,
            ack_msg,
            ack_time,
        ) = r
        last = json.loads(last_report) if last_report else None
        desired = json.loads(cfg_text) if cfg_text else None
        if desired is None:
            state = "none"
        elif ack_ver == desired["cfgver"]:
            state = "applied" if ack_code == devicemsg.OK else "rejected"
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
            self._flush_status_quietly()
            rows = self._conn.execute(f"SELECT {self._COLUMNS} FROM devices ORDER BY id").fetchall()
        return [self._device_dict(r) for r in rows]

    def device(self, identifier: str) -> dict[str, Any] | None:
        """One device, JSON-ready, with ``recent_reports`` (newest first, at most ``history``); None if unknown."""
        try:
            ident = normalise(identifier)
        except ValueError:
            return None
        with self._lock:
            self._flush_status_quietly()
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
            self._flush_status_quietly()
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
