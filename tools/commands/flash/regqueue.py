"""The station's durable registration queue: the ``registrations`` table of the flashing ledger (SQLite, WAL,
``synchronous=FULL``), one row per identifier.

* :func:`enqueue_in` runs inside the ledger transaction that records a chip ``verified``
  (:meth:`Ledger.record` ``also=``): the device and its queued registration are committed together, so a
  station killed at any instant has neither or both. A first flash queues a ``create``; a chip flashed again
  after its identifier was registered queues a ``modify`` with the new values; one still pending keeps its
  operation and takes the new values.
* :meth:`RegistrationQueue.claim` hands rows that are due to one worker under a lease (owner, expiry). A lease
  whose owner is a dead process of this host (a station killed with SIGKILL) is taken over at once; any other
  expires after ``LEASE_S``. Two workers never send the same row at the same time.
* :meth:`RegistrationQueue.done` / :meth:`~RegistrationQueue.retry` / :meth:`~RegistrationQueue.fail` end
  an attempt: registered; pending again at ``next_try`` with the error; failed with the reason. Each is one
  transaction with a ledger event (``registered``, ``registration-failed``).

A row is ``registered`` only after the node said so. A row whose operation reached the node but whose answer
was lost (the station died in between) is sent again; the registrar takes "already exists with our values" as
done (:mod:`tools.commands.flash.registrar`), so nothing is registered twice and nothing is lost.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from proto.records import HandleValue

from .ledger import FILENAME, Device, Ledger, LedgerFile, _now, fold

__all__ = ["Job", "LEASE_S", "RegistrationQueue", "enqueue_in", "owner_id"]

LEASE_S = 300.0  # a claim of CLAIM jobs, each bounded by its client's timeout, ends well before
CLAIM = 8


def owner_id() -> str:
    """``host:pid`` of this process: the lease owner."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    """False only for an owner on this host whose process is gone."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _values_json(values: Sequence[HandleValue]) -> str:
    return json.dumps([v.to_rest() | {"timestamp": v.timestamp} for v in values], ensure_ascii=False)


def _values(text: str) -> tuple[HandleValue, ...]:
    out = []
    for obj in json.loads(text):
        stamp = obj.pop("timestamp", 0)
        out.append(replace(HandleValue.from_rest(obj), timestamp=int(stamp)))
    return tuple(out)


def enqueue_in(
    db: sqlite3.Connection, device: Device, values: Sequence[HandleValue], upstream: str, station: str | None
) -> str:
    """Queue the registration of ``device`` with ``values`` in the caller's transaction; returns the operation
    queued (``create`` or ``modify``)."""
    now = _now()
    row = db.execute(
        "SELECT op, state FROM registrations WHERE fold = ?", (fold(device.identifier),)
    ).fetchone()
    if row is None:
        op = "create"
        db.execute(
            "INSERT INTO registrations (identifier, fold, station, upstream, op, ops_json, state, created, updated) "
            "VALUES (?, ?, ?, ?, 'create', ?, 'pending', ?, ?)",
            (device.identifier, fold(device.identifier), station, upstream, _values_json(values), now, now),
        )
    else:
        op = "modify" if row[1] == "registered" else row[0]
        db.execute(
            "UPDATE registrations SET op = ?, ops_json = ?, state = 'pending', attempts = 0, next_try = 0, "
            "upstream = ?, station = ?, detail = NULL, updated = ? WHERE fold = ?",
            (op, _values_json(values), upstream, station, now, fold(device.identifier)),
        )
    return op


@dataclass(frozen=True)
class Job:
    """One claimed registration: send ``op`` (create / modify) of ``values`` for ``identifier``."""

    identifier: str
    op: str
    values: tuple[HandleValue, ...]
    attempts: int
    upstream: str


