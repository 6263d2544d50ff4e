"""Registering every flashed identifier at the enterprise's Handle node, without slowing the line.

A station is configured once (``ida flash register setup``, saved as ``<data dir>/registration.toml``): the
node (``hdl://`` or ``https://``), the admin (``300:0.NA/88.123.99``) and its key file, and the value template.
Each chip recorded ``verified`` queues its registration in the ledger's transaction (:mod:`.regqueue`); a
:class:`Registrar` sends the queue in the background (:class:`Background`, a thread of ``ida flash batch``) or in
the foreground (``ida flash device`` after the chip is done, ``ida flash register run``). Flashing never waits
for the network.

Values of a registered identifier (one layout for the node and the gateway's local zone, ``register.py``)::

    1 MAC   2 BOARD   3 FW_VERSION   4 PRODUCED        (those in ``values``; default all four)
    5 URL   the ``url`` pattern, e.g. "https://id.example.com/{identifier}" ({prefix}, {suffix}, {mac} too)
    100 HS_ADMIN   naming ``admin`` (default: the ``auth`` admin) with every permission

What a job does: ``create``; when the node says the handle exists, its values are read back and the job is
done if ours are there (a create whose answer was lost when the station died), failed otherwise (someone
else's record is never overwritten). ``modify`` (a chip flashed again): the values that differ are modified,
those missing are added (created when the handle is gone). A transient failure (node down, busy, session
lost) is tried again after a backoff (``backoff_min`` doubling up to ``backoff_max``, with jitter); any other
refusal (wrong key, not authorized, not homed, ...) marks it failed with the node's one-line reason
(``ida flash register retry`` queues it again).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gateway.upstream.admin import AdminClient, AdminError
from gateway.upstream.admin_rest import RestAdminClient
from gateway.upstream.urls import make_admin_client, parse_upstream_url
from proto.handle.keys import load_private_key
from proto.handle.numbers import AdminPerm
from proto.records import AdminRef, HandleValue, parse_value_ref

from .errors import FlashError
from .register import VALUE_INDEXES, Registration, production_values
from .regqueue import Job, RegistrationQueue

__all__ = ["Background", "CONFIG_FILENAME", "Registrar", "Tally", "UpstreamConfig", "drain"]

CONFIG_FILENAME = "registration.toml"
URL_INDEX = 5
ADMIN_INDEX = 100
POLL_S = 0.5

Client = AdminClient | RestAdminClient


@dataclass(frozen=True)
class UpstreamConfig:
    """How a station registers upstream (``registration.toml``; paths relative to the data dir)."""

    upstream: str
    auth: str
    key: str | None = None
    passphrase_env: str | None = None
    secret_env: str | None = None
    tls_ca: str | None = None
    url: str | None = None
    admin: str | None = None
    values: tuple[str, ...] = tuple(VALUE_INDEXES)
    timeout: float = 10.0
    backoff_min: float = 2.0
    backoff_max: float = 300.0

    def check(self) -> UpstreamConfig:
        """Raise FlashError naming the first problem; returns self."""
        try:
            spec = parse_upstream_url(self.upstream)
            parse_value_ref(self.auth)
            if self.admin:
                parse_value_ref(self.admin)
        except ValueError as e:
            raise FlashError(f"registration: {e}") from None
        if spec.kind == "native" and not self.key:
            raise FlashError("registration: a hdl:// upstream needs the admin's key file")
        if spec.kind == "rest" and not (self.key or self.secret_env):
            raise FlashError("registration: a REST upstream needs the admin's key (https) or a secret")
        unknown = set(self.values) - set(VALUE_INDEXES)
        if unknown:
            raise FlashError(
                f"registration: unknown values {sorted(unknown)} (known: {', '.join(VALUE_INDEXES)})"
            )
        if self.url:
            try:
                self.url.format(identifier="p/s", prefix="p", suffix="s", mac="00:00:00:00:00:00")
            except (KeyError, IndexError, ValueError) as e:
                raise FlashError(f"registration: url pattern {self.url!r}: {e}") from None
        if not 0 < self.backoff_min <= self.backoff_max or self.timeout <= 0:
            raise FlashError("registration: backoff_min must be positive and at most backoff_max")
        return self

    # -- the file --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, data_dir: str | os.PathLike[str]) -> UpstreamConfig | None:
        """The station's configuration, None when it has none; FlashError for a file that does not parse."""
        import tomllib

        path = Path(data_dir) / CONFIG_FILENAME
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise FlashError(f"{path}: {e}") from None
        known = {f.name for f in fields(cls)}
        extra = set(raw) - known
        if extra or "upstream" not in raw or "auth" not in raw:
            raise FlashError(f"{path}: needs upstream and auth; unknown keys: {sorted(extra) or 'none'}")
        if "values" in raw:
            raw["values"] = tuple(raw["values"])
        try:
            return cls(**raw).check()
        except TypeError as e:
            raise FlashError(f"{path}: {e}") from None

    def save(self, data_dir: str | os.PathLike[str]) -> Path:
        path = Path(data_dir) / CONFIG_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# ida flash register setup: how this station registers identifiers upstream"]
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            lines.append(f"{f.name} = {json.dumps(list(v) if isinstance(v, tuple) else v)}")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    # -- what to register ----------------------------------------------------------------------------------
    def values_for(
        self, identifier: str, mac: str, board: str, firmware: str, produced: _dt.datetime
    ) -> tuple[HandleValue, ...]:
        """The values of one chip's record (module docstring)."""
        made = production_values(Registration(identifier, mac, board, firmware, produced))
        out = [v for v in made if v.type in self.values]
        stamp = int(produced.timestamp())
        if self.url:
            prefix, _, suffix = identifier.partition("/")
            text = self.url.format(identifier=identifier, prefix=prefix, suffix=suffix, mac=mac)
            out.append(HandleValue(URL_INDEX, "URL", text.encode(), timestamp=stamp))
        handle, index = parse_value_ref(self.admin or self.auth)
        admin = AdminRef(handle, index, int(AdminPerm.ALL)).encode()
        out.append(HandleValue(ADMIN_INDEX, "HS_ADMIN", admin, timestamp=stamp))
        return tuple(out)

    def client(self, data_dir: str | os.PathLike[str]) -> Client:
        """The admin client this configuration describes; FlashError for a key or secret it cannot read."""
        base = Path(data_dir)
        key = None
        if self.key:
            passphrase = os.environ.get(self.passphrase_env, "").encode() if self.passphrase_env else None
            path = base / self.key
            try:
                key = load_private_key(path.read_bytes(), passphrase)
            except OSError as e:
                raise FlashError(f"registration: cannot read the key {path}: {e.strerror}") from None
            except ValueError as e:
                raise FlashError(f"registration: key {path}: {e}") from None
        secret = os.environ.get(self.secret_env, "").encode() if self.secret_env else None
        try:
            tls = ssl.create_default_context(cafile=str(base / self.tls_ca)) if self.tls_ca else None
            return make_admin_client(
                self.upstream, self.auth, key=key, secret=secret, tls=tls, timeout=self.timeout
            )
        except (OSError, ssl.SSLError, ValueError) as e:
            raise FlashError(f"registration: {e}") from None


