"""The flashing ledger: which identifier went onto which chip, from which images, by whom, with what result.

SQLite in WAL mode at ``<data dir>/flash-ledger.sqlite3``, ``synchronous=FULL`` (a committed allocation
survives a power cut). Several stations may share the file: every change runs in ``BEGIN IMMEDIATE`` (one
writer at a time, others wait up to ``BUSY_TIMEOUT_S``), so two stations never receive the same identifier.

Tables
  ``pool``     identifiers that may be issued, in issue order (``seq``); ``free`` = not bound to any chip.
  ``devices``  one row per identifier ever bound: identifier (primary key) <-> MAC (unique), board, state,
               image checksums, firmware version, key fingerprint (never the key) and the fingerprint of the
               key it replaced, security (``oscore``, or ``insecure`` for a ``--insecure`` identity),
               operator, station, times.
  ``registrations`` the upstream registration queue of each verified device (``regqueue.py``): what to send
               (create or modify, the values), its state (pending, registered, failed + why), retries, lease.
  ``events``   append-only history of every allocation, result, release and registration.

Rules
  * an identifier is bound to at most one MAC and a MAC to at most one identifier (SQL constraints), where
    identifiers differing only in ASCII letter case count as one (Handle.Net resolves them alike);
  * ``allocate`` for a MAC that already has an identifier returns that identifier (re-flash keeps it);
  * a failed flash keeps the identifier bound to that MAC, state ``failed``: the chip may hold the identity
    already, so issuing it elsewhere could duplicate it; flashing the same chip again reuses it. Only an
    operator can give it back to the pool (:meth:`Ledger.release`, e.g. for a scrapped chip), never a
    ``verified`` one. So an identifier is never issued twice and never lost.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from proto import identifier as ident
from tools.support.lifecycle import Closable

from .errors import IdentifierConflict, LedgerError, PoolExhausted

FILENAME = "flash-ledger.sqlite3"
BUSY_TIMEOUT_S = 30.0
STATES = ("allocated", "flashed", "verified", "failed")
REGISTRATION_COLUMNS = ("registration", "registration_detail", "registered")

# what a flashing left on a chip and who did it: a column of both the devices and the events table
_FLASH_COLUMNS = (
    "firmware_version",
    "fs_sha256",
    "image_sha256",
    "runtime_sha256",
    "key_fingerprint",
    "previous_key_fingerprint",
    "security",
    "operator",
    "station",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pool (
    identifier TEXT PRIMARY KEY,
    fold       TEXT NOT NULL UNIQUE,
    pool       TEXT NOT NULL,
    seq        INTEGER NOT NULL UNIQUE,
    free       INTEGER NOT NULL DEFAULT 1,
    added      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pool_free ON pool (seq) WHERE free = 1;
CREATE TABLE IF NOT EXISTS devices (
    identifier       TEXT PRIMARY KEY,
    fold             TEXT NOT NULL UNIQUE,
    mac              TEXT NOT NULL UNIQUE,
    board            TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('allocated', 'flashed', 'verified', 'failed')),
{flash_columns},
    created          TEXT NOT NULL,
    updated          TEXT NOT NULL,
    detail           TEXT
);
CREATE TABLE IF NOT EXISTS registrations (
    identifier       TEXT PRIMARY KEY,
    fold             TEXT NOT NULL UNIQUE,
    station          TEXT,
    upstream         TEXT NOT NULL,
    op               TEXT NOT NULL CHECK (op IN ('create', 'modify')),
    ops_json         TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'registered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_try         REAL NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_until      REAL NOT NULL DEFAULT 0,
    detail           TEXT,
    created          TEXT NOT NULL,
    updated          TEXT NOT NULL,
    registered       TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    time             TEXT NOT NULL,
    identifier       TEXT NOT NULL,
    mac              TEXT,
    board            TEXT,
    result           TEXT NOT NULL,
{flash_columns},
    detail           TEXT
);
""".replace("{flash_columns}", ",\n".join(f"    {c:<16} TEXT" for c in _FLASH_COLUMNS))
# columns added after the first release: a ledger made before gets them on open (ALTER TABLE ... ADD COLUMN)
_ADDED_COLUMNS = ("previous_key_fingerprint", "security")

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def normalise_mac(mac: str) -> str:
    m = mac.strip().lower().replace("-", ":")
    if len(m) == 12 and ":" not in m:
        m = ":".join(m[i : i + 2] for i in range(0, 12, 2))
    if not _MAC_RE.match(m):
        raise LedgerError(f"not a MAC address: {mac!r}")
    return m