class RegistrationQueue(LedgerFile):
    """The registrations of one ledger file (its own connection; safe next to a :class:`Ledger` on the same file,
    in this or another process)."""

    def __init__(self, path: str | os.PathLike[str], owner: str | None = None) -> None:
        Ledger(path).close()  # the schema, made or upgraded
        super().__init__(path, check_same_thread=False)
        self.owner = owner or owner_id()

    @classmethod
    def in_dir(cls, data_dir: str | os.PathLike[str], owner: str | None = None) -> RegistrationQueue:
        return cls(Path(data_dir) / FILENAME, owner)

    # -- the worker's side ------------------------------------------------------------------------------
    def claim(self, limit: int = CLAIM, now: float | None = None) -> list[Job]:
        """Rows that are due (pending, ``next_try`` passed, no live lease), leased to this owner."""
        t = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM registrations WHERE state = 'pending' AND next_try <= ? ORDER BY next_try, created",
                (t,),
            ).fetchall()
            jobs: list[Job] = []
            for r in rows:
                if len(jobs) >= limit:
                    break
                held = r["lease_owner"]
                if held and held != self.owner and r["lease_until"] > t and _alive(held):
                    continue
                db.execute(
                    "UPDATE registrations SET lease_owner = ?, lease_until = ? WHERE identifier = ?",
                    (self.owner, t + LEASE_S, r["identifier"]),
                )
                jobs.append(
                    Job(r["identifier"], r["op"], _values(r["ops_json"]), r["attempts"], r["upstream"])
                )
        return jobs

    def done(self, job: Job, detail: str | None = None) -> None:
        """The node registered it (or it was already there with our values)."""
        self._end(job, "registered", "registered", detail, next_try=0.0, registered=True)

    def retry(self, job: Job, error: str, next_try: float) -> None:
        """Not this time (the node was down, busy, lost the session): pending again from ``next_try``."""
        with self._tx() as db:
            db.execute(
                "UPDATE registrations SET attempts = attempts + 1, next_try = ?, detail = ?, lease_owner = NULL, "
                "lease_until = 0, updated = ? WHERE identifier = ? AND state = 'pending'",
                (next_try, error[:500], _now(), job.identifier),
            )

    def fail(self, job: Job, reason: str) -> None:
        """The node refused it for good (wrong key, not authorized, not homed, ...): failed, with the reason."""
        self._end(job, "failed", "registration-failed", reason, next_try=0.0, registered=False)

    def _end(
        self, job: Job, state: str, event: str, detail: str | None, *, next_try: float, registered: bool
    ) -> None:
        now = _now()
        with self._tx() as db:
            db.execute(
                "UPDATE registrations SET state = ?, attempts = attempts + 1, next_try = ?, detail = ?, "
                "lease_owner = NULL, lease_until = 0, updated = ?, registered = CASE WHEN ? THEN ? ELSE registered END "
                "WHERE identifier = ? AND ops_json = ? AND op = ?",
                (
                    state,
                    next_try,
                    (detail or "")[:500] or None,
                    now,
                    registered,
                    now,
                    job.identifier,
                    _values_json(job.values),
                    job.op,
                ),
            )
            changed = db.execute("SELECT changes()").fetchone()[0]
            if changed:
                dev = db.execute(
                    "SELECT mac, board, station FROM devices WHERE fold = ?", (fold(job.identifier),)
                ).fetchone()
                db.execute(
                    "INSERT INTO events (time, identifier, mac, board, result, station, detail) VALUES (?,?,?,?,?,?,?)",
                    (
                        now,
                        job.identifier,
                        dev["mac"] if dev else None,
                        dev["board"] if dev else None,
                        event,
                        dev["station"] if dev else None,
                        f"{job.op} at {job.upstream}" + (f": {detail}" if detail else ""),
                    ),
                )
            else:  # the chip was flashed again while this was in flight: the row has new values, send them too
                # (as a modify once this attempt registered the identifier)
                db.execute(
                    "UPDATE registrations SET lease_owner = NULL, lease_until = 0, "
                    "op = CASE WHEN ? THEN 'modify' ELSE op END WHERE identifier = ?",
                    (registered, job.identifier),
                )

    # -- the operator's side ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM registrations GROUP BY state").fetchall()
        out = {"pending": 0, "registered": 0, "failed": 0}
        out.update({r[0]: r[1] for r in rows})
        return out

    def rows(self, state: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT identifier, station, upstream, op, state, attempts, detail, created, updated, registered FROM registrations"
        args: tuple[Any, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state,)
        return [dict(r) for r in self._db.execute(sql + " ORDER BY created, identifier", args)]

    def next_due(self) -> float | None:
        """When the earliest pending row is due (Unix seconds), None when nothing is pending."""
        row = self._db.execute("SELECT MIN(next_try) FROM registrations WHERE state = 'pending'").fetchone()
        return None if row[0] is None else float(row[0])

    def retry_failed(self, identifiers: Sequence[str] = ()) -> int:
        """Failed rows (all, or those given) pending again now; returns how many."""
        with self._tx() as db:
            if identifiers:
                n = 0
                for h in identifiers:
                    n += db.execute(
                        "UPDATE registrations SET state = 'pending', next_try = 0, updated = ? "
                        "WHERE fold = ? AND state = 'failed'",
                        (_now(), fold(h)),
                    ).rowcount
                return n
            return db.execute(
                "UPDATE registrations SET state = 'pending', next_try = 0, updated = ? WHERE state = 'failed'",
                (_now(),),
            ).rowcount
