"""Device registry: who is out there, what they last reported, their desired config and its acknowledgement.

One SQLite file (WAL) under the data dir, shared with the report outbox (``gateway/outbox.py``) so that an
accepted report is stored and enqueued northbound in one transaction. Front ends (MQTT here, CoAP and HTTP in
``gateway/frontends/``) call it from the asyncio loop; most calls are a short synchronous SQLite transaction
(a lock makes it safe from other threads too).

Reports: ``submit_report(ident, report, transport, peer)`` is the front ends' entry -- ``report`` is a
``devicemsg.Report`` (``devicemsg.decode_report``: checked completely, so it can be stored), ``ident`` the
normalised device it must name -- and returns a future that settles once the report's batch has committed with
fsync: True new, False duplicate (acknowledge both). ``record_report_async(identifier, fields, ...)`` is the same
for a dict of fields (checked here), ``record_report`` the synchronous form. Before anything is queued: a report
that can never be stored raises ``devicemsg.InvalidReport`` (permanent: answer 400 so the device drops it), a bad
identifier ``IdentifierError``, an ``id`` naming another device ValueError, and past ``queue_max`` reports waiting
``gateway.errors.Overloaded`` (answer 5.03 + Max-Age ``retry_after``; nothing stored, nothing counted). Group
commit (``gateway/ingest.py``): one batch = one transaction (rows, outbox rows, device rows, de-duplication by
(device, boot, seq) in order, so a duplicate inside the same batch is stored once) = one fsync
(synchronous=FULL); only after it does a caller get its result, so a front end never acknowledges a report that
is not durable. A failed commit (disk full: StorageError) fails every caller of the batch, nothing is
acknowledged and the devices send again; a row that fails on its own gets its error alone, the others of the
batch are stored (``gateway/reportstore.py``).

Status (MQTT online/offline) is deliberately *not* fsync-durable on its own: ``set_status`` skips the write
when the device's online flag and transport are unchanged (an in-memory copy of what was last written, and the
UPDATE itself is conditional), otherwise queues the change; pending changes are written in one transaction
with synchronous=NORMAL (WAL: no fsync at commit) shortly after, or as part of the next report batch (then they
ride on its fsync), and before any read of the registry. Losing a status flip in a power cut is acceptable (the
device's retained status / last will says it again); losing an acknowledged report is not, so reports always
commit with synchronous=FULL.

A duplicate is counted and not stored or enqueued again; front ends still acknowledge it with code 1 so the device
drops it from its flash queue. History is bounded: the newest ``history`` reports per device are kept for the API
and the keys of the ``dedupe`` before them for de-duplication, pruned every ``prune_every`` new reports of a
device; the outbox is the durable path northbound.

Desired config (``gateway/deviceconfig.py``, mixed in): ``set_desired_config`` bumps a per-device ``cfgver``
and notifies ``on_config_change`` listeners; the device's ``config_ack`` is recorded with ``record_config_ack``.
Device views: ``gateway/deviceview.py``.

Identifiers are stored normalised (``proto.identifier.normalise``). Times are Unix seconds (floats).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gateway.deviceconfig import ConfigListener, DesiredConfigs, validate_interval, validate_meta
from gateway.deviceview import DEVICE_SELECT, device_dict, recent
from gateway.errors import StorageError
from gateway.ingest import (
    BATCH_DELAY,
    BATCH_MAX,
    QUEUE_MAX,
    Done,
    IdentifierCache,
    IngestQueue,
    Outcome,
    Row,
    make_row,
)
from gateway.logfmt import kv
from gateway.outbox import Outbox, connect, transaction
from gateway.reportstore import ReportStore, open_schema
from proto import devicemsg

__all__ = ["Registry", "STATUS_DELAY", "validate_interval", "validate_meta"]

log = logging.getLogger(__name__)

STATUS_DELAY = 0.05  # seconds a status change waits before it is written (without fsync)


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


def _log_status_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and (e := fut.exception()) is not None and not isinstance(e, StorageError):
        log.error("status changes not written %s", kv(error=repr(e)))  # StorageError: logged by _storage


class Registry(DesiredConfigs):
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
        queue_max: int = QUEUE_MAX,
        prune_every: int | None = None,
    ) -> None:
        """``prune_every``: prune a device's history and de-duplication keys after this many new reports of it
        (default ``history``; 1 = after every report, the tables then hold exactly the windows)."""
        self.path = Path(path)
        if outbox is not None and outbox.path.resolve() != self.path.resolve():
            raise ValueError(
                f"the outbox must live in the registry's database ({self.path}), not {outbox.path}: "
                "a report is stored and enqueued in one transaction"
            )
        self.outbox = outbox
        self._history = history
        if history < 1 or dedupe < history:
            raise ValueError("need history >= 1 and dedupe >= history")
        self._store = ReportStore(outbox, history=history, dedupe=dedupe, prune_every=prune_every or history)
        self._clock = clock
        self._lock = threading.RLock()
        self._listeners: list[ConfigListener] = []
        self._ids = IdentifierCache()
        self._queue = IngestQueue(
            self._commit_rows, batch_max=batch_max, batch_delay=batch_delay, queue_max=queue_max
        )
        self.commits = 0  # report and status transactions committed (tests and diagnostics)
        self._conn = connect(self.path)
        open_schema(self._conn)
        # the desired config version of every device that has one, for report acks (read without the lock)
        self._desired: dict[str, int] = dict(
            self._conn.execute("SELECT id, cfgver FROM devices WHERE cfg IS NOT NULL").fetchall()
        )
        self._closed = False
        # status: (online flag, transport) last written or queued per device, and the queued changes
        self._status_known: dict[str, tuple[int, str]] = {}
        self._status_pending: dict[str, tuple[int, str, float]] = {}
        self._status_timer: asyncio.TimerHandle | None = None

    @property
    def batch_max(self) -> int:
        return self._queue.batch_max

    @property
    def batch_delay(self) -> float:
        return self._queue.batch_delay

    def close(self) -> None:
        """Commit what is still queued (reports waiting for a batch, status changes), then close."""
        self._closed = True
        if self._status_timer is not None:
            self._status_timer.cancel()
        self._queue.close()
        with self._lock:
            with contextlib.suppress(sqlite3.Error, StorageError):
                self._flush_status_locked()
            self._conn.close()

    def _committed(self) -> None:
        self.commits += 1

    # -- reports ---------------------------------------------------------------------------------------
    def _row(self, identifier: str, fields: Mapping[str, Any], transport: str, peer: str | None) -> Row:
        ident = self._ids.normalise(identifier)
        if "id" not in fields:  # a caller of the Python API may leave it out: the device is the identifier
            fields = {**fields, "id": ident}
        return self._checked_row(ident, devicemsg.check_report(fields), transport, peer)

    def _checked_row(self, ident: str, report: devicemsg.Report, transport: str, peer: str | None) -> Row:
        if report.id != ident and self._ids.normalise(report.id) != ident:
            raise ValueError(f"report id {report.id!r} does not match device {ident!r}")
        return make_row(ident, report, self._clock(), transport, peer)

    def submit_report(
        self, ident: str, report: devicemsg.Report, transport: str, peer: str | None = None
    ) -> asyncio.Future[bool]:
        """Queue a checked report of device ``ident`` (normalised; ``report.id`` must name it, else ValueError).

        The future settles after the commit of the report's batch: True new, False duplicate (acknowledge both),
        StorageError when the commit failed (answer 5.00, nothing stored), or the error of this row alone.
        Raises Overloaded at once when too many reports wait (answer 5.03 + Max-Age ``retry_after``)."""
        return self._queue.submit(self._checked_row(self._ids.normalise(ident), report, transport, peer))

    def submit_report_then(
        self, ident: str, report: devicemsg.Report, transport: str, peer: str | None, done: Done
    ) -> None:
        """:meth:`submit_report` with a callback instead of a future: ``done(outcome)`` is called on the event loop
        after the commit (True new, False duplicate, or the error) -- what a front end answering thousands of
        reports a second uses (no future and no scheduled callback per report)."""
        self._queue.submit_then(self._checked_row(self._ids.normalise(ident), report, transport, peer), done)

    def record_report(
        self, identifier: str, fields: Mapping[str, Any], transport: str, peer: str | None = None
    ) -> bool:
        """Store a report; True if new, False if a duplicate by (device, boot, seq).

        A new report is stored and enqueued to the outbox in one transaction. Raises ValueError (incl.
        IdentifierError and devicemsg.InvalidReport) for a bad identifier or fields, or when ``fields['id']``
        names another device (front ends check that first and answer 403); StorageError when the disk is full
        (or the write fails): nothing stored, the front end answers 5.00 and the device sends it again.
        """
        outcome = self._commit_rows([self._row(identifier, fields, transport, peer)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def record_report_async(
        self, identifier: str, fields: Mapping[str, Any], transport: str, peer: str | None = None
    ) -> bool:
        """``record_report`` with group commit: returns (True new / False duplicate) only once the batch holding
        this report has committed with fsync; raises what the commit raised (StorageError, ...) if it failed.
        ValueError for a bad report and Overloaded are raised at once, before anything is queued."""
        return await self._queue.submit(self._row(identifier, fields, transport, peer))

    def ingest_stats(self) -> dict[str, int]:
        """The report queue: reports waiting for their commit, the limit, and submits refused since start."""
        q = self._queue
        return {"waiting": q.waiting, "queue_max": q.queue_max, "refused_total": q.refused_total}

    def _commit_rows(self, rows: list[Row]) -> list[Outcome]:
        """Store ``rows`` in order in one transaction (one fsync) with the pending status changes."""
        with (
            self._lock,
            _storage("report" if len(rows) == 1 else f"batch of {len(rows)} reports", self.path),
        ):
            statuses = self._status_pending
            self._status_pending = {}
            try:
                outcomes = self._transaction(rows, statuses)
            except BaseException:
                for ident in statuses:  # not written: let the next status for them write again
                    self._status_known.pop(ident, None)
                raise
            self._committed()
            for row in rows:
                known = self._status_known.get(row.ident)
                if known is not None:
                    self._status_known[row.ident] = (known[0], row.transport)
        if self.outbox is not None and any(o is True for o in outcomes):
            self.outbox.notify()
        if log.isEnabledFor(logging.DEBUG):
            for row, outcome in zip(rows, outcomes, strict=True):
                log.debug(
                    "report %s",
                    kv(device=row.ident, boot=row.boot, seq=row.seq, transport=row.transport, new=outcome),
                )
        return outcomes

    def _transaction(self, rows: list[Row], statuses: dict[str, tuple[int, str, float]]) -> list[Outcome]:
        try:
            with transaction(self._conn) as c:
                self._write_status(c, statuses)
                return self._store.write(c, rows)
        except (sqlite3.OperationalError, OSError):
            raise  # the database or the disk: the whole batch fails
        except Exception as e:  # one row could not be written: again, row by row (each in a savepoint)
            log.warning("report batch failed, writing it row by row %s", kv(rows=len(rows), error=repr(e)))
        with transaction(self._conn) as c:
            self._write_status(c, statuses)
            outcomes = self._store.write_each(c, rows)
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error(
                    "report not stored %s",
                    kv(device=row.ident, boot=row.boot, seq=row.seq, error=repr(outcome)),
                )
        return outcomes

    # -- status ----------------------------------------------------------------------------------------
    def set_status(self, identifier: str, online: bool, transport: str) -> None:
        """Online/offline (MQTT retained status and last will). ``status_changed`` moves only on a change.

        No write at all when online flag and transport are as last written; otherwise the change is queued and
        written soon without fsync (see the module docstring: a status flip may be lost in a power cut)."""
        ident = self._ids.normalise(identifier)
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
        fut = self._queue.run_in_writer(self.flush_status)
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

    # -- views -----------------------------------------------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        """Every device, JSON-ready (as ``device()`` without ``recent_reports``), ordered by id."""
        with self._lock:
            self._flush_status_quietly()
            rows = self._conn.execute(f"{DEVICE_SELECT} ORDER BY d.id").fetchall()
        return [device_dict(r) for r in rows]

    def device(self, identifier: str) -> dict[str, Any] | None:
        """One device, JSON-ready, with ``recent_reports`` (newest first, at most ``history``); None if unknown."""
        try:
            ident = self._ids.normalise(identifier)
        except ValueError:
            return None
        with self._lock:
            self._flush_status_quietly()
            row = self._conn.execute(f"{DEVICE_SELECT} WHERE d.id = ?", (ident,)).fetchone()
            if row is None:
                return None
            out = device_dict(row)
            out["recent_reports"] = recent(self._conn, ident, self._history)
        return out

    def recent_reports(self, identifier: str, limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return recent(self._conn, self._ids.normalise(identifier), limit or self._history)

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