_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def fold(identifier: str) -> str:
    """The identifier with ASCII letters upper-cased: Handle.Net's default and the global registry treat ASCII
    letters case-insensitively, so ``PUMP-1`` and ``pump-1`` are one identifier for the ledger's uniqueness."""
    return identifier.translate(_ASCII_UPPER)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Device:
    identifier: str
    mac: str
    board: str
    state: str
    firmware_version: str | None
    fs_sha256: str | None
    image_sha256: str | None
    runtime_sha256: str | None
    key_fingerprint: str | None
    previous_key_fingerprint: str | None  # the key this one replaced (a re-flash that rewrote the filesystem)
    security: str | None  # "oscore" or "insecure"
    operator: str | None
    station: str | None
    created: str
    updated: str
    detail: str | None


DEVICE_COLUMNS = tuple(f.name for f in fields(Device))


@dataclass(frozen=True)
class Allocation:
    identifier: str
    mac: str
    reused: bool  # the MAC already had this identifier (re-flash)


@dataclass(frozen=True)
class PoolStatus:
    pool: str
    total: int
    free: int


@dataclass(frozen=True)
class Checksums:
    firmware_version: str | None = None
    fs_sha256: str | None = None
    image_sha256: str | None = None
    runtime_sha256: str | None = None
    key_fingerprint: str | None = None
    previous_key_fingerprint: str | None = None
    security: str | None = None  # "oscore" / "insecure"


def pattern_identifiers(prefix: str, pattern: str, first: int, last: int) -> Iterator[str]:
    """``prefix/pattern.format(n=n)`` for n in first..last, each checked and normalised."""
    if last < first:
        raise LedgerError(f"empty range {first}..{last}")
    if "{n" not in pattern:
        raise LedgerError(f"pattern {pattern!r} has no {{n}} field, every identifier would be the same")
    for n in range(first, last + 1):
        try:
            yield ident.normalise(f"{prefix}/{pattern.format(n=n)}")
        except (ident.IdentifierError, ValueError, KeyError, IndexError) as e:
            raise LedgerError(f"pattern {pattern!r} with n={n}: {e}") from None


