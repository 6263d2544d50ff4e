"""Durable at-least-once outbox: accepted reports go northbound (MQTT topic and/or HTTP webhook) from SQLite.

The ``outbox`` table lives in the registry's SQLite file, so the registry stores a report and enqueues it in one
transaction (``Outbox.enqueue_on``). ``Outbox.drain()`` delivers due rows to every configured sink (gateway/sinks.py:
an MQTT topic, an HTTP webhook) and deletes a row once every sink has taken it; a failed delivery is retried with
exponential back-off, and rows left when the gateway stops (or is killed) are delivered after the next start.

Delivery guarantee: at least once, per sink. A row is deleted only after its sink acknowledged it (MQTT: the
broker's PUBACK; webhook: a 2xx answer), so a crash between the acknowledgement and the delete, a lost PUBACK or
a webhook that timed out after storing makes the same report arrive again. **Consumers de-duplicate by
``(id, boot, seq)``** (the webhook also sends them as the ``Idempotency-Key`` header ``<id>|<boot>|<seq>``).
Order is not guaranteed either: a row waiting for its back-off may be overtaken by newer rows.

Northbound payload (JSON object, one report per MQTT message / POST)::

    {"id": "88.123.99/PUMP-0001", "boot": 3, "seq": 17, "received": 1732200000.123, "transport": "mqtt",
     "uptime": 120, "heap": 80000, "rssi": -60, "queue": 0, "board": "esp32-devkitc", "fw": "0.1.0",
     "sensors": {...}, "dropped": 0, "time": 0}

``received`` is the gateway's wall clock (Unix seconds) when the report was accepted; ``transport`` is
``mqtt`` or ``coap``; every report field from docs/protocol.md is copied under its name. A report row keeps the
report's CBOR as stored (``devicemsg.Report.raw``) and the JSON is made at delivery (``row_payload``): the
registry's commit serialises nothing. Rows from ``enqueue`` (and older files) hold the JSON text itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.aio import cancel_all
from gateway.logfmt import kv
from gateway.sinks import Sink
from proto import devicemsg

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT NOT NULL,          -- JSON text: the northbound payload; or a BLOB: the report's CBOR (below)
    created REAL NOT NULL,          -- Unix s when enqueued (= received, for a report)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,     -- Unix s; due when <= now
    done TEXT NOT NULL DEFAULT '',  -- names of the sinks that already took it, one per line
    last_error TEXT,
    device TEXT, transport TEXT, peer TEXT  -- a report row (enqueue_reports_on): what report_payload adds
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt, id);
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the outbox table; add the report row columns to a table made before they existed."""
    conn.executescript(SCHEMA)
    have = {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}
    for name in ("device", "transport", "peer"):
        if name not in have:
            conn.execute(f"ALTER TABLE outbox ADD COLUMN {name} TEXT")


