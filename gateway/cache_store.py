"""The cache's entries on disk: their serialized form (CBOR) and the SQLite file that keeps them across restarts.

``gateway/cache.py`` holds the rules (lifetimes, bounds, serve-stale) and calls this module to size, encode and
decode records, and to load and write rows; ``gateway/shared_cache.py`` shares the same CBOR form through Redis.
Records are stored as CBOR ``[code, handle, [[index, type, data, ttl, ttlType, timestamp, permissions,
[[ref handle, ref index], ...]], ...]]``; keys as CBOR ``[handle, [types], [indexes]]``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path

import cbor2

from gateway.resolution import etag_of
from proto import devicemsg
from proto.records import TTL_ABSOLUTE, HandleValue, Record

__all__ = [
    "CacheKey",
    "Row",
    "Store",
    "decode_record",
    "encode_record",
    "key_blob",
    "key_from_blob",
    "measure",
    "key_size",
    "record_size",
]

log = logging.getLogger(__name__)

CacheKey = tuple[str, tuple[str, ...], tuple[int, ...]]
SCHEMA_VERSION = 1
ANSWER_CODES = (devicemsg.OK, devicemsg.NOT_FOUND, devicemsg.VALUES_NOT_FOUND)  # the codes a cache keeps
Row = tuple[bytes, int, float, float, bytes]  # key blob, code, stored_at, expires_at, record blob


# -- serialization ---------------------------------------------------------------------------------------
def key_blob(key: CacheKey) -> bytes:
    return cbor2.dumps([key[0], list(key[1]), list(key[2])], canonical=True)


def key_from_blob(blob: bytes) -> CacheKey:
    h, types, indexes = cbor2.loads(blob)
    if not isinstance(h, str) or not all(isinstance(t, str) for t in types):
        raise ValueError("bad key")
    return h, tuple(types), tuple(int(i) for i in indexes)


def encode_record(code: int, handle: str, record: Record | None) -> bytes:
    values = (
        []
        if record is None
        else [
            [
                v.index,
                v.type,
                v.data,
                v.ttl,
                v.ttl_type,
                v.timestamp,
                v.permissions,
                [list(r) for r in v.references],
            ]
            for v in record.values
        ]
    )
    return cbor2.dumps([code, handle, values], canonical=True)


def _head_len(n: int) -> int:
    """Bytes of a CBOR head (major type + argument) for argument ``n`` (0 <= n < 2**64)."""
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5 if n < 0x100000000 else 9


def _int_len(n: int) -> int:
    if type(n) is not int or not -(1 << 64) <= n < (1 << 64):
        raise _Unsized
    return _head_len(n if n >= 0 else -1 - n)


def _str_len(s: str) -> int:
    if type(s) is not str:
        raise _Unsized
    n = len(s) if s.isascii() else len(s.encode("utf-8"))
    return _head_len(n) + n


def _value_len(v: HandleValue, type_len: int) -> int:
    """Bytes of one value's CBOR array in :func:`encode_record`'s form; ``type_len`` is its type's (head and text)."""
    data, refs = v.data, v.references
    if type(data) is not bytes:
        raise _Unsized
    size = (
        1
        + _int_len(v.index)
        + type_len
        + _head_len(len(data))
        + len(data)
        + _int_len(v.ttl)
        + _int_len(v.ttl_type)
        + _int_len(v.timestamp)
        + _int_len(v.permissions)
        + _head_len(len(refs))
    )
    for r in refs:
        if len(r) != 2:
            raise _Unsized
        size += 1 + _str_len(r[0]) + _int_len(r[1])
    return size


class _Unsized(Exception):
    """A value the size shortcut does not handle: encode it to measure it."""


def record_size(code: int, handle: str, record: Record | None) -> int:
    """``len(encode_record(code, handle, record))`` without encoding (the record is encoded when it is
    written to SQLite, see :meth:`Cache.flush`); falls back to encoding for unusual values."""
    try:
        values = () if record is None else record.values
        size = 1 + _int_len(code) + _str_len(handle) + _head_len(len(values))
        for v in values:
            size += _value_len(v, _str_len(v.type))
        return size
    except (_Unsized, UnicodeEncodeError):
        return len(encode_record(code, handle, record))