def file_identifiers(lines: Iterable[str]) -> Iterator[str]:
    """Identifiers from a text file, one per line; blank lines and ``#`` comments skipped."""
    for no, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            yield ident.normalise(text)
        except ident.IdentifierError as e:
            raise LedgerError(f"line {no}: {e}") from None


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``db``, taken up front (BEGIN IMMEDIATE): no other writer can slip in between
    our read and our write."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class LedgerFile(Closable):
    """A connection to a ledger file (WAL, ``synchronous=FULL``, writers wait up to ``BUSY_TIMEOUT_S``): what
    :class:`Ledger` and the registration queue (``regqueue.py``) each hold, closed by ``with`` or :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], *, check_same_thread: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=check_same_thread
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)


class Ledger(LedgerFile):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            for table in ("devices", "events"):
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                for col in _ADDED_COLUMNS:
                    if col not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} TEXT")

    @classmethod
    def in_dir(cls, data_dir: str | os.PathLike[str]) -> Ledger:
        return cls(Path(data_dir) / FILENAME)

    # -- pool ------------------------------------------------------------------------------------------------
    def add_pool(self, identifiers: Iterable[str], pool: str) -> tuple[int, int]:
        """Add identifiers (already normalised or not) at the end of the issue order; returns (added,
        skipped). One already in a pool, or already bound to a chip, is skipped: it is never issued twice."""
        added = skipped = 0
        now = _now()
        with self._tx() as db:
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM pool").fetchone()
            for text in identifiers:
                h = ident.normalise(text)
                f = fold(h)
                if (
                    db.execute("SELECT 1 FROM pool WHERE fold = ?", (f,)).fetchone()
                    or db.execute("SELECT 1 FROM devices WHERE fold = ?", (f,)).fetchone()
                ):
                    skipped += 1
                    continue
                seq += 1
                db.execute(
                    "INSERT INTO pool (identifier, fold, pool, seq, free, added) VALUES (?, ?, ?, ?, 1, ?)",
                    (h, f, pool, seq, now),
                )
                added += 1
        return added, skipped

    def pools(self) -> list[PoolStatus]:
        rows = self._db.execute(
            "SELECT pool, COUNT(*) AS total, SUM(free) AS free FROM pool GROUP BY pool ORDER BY MIN(seq)"
        ).fetchall()
        return [PoolStatus(r["pool"], r["total"], r["free"] or 0) for r in rows]

    def free_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pool WHERE free = 1").fetchone()[0])

    # -- allocation ------------------------------------------------------------------------------------------
    def allocate(
        self,
        mac: str,
        board: str,
        *,
        identifier: str | None = None,
        operator: str | None = None,
        station: str | None = None,
    ) -> Allocation:
        """Bind an identifier to ``mac`` for flashing: the MAC's own if it has one (re-flash), else
        ``identifier`` if given, else the next free one from the pools (``--next``)."""
        mac = normalise_mac(mac)
        wanted = ident.normalise(identifier) if identifier is not None else None
        now = _now()
        with self._tx() as db:
            row = db.execute("SELECT identifier, board FROM devices WHERE mac = ?", (mac,)).fetchone()
            if row is not None:
                if wanted is not None and fold(wanted) != fold(row["identifier"]):
                    raise IdentifierConflict(
                        f"chip {mac} already carries {row['identifier']}; it cannot also get {wanted}",
                        "flash it without --identifier (or with its own), or release the old one first",
                    )
                db.execute(
                    "UPDATE devices SET state = 'allocated', board = ?, operator = ?, station = ?, "
                    "updated = ?, detail = NULL WHERE mac = ?",
                    (board, operator, station, now, mac),
                )
                self._event(
                    db, row["identifier"], mac, board, "allocated", operator, station, detail="re-flash"
                )
                return Allocation(row["identifier"], mac, True)
            if wanted is not None:
                other = db.execute(
                    "SELECT identifier, mac FROM devices WHERE fold = ?", (fold(wanted),)
                ).fetchone()
                if other is not None:
                    raise IdentifierConflict(
                        f"{other['identifier']} is already bound to chip {other['mac']}; an identifier goes on one "
                        "chip only",
                        "use --next, or release it first if that chip was scrapped",
                    )
                in_pool = db.execute("SELECT identifier FROM pool WHERE fold = ?", (fold(wanted),)).fetchone()
                chosen = in_pool["identifier"] if in_pool else wanted  # the pool's spelling
                db.execute("UPDATE pool SET free = 0 WHERE identifier = ?", (chosen,))
            else:
                free = db.execute(
                    "SELECT identifier FROM pool WHERE free = 1 ORDER BY seq LIMIT 1"
                ).fetchone()
                if free is None:
                    raise PoolExhausted("no free identifier left in the pools")
                chosen = free["identifier"]
                db.execute("UPDATE pool SET free = 0 WHERE identifier = ?", (chosen,))
            db.execute(
                "INSERT INTO devices (identifier, fold, mac, board, state, operator, station, created, updated) "
                "VALUES (?, ?, ?, ?, 'allocated', ?, ?, ?, ?)",
                (chosen, fold(chosen), mac, board, operator, station, now, now),
            )
            self._event(db, chosen, mac, board, "allocated", operator, station)
            return Allocation(chosen, mac, False)

    def record(
        self,
        identifier: str,
        result: str,
        checksums: Checksums | None = None,
        detail: str | None = None,
        also: Callable[[sqlite3.Connection, Device], None] | None = None,
    ) -> Device:
        """Set the device's state to ``result`` (flashed / verified / failed), with the checksums of what was
        written, and append an event. ``also(db, device)`` runs in the same transaction (the registration
        queue: a verified device and its queued registration are committed together or not at all)."""
        if result not in STATES:
            raise LedgerError(f"unknown result {result!r}")
        h = ident.normalise(identifier)
        c = checksums or Checksums()
        with self._tx() as db:
            row = _bound(db, h)
            h = row["identifier"]
            sets = {"state": result, "updated": _now(), "detail": detail}
            sets.update({k: v for k, v in vars(c).items() if v is not None})
            db.execute(
                f"UPDATE devices SET {', '.join(f'{k} = ?' for k in sets)} WHERE identifier = ?",
                (*sets.values(), h),
            )
            merged = dict(row) | sets
            self._event(
                db, h, row["mac"], row["board"], result, row["operator"], row["station"], merged, detail
            )
            device = Device(**{k: merged[k] for k in DEVICE_COLUMNS})
            if also is not None:
                also(db, device)
            return device

    def release(self, identifier: str, operator: str | None = None, reason: str = "") -> None:
        """Give an identifier back to its pool (e.g. its chip was scrapped). Refused for a verified device."""
        h = ident.normalise(identifier)
        with self._tx() as db:
            row = _bound(db, h)
            h = row["identifier"]
            if row["state"] == "verified":
                raise LedgerError(
                    f"{h} was verified on chip {row['mac']}: it is in the field and is never issued again"
                )
            db.execute("DELETE FROM devices WHERE identifier = ?", (h,))
            db.execute("UPDATE pool SET free = 1 WHERE identifier = ?", (h,))
            self._event(db, h, row["mac"], row["board"], "released", operator, None, detail=reason or None)

    # -- queries ---------------------------------------------------------------------------------------------
    def device(self, identifier: str) -> Device | None:
        row = self._db.execute("SELECT * FROM devices WHERE fold = ?", (fold(ident.normalise(identifier)),))
        return _device(row.fetchone())

    def device_by_mac(self, mac: str) -> Device | None:
        return _device(
            self._db.execute("SELECT * FROM devices WHERE mac = ?", (normalise_mac(mac),)).fetchone()
        )

    def devices(self) -> list[Device]:
        rows = self._db.execute("SELECT * FROM devices ORDER BY created, identifier").fetchall()
        return [Device(**{k: r[k] for k in DEVICE_COLUMNS}) for r in rows]

    def devices_with_registration(self) -> list[dict[str, Any]]:
        """Every device with its upstream registration: ``registration`` (pending / registered / failed, or
        empty when none was queued), ``registration_detail`` (why it failed, the last error while pending),
        ``registered`` (when)."""
        rows = self._db.execute(
            "SELECT d.*, r.state AS registration, r.detail AS registration_detail, r.registered AS registered "
            "FROM devices d LEFT JOIN registrations r ON r.fold = d.fold ORDER BY d.created, d.identifier"
        ).fetchall()
        keep = (*DEVICE_COLUMNS, *REGISTRATION_COLUMNS)
        return [{k: r[k] for k in keep} for r in rows]

    def events(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM events ORDER BY id")]

    def export_csv(self, out: TextIO, history: bool = False) -> int:
        """Devices (or with ``history`` every event) as CSV with a header row; returns the row count. Only key
        fingerprints appear, never keys (the ledger has none)."""
        if history:
            rows = self.events()
            cols = list(rows[0]) if rows else ["id", "time", "identifier", "mac", "result"]
        else:
            rows = self.devices_with_registration()
            cols = [*DEVICE_COLUMNS, *REGISTRATION_COLUMNS]
        w = csv.DictWriter(out, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return len(rows)

    def _event(
        self,
        db: sqlite3.Connection,
        identifier: str,
        mac: str | None,
        board: str | None,
        result: str,
        operator: str | None,
        station: str | None,
        checks: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        c = checks or {}
        db.execute(
            "INSERT INTO events (time, identifier, mac, board, result, firmware_version, fs_sha256, image_sha256, "
            "runtime_sha256, key_fingerprint, previous_key_fingerprint, security, operator, station, detail) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                _now(),
                identifier,
                mac,
                board,
                result,
                c.get("firmware_version"),
                c.get("fs_sha256"),
                c.get("image_sha256"),
                c.get("runtime_sha256"),
                c.get("key_fingerprint"),
                c.get("previous_key_fingerprint"),
                c.get("security"),
                operator,
                station,
                detail,
            ),
        )


def _bound(db: sqlite3.Connection, identifier: str) -> sqlite3.Row:
    """The devices row of ``identifier`` (normalised), in any letter case; LedgerError when no chip has it."""
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM devices WHERE fold = ?", (fold(identifier),)
    ).fetchone()
    if row is None:
        raise LedgerError(f"{identifier} is not bound to any chip")
    return row


def _device(row: sqlite3.Row | None) -> Device | None:
    return Device(**{k: row[k] for k in DEVICE_COLUMNS}) if row is not None else None