def connect(path: Path) -> sqlite3.Connection:
    """Open the gateway's SQLite file: WAL, synchronous=FULL (an acknowledged report survives power loss),
    autocommit mode (transactions are explicit ``BEGIN IMMEDIATE``), 5 s busy timeout for the other connections."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def report_payload(
    identifier: str, fields: Mapping[str, Any], received: float, transport: str, peer: str | None = None
) -> dict[str, Any]:
    """The northbound JSON object for one accepted report (see the module docstring)."""
    out: dict[str, Any] = {
        "id": identifier,
        "boot": fields["boot"],
        "seq": fields["seq"],
        "received": round(received, 3),
        "transport": transport,
    }
    if peer is not None:
        out["peer"] = peer
    for k, v in fields.items():
        if k not in out and k in devicemsg.KEYS:
            out[k] = v
    return out


def row_payload(
    payload: str | bytes, created: float, device: str | None, transport: str | None, peer: str | None
) -> dict[str, Any]:
    """The northbound payload of an outbox row: its JSON text, or ``report_payload`` of the report it keeps
    (ValueError when the row holds neither)."""
    if isinstance(payload, str) and isinstance(out := json.loads(payload), dict):
        return out
    if isinstance(payload, str) or device is None or transport is None:
        raise ValueError("neither a JSON object nor a report with its device and transport")
    return report_payload(device, devicemsg.stored_fields(payload), created, transport, peer)


class Outbox:
    """The ``outbox`` table plus the loop that empties it.

    ``enqueue``/``enqueue_on`` may be called from any thread; ``drain``/``start``/``stop`` run on one asyncio
    loop. With no sinks configured nothing is enqueued (there is nowhere to deliver to).
    """

    def __init__(
        self,
        path: Path,
        sinks: Sequence[Sink] = (),
        *,
        batch: int = 32,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        attempt_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"outbox sinks must have distinct names: {names}")
        self.path = Path(path)
        self.sinks = list(sinks)
        self._batch = batch
        self._base = base_delay
        self._max = max_delay
        self._attempt_timeout = attempt_timeout
        self._clock = clock
        self._rng = random.Random()
        self._lock = threading.RLock()
        self._conn = connect(self.path)
        ensure_schema(self._conn)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.delivered_total = 0  # sink deliveries that succeeded (since this process started)
        self.failed_total = 0  # sink deliveries that failed and were rescheduled
        left = self.depth()
        if left:
            log.info("outbox has undelivered reports %s", kv(rows=left, path=self.path))

    # -- enqueue ---------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.sinks)

    def enqueue_on(
        self, conn: sqlite3.Connection, payload: Mapping[str, Any], now: float | None = None
    ) -> int | None:
        """Insert a row using ``conn`` inside the caller's open transaction (no commit here); the row id.

        ``conn`` must be a connection to this outbox's file (the registry's). Call ``notify()`` after commit.
        """
        if not self.sinks:
            return None
        t = self._clock() if now is None else now
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        cur = conn.execute(
            "INSERT INTO outbox(payload, created, next_attempt) VALUES (?, ?, ?)", (body, t, t)
        )
        return cur.lastrowid

    def enqueue_reports_on(self, conn: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert report rows ``(devicemsg.Report.raw, received, received, identifier, transport, peer)`` in the
        caller's open transaction, one statement (no sinks: nothing). Call ``notify()`` after the commit."""
        if self.sinks:
            sql = "INSERT INTO outbox(payload, created, next_attempt, device, transport, peer) VALUES (?, ?, ?, ?, ?, ?)"
            conn.executemany(sql, rows)

    def enqueue(self, payload: Mapping[str, Any]) -> int | None:
        """Insert and commit a row on the outbox's own connection; wakes the drain loop."""
        with self._lock, transaction(self._conn):
            rowid = self.enqueue_on(self._conn, payload)
        self.notify()
        return rowid

    def notify(self) -> None:
        """Wake the drain loop (new rows); safe from any thread."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    # -- inspection ------------------------------------------------------------------------------------
    def depth(self) -> int:
        with self._lock:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            n, oldest, retrying = self._conn.execute(
                "SELECT COUNT(*), MIN(created), COALESCE(SUM(attempts > 0), 0) FROM outbox"
            ).fetchone()
        return {
            "depth": int(n),
            "retrying": int(retrying),
            "oldest_age": round(self._clock() - oldest, 3) if oldest is not None else None,
            "delivered_total": self.delivered_total,
            "failed_total": self.failed_total,
            "sinks": [s.name for s in self.sinks],
        }

    def rows(self) -> list[dict[str, Any]]:
        """Every row (for tests and debugging)."""
        with self._lock:
            cur = self._conn.execute(
                "SELECT id, payload, created, attempts, next_attempt, done, last_error, device, transport, peer"
                " FROM outbox ORDER BY id"
            )
            return [
                {
                    "id": r[0],
                    "payload": row_payload(r[1], r[2], r[7], r[8], r[9]),
                    "created": r[2],
                    "attempts": r[3],
                    "next_attempt": r[4],
                    "done": [d for d in r[5].split("\n") if d],
                    "last_error": r[6],
                }
                for r in cur.fetchall()
            ]

    # -- delivery --------------------------------------------------------------------------------------
    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: base * 2^(attempts-1), capped, with +0..25 % jitter."""
        d = min(self._max, self._base * (2 ** max(0, attempts - 1)))
        return d * (1.0 + 0.25 * self._rng.random())

    def _bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    async def drain_once(self) -> int:
        """Attempt every due row once (in batches); returns how many rows were attempted."""
        self._bind_loop()
        now = self._clock()
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, payload, attempts, done, created, device, transport, peer FROM outbox"
                " WHERE next_attempt <= ? ORDER BY id LIMIT ?",
                (now, self._batch),
            ).fetchall()
        if not rows or not self.sinks:
            return 0
        results = await asyncio.gather(*(self._attempt(r[1:2] + r[4:], r[3]) for r in rows))
        now = self._clock()
        with self._lock, transaction(self._conn):
            for (rowid, _payload, attempts, *_), (done, error) in zip(rows, results, strict=True):
                if all(s.name in done for s in self.sinks):
                    self._conn.execute("DELETE FROM outbox WHERE id = ?", (rowid,))
                else:
                    n = attempts + 1
                    delay = self.backoff(n)
                    self._conn.execute(
                        "UPDATE outbox SET attempts = ?, next_attempt = ?, done = ?, last_error = ? WHERE id = ?",
                        (n, now + delay, "\n".join(sorted(done)), error, rowid),
                    )
                    log.warning(
                        "outbox delivery failed %s",
                        kv(row=rowid, attempts=n, retry_in=round(delay, 1), error=error),
                    )
        return len(rows)

    async def _attempt(self, stored: tuple[Any, ...], done_text: str) -> tuple[set[str], str | None]:
        done = {d for d in done_text.split("\n") if d}
        try:
            payload = row_payload(*stored)
        except ValueError as e:  # cannot happen for rows we wrote; keep it, and say so
            return done, f"row payload is not JSON or a stored report: {e}"
        pending = [s for s in self.sinks if s.name not in done]
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(s.deliver(payload), self._attempt_timeout) for s in pending),
            return_exceptions=True,
        )
        errors = []
        for sink, outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                self.failed_total += 1
                errors.append(f"{sink.name}: {type(outcome).__name__}: {outcome}")
            else:
                self.delivered_total += 1
                done.add(sink.name)
        return done, "; ".join(errors) or None

    def _next_due(self) -> float | None:
        with self._lock:
            (t,) = self._conn.execute("SELECT MIN(next_attempt) FROM outbox").fetchone()
        return None if t is None else float(t)

    async def drain(self) -> None:
        """Deliver until cancelled or ``stop()``: due rows first, then sleep until the next is due or notified."""
        self._bind_loop()
        while not self._stopping:
            self._wake.clear()  # before looking, so a notify() during the look is not lost
            try:
                attempted = await self.drain_once()
            except Exception:  # a database error must not end delivery for good: log, pause, go on
                log.exception("outbox drain failed %s", kv(path=self.path))
                attempted = 0
                await asyncio.sleep(1.0)
            if attempted:
                continue
            nxt = self._next_due()
            timeout = None if nxt is None else max(0.0, nxt - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def start(self) -> None:
        """Start the sinks and the drain loop as a task."""
        self._bind_loop()
        for s in self.sinks:
            await s.start()
        self._stopping = False
        if self.sinks and self._task is None:
            self._task = asyncio.create_task(self.drain(), name="outbox-drain")
        log.info(
            "outbox started %s", kv(sinks=",".join(s.name for s in self.sinks) or "-", depth=self.depth())
        )

    async def stop(self, timeout: float = 5.0) -> None:
        """Let the batch in flight finish (up to ``timeout``), then stop; undelivered rows stay for next start."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                await cancel_all([self._task])
            self._task = None
        for s in self.sinks:
            try:
                await s.close()
            except Exception:
                log.exception("outbox sink close failed %s", kv(sink=s.name))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
