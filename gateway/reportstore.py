"""The registry's tables and the SQL of the report path: a batch of rows (``gateway/ingest.py``) written inside
the caller's transaction, the bounded windows, and the reads of stored reports.

Layout (``PRAGMA user_version`` 1): ``reports`` holds a device's newest reports, appended in arrival order and
found by their key (device, boot, seq) through one small unique index -- a device never reuses a boot number and
counts seq up within a boot, so key order is the order it made them in; ``seen`` (one WITHOUT ROWID B-tree) holds
the keys of its older reports, for de-duplication. Of what a report writes, only the index entry and the device
row land at a random place; the report row and its outbox row are appended. A report's fields are stored as the
CBOR it came in (``devicemsg.Report.raw``), rows of older files as JSON text; readers take both.
:func:`open_schema` moves a file of the previous layout (layout 0) over, once.

Per batch, whatever its size: every row in one ``INSERT OR IGNORE ... RETURNING`` statement per power-of-two
chunk (the statement texts stay few and cached) that also skips keys found in ``seen`` -- a key comes back only
when it was new, so duplicates, including a second copy inside the same batch, are found in order and exactly
once; the outbox rows of the new reports in one ``executemany``; each device's row updated once (one upsert per
device with the batch's counts and its last transport/peer). Nothing is serialised here.

Windows, amortised: when ``prune_every`` new reports of a device were stored since its last prune, the keys of its
reports beyond the newest ``history`` move to ``seen`` and those rows leave ``reports``; every ``dedupe //
prune_every`` prunes of a device ``seen`` is trimmed to its newest ``dedupe`` keys (finding that boundary walks
``dedupe`` index entries: done every prune it cost more than the report itself). So ``reports`` holds at most
``history + prune_every - 1`` rows of a device and ``seen`` about ``2 * dedupe`` keys (more after a restart, which
forgets the counts); reads show the newest ``history``. Keys known beyond the window only ever make de-duplication
stricter.

A row that cannot be written fails alone: when the batch statements raise anything but a storage error, the
caller rolls the transaction back and calls :meth:`ReportStore.write_each`, which writes the rows one by one,
each in its own savepoint; the failing row gets its error, the others are stored (still one transaction).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from gateway.ingest import Outcome, Row
from gateway.outbox import Outbox

LAYOUT = 1  # PRAGMA user_version of this layout

DEVICES = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,            -- normalised identifier
    board TEXT, fw TEXT,
    transport TEXT, peer TEXT,      -- last transport / peer address seen
    online INTEGER,                 -- 1 / 0, NULL = never told
    status_changed REAL,
    first_seen REAL NOT NULL,
    last_seen REAL,
    last_report TEXT,               -- layout 0 only (JSON), NULL since: the newest report is in `reports`
    reports INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    cfgver INTEGER NOT NULL DEFAULT 0,   -- highest desired-config version issued (0 = never)
    cfg TEXT,                       -- JSON `config` fields of the desired config, NULL = none
    cfg_set REAL,
    ack_cfgver INTEGER, ack_code INTEGER, ack_msg TEXT, ack_time REAL
);
"""
REPORTS = """
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,         -- arrival order: rows are appended
    device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL,
    received REAL NOT NULL, transport TEXT NOT NULL, peer TEXT,
    fields BLOB NOT NULL            -- the report's CBOR map (rows of layout 0: JSON text without id)
);
CREATE UNIQUE INDEX IF NOT EXISTS reports_key ON reports(device, boot, seq);
"""
SEEN = """
CREATE TABLE IF NOT EXISTS {seen} (
    device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (device, boot, seq)
) WITHOUT ROWID;
"""
SCHEMA = DEVICES + REPORTS + SEEN.format(seen="seen")

UPSERT_DEVICE = (
    "INSERT INTO devices(id, board, fw, transport, peer, first_seen, last_seen, reports, duplicates)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
    " board = COALESCE(excluded.board, board), fw = COALESCE(excluded.fw, fw), transport = excluded.transport,"
    " peer = COALESCE(excluded.peer, peer), last_seen = excluded.last_seen,"
    " reports = reports + excluded.reports, duplicates = duplicates + excluded.duplicates"
)
_CHUNK = 256  # rows of the largest INSERT ... RETURNING (1,792 parameters)