def measure(code: int, handle: str, record: Record, now: float) -> tuple[float | None, int, bytes]:
    """``(record.min_ttl(now), len(encode_record(code, handle, record)), etag_of(record, code))`` in one pass over
    the values -- what :meth:`Cache.put` needs of a positive answer (three passes cost ~30 us more on a cold
    miss); anything unusual takes the three functions."""
    try:
        hb = handle.encode()
        values = record.values
        parts = [code.to_bytes(2, "big"), hb]
        size = 1 + _int_len(code) + _head_len(len(hb)) + len(hb) + _head_len(len(values))
        ttl: float | None = None
        for v in values:
            tb = v.type.encode()
            size += _value_len(v, _head_len(len(tb)) + len(tb))
            parts.append(v.index.to_bytes(4, "big") + tb + b"\0" + v.data + b"\0")
            life = (
                max(0.0, v.ttl - now) if v.ttl_type == TTL_ABSOLUTE else float(v.ttl)
            )  # HandleValue.lifetime
            if ttl is None or life < ttl:
                ttl = life
        return (
            ttl,
            size,
            hashlib.blake2b(b"".join(parts), digest_size=8).digest(),
        )  # etag_of's bytes, hashed at once
    except (_Unsized, UnicodeEncodeError, OverflowError, AttributeError, TypeError):
        return record.min_ttl(now), record_size(code, handle, record), etag_of(record, code)


def key_size(key: CacheKey) -> int:
    """``len(key_blob(key))`` without encoding."""
    try:
        types, indexes = key[1], key[2]
        return (
            1
            + _str_len(key[0])
            + _head_len(len(types))
            + sum(_str_len(t) for t in types)
            + _head_len(len(indexes))
            + sum(_int_len(i) for i in indexes)
        )
    except (_Unsized, UnicodeEncodeError):
        return len(key_blob(key))


def decode_record(blob: bytes) -> tuple[int, Record | None]:
    code, handle, values = cbor2.loads(blob)
    if code not in ANSWER_CODES or not isinstance(handle, str) or not isinstance(values, list):
        raise ValueError("bad record blob")
    if code != devicemsg.OK:
        return code, None
    vals = tuple(
        HandleValue(
            index=int(i),
            type=str(t),
            data=bytes(d),
            ttl=int(ttl),
            ttl_type=int(tt),
            timestamp=int(ts),
            permissions=int(p),
            references=tuple((str(rh), int(ri)) for rh, ri in refs),
        )
        for i, t, d, ttl, tt, ts, p, refs in values
    )
    return code, Record(handle, vals)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = self._open()
        except sqlite3.DatabaseError as e:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.warning("cache.corrupt path=%s moved_to=%s error=%r", path, aside, str(e))
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(path) + suffix)
                if p.exists():
                    os.replace(p, Path(str(aside) + suffix))
            self.conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                conn.execute("DROP TABLE IF EXISTS entries")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS entries (key BLOB PRIMARY KEY, code INTEGER NOT NULL, "
                "stored_at REAL NOT NULL, expires_at REAL NOT NULL, record BLOB NOT NULL) WITHOUT ROWID"
            )
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def load(self, keep_after: float) -> list[Row]:
        self.conn.execute("DELETE FROM entries WHERE expires_at < ?", (keep_after,))
        return self.conn.execute(
            "SELECT key, code, stored_at, expires_at, record FROM entries ORDER BY stored_at"
        ).fetchall()

    def write(self, upserts: list[Row], deletes: list[bytes]) -> None:
        with self.conn:  # one transaction
            self.conn.execute("BEGIN")
            if deletes:
                self.conn.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in deletes])
            if upserts:
                self.conn.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", upserts)

    def close(self) -> None:
        self.conn.close()
