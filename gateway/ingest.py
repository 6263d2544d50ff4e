"""Report ingest, loop side: a checked report becomes a row ready to store, and rows are grouped into commits.

Flow (``gateway/registry.py`` wires it)::

    Registry.submit_report(ident, report)          a devicemsg.Report: checked completely before it gets here
      -> make_row                                   the values to bind; the report's CBOR is stored as it came
      -> IngestQueue.submit                         refused at once (Overloaded) past ``queue_max`` waiting
      -> a batch -> commit(rows) in the writer      one transaction, one fsync (gateway/reportstore.py)
      -> each caller's future: True (new) / False (duplicate) / that row's own error, only after the commit

Identifiers are normalised once per device (:class:`IdentifierCache`): a plainly valid identifier by one regular
expression, anything else by ``proto.identifier.normalise`` (same result, same errors), and the result is kept.

Group commit: a batch is handed to the writer thread when ``batch_max`` rows wait or ``batch_delay`` seconds after
the first one, whichever comes first; while one batch commits the next one fills, and it is handed over as soon
as the commit is done. Overload is explicit: ``waiting`` (queued + committing) is known, and past ``queue_max`` a
submit raises :class:`gateway.errors.Overloaded` at once with ``retry_after`` = the seconds the rows already
waiting need at the commit rate measured so far (1 to 60 s). A refused row was never queued: nothing of it is
stored, nothing of it is counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import Overloaded
from proto import identifier
from proto.devicemsg import Report

log = logging.getLogger(__name__)

BATCH_MAX = 1024  # rows per group commit
BATCH_DELAY = 0.005  # seconds a row waits for others before its batch commits
QUEUE_MAX = 10_000  # rows waiting (queued + committing) before a submit is refused
RETRY_MIN, RETRY_MAX = 1, 60  # seconds, the range of Overloaded.retry_after

# Plainly valid: ASCII printable, a prefix of non-empty segments of letters, digits, '-' and '_' (the rules of
# proto/identifier.py for such text; anything else goes to identifier.normalise for its verdict and reason).
_PLAIN = re.compile(r"([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)/([\x20-\x7e]+)")


class IdentifierCache:
    """``identifier.normalise`` with memory. At most ``size`` entries; when full it starts again empty (a miss
    costs one regular expression match, or the full parser for what the expression does not vouch for)."""

    def __init__(self, size: int = 65_536) -> None:
        self._size = size
        self._known: dict[str, str] = {}

    def normalise(self, text: str) -> str:
        """The normalised identifier; IdentifierError (a ValueError) for text that is not an identifier."""
        norm = self._known.get(text)
        if norm is None:
            m = _PLAIN.fullmatch(text) if type(text) is str and len(text) <= identifier.MAX_LENGTH else None
            norm = identifier.normalise(text) if m is None else f"{m[1].upper()}/{m[2]}"
            if len(self._known) >= self._size:
                self._known.clear()
            self._known[text] = norm
        return norm


@dataclass(slots=True)
class Row:
    """One report, ready for its SQL statements: every value is bound as it is (nothing left to serialise)."""

    ident: str  # normalised identifier
    boot: int
    seq: int
    received: float  # gateway clock when accepted
    transport: str
    peer: str | None
    board: str | None
    fw: str | None
    raw: bytes  # the report as CBOR (devicemsg.Report.raw)


def make_row(ident: str, report: Report, received: float, transport: str, peer: str | None) -> Row:
    f = report.fields
    return Row(
        ident, report.boot, report.seq, received, transport, peer, f.get("board"), f.get("fw"), report.raw
    )


Outcome = bool | BaseException  # a row's result: new / duplicate, or the error that row alone met
Commit = Callable[[list[Row]], list[Outcome]]


Done = Callable[[Outcome], None]  # a submitter's callback: called on the event loop with the row's outcome
Waiter = asyncio.Future[bool] | Done


def _settle(fut: Waiter, outcome: Outcome) -> None:
    if not isinstance(fut, asyncio.Future):  # a callback (the front ends' fast paths: no future per report)
        try:
            fut(outcome)
        except Exception:  # one submitter's bug must not keep the others of the batch from their answers
            log.exception("ingest: a report's callback failed")
        return
    if fut.done():  # the caller gave up (cancelled): the report is stored all the same
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


class IngestQueue:
    """Rows waiting for their commit, handed to one writer thread in batches; see the module docstring.

    ``commit(rows)`` runs in the writer thread, stores the rows in one transaction and returns one outcome per
    row; when it raises (the transaction failed: disk full, I/O error), every row of the batch gets that error."""

    def __init__(
        self,
        commit: Commit,
        *,
        batch_max: int = BATCH_MAX,
        batch_delay: float = BATCH_DELAY,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        if batch_max < 1 or batch_delay < 0 or queue_max < 1:
            raise ValueError("need batch_max >= 1, batch_delay >= 0 and queue_max >= 1")
        self._commit = commit
        self.batch_max = batch_max
        self.batch_delay = batch_delay
        self.queue_max = queue_max
        self.refused_total = 0  # submits refused (Overloaded) since start
        self._rows: list[Row] = []
        self._futs: list[Waiter] = []
        self._inflight = 0  # rows of the batch being committed
        self._flushing: asyncio.Future[list[Outcome]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._rate = 0.0  # rows per second of commit time, smoothed (written by the writer thread)
        self._closed = False

    @property
    def waiting(self) -> int:
        """Rows submitted and not yet settled: queued plus the batch being committed."""
        return len(self._rows) + self._inflight

    def retry_after(self) -> int:
        """Seconds the rows waiting now need at the measured commit rate (RETRY_MIN..RETRY_MAX)."""
        rate = self._rate
        if rate <= 0:
            return RETRY_MIN
        return max(RETRY_MIN, min(RETRY_MAX, math.ceil(self.waiting / rate)))

    def submit(self, row: Row) -> asyncio.Future[bool]:
        """Queue ``row``; its future settles after the commit of its batch. Overloaded at once past queue_max."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.submit_then(row, fut)
        return fut

    def submit_then(self, row: Row, done: Waiter) -> None:
        """Queue ``row``; ``done(outcome)`` is called on the event loop after the commit of its batch (or a future
        settled). Overloaded at once past queue_max."""
        if len(self._rows) + self._inflight >= self.queue_max:
            self.refused_total += 1
            wait = self.retry_after()
            raise Overloaded(
                f"registry overloaded: {self.waiting} reports wait for their commit; try again in {wait} s",
                wait,
            )
        self._rows.append(row)
        self._futs.append(done)
        if self._flushing is None:  # else the batch in flight starts the next one when it is done
            if len(self._rows) >= self.batch_max or self._closed:
                self._start()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.batch_delay, self._start)

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None or not self._rows:
            return
        n = self.batch_max
        rows, self._rows = self._rows[:n], self._rows[n:]
        futs, self._futs = self._futs[:n], self._futs[n:]
        self._inflight = len(rows)
        loop = asyncio.get_running_loop()
        if self._closed:  # close() ran: no writer thread any more
            flushing: asyncio.Future[list[Outcome]] = loop.create_future()
            try:
                flushing.set_result(self._commit(rows))
            except Exception as e:
                flushing.set_exception(e)
        else:
            flushing = loop.run_in_executor(self._pool(), self._timed_commit, rows)
        self._flushing = flushing
        flushing.add_done_callback(lambda done: self._flushed(done, futs))

    def _timed_commit(self, rows: list[Row]) -> list[Outcome]:
        t0 = time.perf_counter()
        out = self._commit(rows)
        rate = len(rows) / max(time.perf_counter() - t0, 1e-6)
        self._rate = rate if self._rate <= 0 else 0.7 * self._rate + 0.3 * rate
        return out

    def _flushed(self, done: asyncio.Future[list[Outcome]], futs: list[Waiter]) -> None:
        self._flushing = None
        self._inflight = 0
        error = done.exception()
        if error is not None:
            for fut in futs:
                _settle(fut, error)
        else:
            for fut, outcome in zip(futs, done.result(), strict=True):
                _settle(fut, outcome)
        if self._rows:  # they waited for a whole commit already: no extra delay
            self._start()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry-writer")
        return self._writer

    def run_in_writer(self, fn: Callable[[], None]) -> asyncio.Future[None]:
        """Run ``fn`` in the writer thread (after the batch in flight), e.g. a status write."""
        return asyncio.get_running_loop().run_in_executor(self._pool(), fn)

    def close(self) -> None:
        """Wait for the batch in flight, then commit what is still queued here, in the calling thread."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        rows, self._rows = self._rows, []
        futs, self._futs = self._futs, []
        if not rows:
            return
        try:
            outcomes = self._commit(rows)
        except Exception as e:
            for fut in futs:
                _settle(fut, e)
        else:
            for fut, outcome in zip(futs, outcomes, strict=True):
                _settle(fut, outcome)