def _insert_sql(n: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * n)
    return (
        "INSERT OR IGNORE INTO reports(device, boot, seq, received, transport, peer, fields)"
        " SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7"
        f" FROM (VALUES {values}) AS v WHERE NOT EXISTS"
        " (SELECT 1 FROM seen s WHERE s.device = v.column1 AND s.boot = v.column2 AND s.seq = v.column3)"
        " RETURNING device, boot, seq"
    )


_INSERT = {1 << k: _insert_sql(1 << k) for k in range(_CHUNK.bit_length())}
_PRUNE = (
    # keys beyond the newest `history` reports move to `seen`, their rows leave `reports`
    "INSERT OR IGNORE INTO seen(device, boot, seq) SELECT device, boot, seq FROM reports"
    " WHERE device = :d AND (boot, seq) <= (SELECT boot, seq FROM reports WHERE device = :d"
    " ORDER BY boot DESC, seq DESC LIMIT 1 OFFSET :history)",
    "DELETE FROM reports WHERE device = :d AND (boot, seq) <= (SELECT boot, seq FROM reports WHERE device = :d"
    " ORDER BY boot DESC, seq DESC LIMIT 1 OFFSET :history)",
)
# `seen` keeps its newest `dedupe` keys: the OFFSET walks that many index entries, so this runs only every
# `dedupe // history` prunes of a device (seen then holds at most about twice `dedupe` keys of it)
_TRIM_SEEN = (
    "DELETE FROM seen WHERE device = :d AND (boot, seq) <= (SELECT boot, seq FROM seen WHERE device = :d"
    " ORDER BY boot DESC, seq DESC LIMIT 1 OFFSET :dedupe)"
)