def _ours(values: Sequence[HandleValue], current: Sequence[HandleValue]) -> bool:
    have = {(v.index, v.type, v.data) for v in current}
    return all((v.index, v.type, v.data) in have for v in values)


@dataclass
class Tally:
    """What one run of the registrar did."""

    registered: int = 0
    retried: int = 0
    failed: int = 0
    last_error: str = ""

    def text(self, counts: dict[str, int]) -> str:
        line = (
            f"registration: {counts['registered']} registered, {counts['pending']} pending, "
            f"{counts['failed']} failed"
        )
        return line + (
            f" (last error: {self.last_error})"
            if counts["pending"] + counts["failed"] and self.last_error
            else ""
        )


class Registrar:
    """Sends the queue of one station with one client (one session for every registration)."""

    def __init__(
        self,
        config: UpstreamConfig,
        queue: RegistrationQueue,
        client: Client,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config, self.queue, self.client = config, queue, client
        self.clock, self.rng = clock, rng
        self.tally = Tally()
        self.notes: Counter[str] = Counter()

    def _next_try(self, job: Job) -> float:
        wait = min(self.config.backoff_max, self.config.backoff_min * 2 ** min(job.attempts, 30))
        return self.clock() + wait * (0.5 + self.rng() / 2)

    async def process(self, job: Job) -> str:
        """One job to its end: registered, pending again later, or failed. Returns ``registered``, ``failed``
        or the kind of the transient error (``down``, ``busy``, ...)."""
        try:
            note = await (self._create(job) if job.op == "create" else self._modify(job))
        except AdminError as e:
            self.tally.last_error = str(e)
            if e.transient:
                self.queue.retry(job, str(e), self._next_try(job))
                self.tally.retried += 1
                return e.kind
            self.queue.fail(job, str(e))
            self.tally.failed += 1
            return "failed"
        self.queue.done(job, note)
        self.notes[note or job.op] += 1
        self.tally.registered += 1
        return "registered"

    async def _create(self, job: Job) -> str | None:
        try:
            await self.client.create(job.identifier, job.values)
            return None
        except AdminError as e:
            if e.kind != "exists":
                raise
        current = await self.client.lookup(job.identifier)
        if current is not None and _ours(job.values, current):
            return "already there with our values"
        raise AdminError(
            f"create {job.identifier}: it exists at {self.client.node} with other values; not overwritten",
            self.client.node,
            kind="exists",
            code=101,
        )

    async def _modify(self, job: Job) -> str | None:
        current = await self.client.lookup(job.identifier)
        if current is None:
            return await self._create(job)
        if _ours(job.values, current):
            return "unchanged"
        have = {(v.index, v.type, v.data) for v in current}
        indexes = {v.index for v in current}
        changed = [v for v in job.values if v.index in indexes and (v.index, v.type, v.data) not in have]
        missing = [v for v in job.values if v.index not in indexes]
        if changed:
            await self.client.modify(job.identifier, changed)
        if missing:
            await self.client.add(job.identifier, missing)
        return "modified"

    async def run(
        self,
        *,
        until_empty: bool = True,
        deadline: float | None = None,
        stop: threading.Event | None = None,
        wait_for_retries: bool = True,
    ) -> Tally:
        """Send what is due until the queue has nothing pending (``until_empty``), ``deadline`` (monotonic
        seconds) passes, or ``stop`` is set. Rows whose retry is not yet due are waited for, unless
        ``wait_for_retries`` is off (then the run ends when nothing is due now)."""
        while not (stop is not None and stop.is_set()):
            jobs = self.queue.claim()
            for i, job in enumerate(jobs):
                if await self.process(job) == "down":  # the node is down: the rest of the claim waits too
                    for rest in jobs[i + 1 :]:
                        self.queue.retry(rest, self.tally.last_error, self._next_try(rest))
                        self.tally.retried += 1
                    break
            if jobs:
                continue
            due = self.queue.next_due()
            if due is None and until_empty:
                break
            if due is not None and not wait_for_retries and due > self.clock():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            wait = POLL_S if due is None else min(POLL_S, max(0.0, due - self.clock()))
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(wait)
        return self.tally


async def _drain(
    data_dir: Path, config: UpstreamConfig, timeout: float, stop: threading.Event | None, wait: bool = True
) -> Tally:
    with RegistrationQueue.in_dir(data_dir) as queue:
        client = config.client(data_dir)
        try:
            return await Registrar(config, queue, client).run(
                until_empty=stop is None,
                deadline=time.monotonic() + timeout,
                stop=stop,
                wait_for_retries=wait,
            )
        finally:
            await client.close()


def drain(
    data_dir: str | os.PathLike[str], config: UpstreamConfig, timeout: float, *, wait_for_retries: bool = True
) -> tuple[Tally, dict[str, int]]:
    """Send the station's queue in the foreground for at most ``timeout`` seconds (without waiting for
    retries that are not due yet unless ``wait_for_retries``); (tally, counts after)."""
    tally = asyncio.run(_drain(Path(data_dir), config, timeout, None, wait_for_retries))
    with RegistrationQueue.in_dir(data_dir) as queue:
        return tally, queue.counts()


class Background:
    """The registrar on a thread of its own while chips are flashed (``ida flash batch``)."""

    def __init__(self, data_dir: str | os.PathLike[str], config: UpstreamConfig) -> None:
        self.data_dir, self.config = Path(data_dir), config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tally = Tally()
        self.error: BaseException | None = None

    def start(self) -> Background:
        self._thread = threading.Thread(target=self._main, name="registrar", daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self.tally = asyncio.run(_drain(self.data_dir, self.config, float("inf"), self._stop))
        except Exception as e:  # reported by stop(); flashing goes on
            self.error = e

    def stop(self, drain_s: float = 0.0) -> dict[str, Any]:
        """Give the queue up to ``drain_s`` seconds to empty, stop the thread, return the queue's counts."""
        end = time.monotonic() + drain_s
        with RegistrationQueue.in_dir(self.data_dir) as queue:
            while time.monotonic() < end and queue.counts()["pending"] and self.error is None:
                time.sleep(0.2)
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=self.config.timeout * 3 + 5)
            return queue.counts()
