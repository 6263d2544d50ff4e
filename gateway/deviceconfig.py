"""Desired device config, the registry's part that operators drive: a per-device ``cfgver`` (monotonic, never
reused, survives restarts and clears), the ``config`` fields the device is to apply, listeners told of every
change (the MQTT front end publishes it retained; CoAP devices fetch or observe it), and the device's
``config_ack``. :class:`DesiredConfigs` is mixed into ``gateway.registry.Registry``, whose SQLite connection and
lock it uses (the ``devices`` table's cfg and ack columns)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping
from typing import Any

from gateway.ingest import IdentifierCache
from gateway.logfmt import kv
from gateway.outbox import transaction
from proto import devicemsg

log = logging.getLogger("gateway.registry")

INTERVAL_MIN = 10
INTERVAL_MAX = 86400
MAX_CONFIG_BYTES = 2048  # encoded `config` message; devices hold it in RAM
MAX_SQL_INT = 2**63 - 1

ConfigListener = Callable[[str, dict[str, Any]], None]


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


class DesiredConfigs:
    """The desired-config methods of the registry (see the module docstring)."""

    _conn: sqlite3.Connection
    _lock: threading.RLock
    _ids: IdentifierCache
    _clock: Callable[[], float]
    _desired: dict[
        str, int
    ]  # the desired config version of every device that has one (read without the lock)
    _listeners: list[ConfigListener]

    @staticmethod
    def _ensure_device(c: sqlite3.Connection, ident: str, now: float) -> None:
        c.execute(
            "INSERT INTO devices(id, first_seen) VALUES (?, ?) ON CONFLICT(id) DO NOTHING", (ident, now)
        )

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
        ident = self._ids.normalise(identifier)
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
        ident = self._ids.normalise(identifier)
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
        ident = self._ids.normalise(identifier)
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
        ident = self._ids.normalise(identifier)
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