def open_schema(conn: sqlite3.Connection) -> None:
    """Create the tables, or move a file of layout 0 (rowid tables, JSON fields) to this layout, once."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version >= LAYOUT:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        _script(conn, DEVICES)
        old = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "reports" in old:  # layout 0: the same reports table, indexed by key; seen becomes one B-tree
            conn.execute(  # a key layout 0 stored twice (resent after its seen window) is kept once
                "DELETE FROM reports WHERE id NOT IN (SELECT MIN(id) FROM reports GROUP BY device, boot, seq)"
            )
            conn.execute("DROP INDEX IF EXISTS reports_by_device")
            _script(conn, REPORTS + SEEN.format(seen="seen_v1"))
            if "seen" in old:
                conn.execute("INSERT OR IGNORE INTO seen_v1 SELECT device, boot, seq FROM seen")
                conn.execute("DROP TABLE seen")
            conn.execute("ALTER TABLE seen_v1 RENAME TO seen")
            conn.execute("UPDATE devices SET last_report = NULL")  # read from `reports` from now on
        else:
            _script(conn, REPORTS + SEEN.format(seen="seen"))
        conn.execute(f"PRAGMA user_version = {LAYOUT}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _script(conn: sqlite3.Connection, text: str) -> None:
    """Run ``;``-separated statements inside the open transaction (``executescript`` would commit it)."""
    for stmt in text.split(";"):
        if stmt.strip():
            conn.execute(stmt)


class ReportStore:
    """Writes rows; holds the per-device counts since the last prune. Used under the registry's lock only."""

    def __init__(self, outbox: Outbox | None, *, history: int, dedupe: int, prune_every: int) -> None:
        if history < 1 or dedupe < 1 or prune_every < 1:
            raise ValueError("need history >= 1, dedupe >= 1 and prune_every >= 1")
        self._outbox = outbox if outbox is not None and outbox.active else None
        self.history = history
        self.dedupe = dedupe
        self.prune_every = prune_every
        self._since_prune: dict[str, int] = {}
        self._prunes: dict[str, int] = {}  # prunes of a device since its seen keys were last trimmed
        self._trim_every = max(1, dedupe // max(prune_every, 1))

    # -- the batch path --------------------------------------------------------------------------------
    def write(self, c: sqlite3.Connection, rows: Sequence[Row]) -> list[Outcome]:
        """Write ``rows`` in order inside the open transaction of ``c``; True new / False duplicate per row.

        Raises what a statement raised; the caller rolls back (then :meth:`write_each` finds the row)."""
        new: set[tuple[str, int, int]] = set()
        i, n = 0, len(rows)
        while i < n:
            size = min(_CHUNK, 1 << ((n - i).bit_length() - 1))
            params: list[Any] = []
            for r in rows[i : i + size]:
                params += (r.ident, r.boot, r.seq, r.received, r.transport, r.peer, r.raw)
            new.update(c.execute(_INSERT[size], params).fetchall())
            i += size
        outcomes: list[Outcome] = []
        fresh: list[Row] = []
        for r in rows:
            key = (r.ident, r.boot, r.seq)
            if key in new:
                new.discard(key)  # a second copy in this batch is a duplicate
                outcomes.append(True)
                fresh.append(r)
            else:
                outcomes.append(False)
        self._finish(c, rows, outcomes, fresh)
        return outcomes

    def _finish(
        self, c: sqlite3.Connection, rows: Sequence[Row], outcomes: list[Outcome], fresh: list[Row]
    ) -> None:
        if fresh and self._outbox is not None:
            self._outbox.enqueue_reports_on(
                c, [(r.raw, r.received, r.received, r.ident, r.transport, r.peer) for r in fresh]
            )
        c.executemany(UPSERT_DEVICE, _device_rows(rows, outcomes))
        since = self._since_prune
        due: dict[str, None] = {}
        for r in fresh:
            count = since.get(r.ident, 0) + 1
            if count >= self.prune_every:
                due[r.ident] = None
                count = 0
            since[r.ident] = count
        if due:
            self.prune(c, list(due))

    # -- the row-by-row path -----------------------------------------------------------------------------
    def write_each(self, c: sqlite3.Connection, rows: Sequence[Row]) -> list[Outcome]:
        """Write ``rows`` one by one, each in a savepoint: a row that raises gets its error, the rest are stored.

        A storage error (sqlite3.OperationalError, OSError) is raised: the transaction cannot go on."""
        outcomes: list[Outcome] = []
        for r in rows:
            c.execute("SAVEPOINT report_row")
            try:
                params = (r.ident, r.boot, r.seq, r.received, r.transport, r.peer, r.raw)
                new = bool(c.execute(_INSERT[1], params).fetchall())
                self._finish(c, [r], [new], [r] if new else [])
            except (sqlite3.OperationalError, OSError):
                raise
            except Exception as e:
                c.execute("ROLLBACK TO report_row")
                outcomes.append(e)
            else:
                outcomes.append(new)
            c.execute("RELEASE report_row")
        return outcomes

    # -- pruning ---------------------------------------------------------------------------------------
    def prune(self, c: sqlite3.Connection, idents: Sequence[str]) -> None:
        """Apply the windows to each device named (inside a transaction)."""
        for sql in _PRUNE:
            c.executemany(sql, [{"d": d, "history": self.history} for d in idents])
        prunes, trim = self._prunes, []
        for d in idents:
            n = prunes.get(d, 0) + 1
            if n >= self._trim_every:
                trim.append({"d": d, "dedupe": self.dedupe})
                n = 0
            prunes[d] = n
        if trim:
            c.executemany(_TRIM_SEEN, trim)


def _device_rows(rows: Sequence[Row], outcomes: Sequence[Outcome]) -> list[tuple[Any, ...]]:
    """One devices upsert per device: counts of the batch, the last transport and peer, board and fw."""
    agg: dict[str, list[Any]] = {}
    for r, outcome in zip(rows, outcomes, strict=True):
        a = agg.get(r.ident)
        if a is None:  # id, board, fw, transport, peer, first_seen, last_seen, reports, duplicates
            a = agg[r.ident] = [r.ident, None, None, r.transport, None, r.received, r.received, 0, 0]
        a[3] = r.transport
        a[6] = r.received
        if r.peer is not None:
            a[4] = r.peer
        if outcome:
            a[1], a[2] = r.board, r.fw
            a[7] += 1
        else:
            a[8] += 1
    return [tuple(a) for a in agg.values()]
