"""The records a simulated node hosts, and how it looks a handle up (sans-I/O).

File format: UTF-8 JSON, the same shapes ``gateway/zone.py`` reads -- a list of Handle REST records::

    [{"handle": "88.123.99/PUMP-0001",
      "values": [{"index": 1, "type": "URL", "data": {"format": "string", "value": "https://..."},
                  "ttl": 86400, "timestamp": "2026-11-21T22:44:41Z"}]}]

or an object mapping each handle to its list of values. A value is what :meth:`HandleValue.from_rest`
reads (``data`` formats string, base64, hex, admin), plus two fields of HANDLE.NET's own JSON form that the
node needs: ``"permissions": "1110"`` (admin read, admin write, public read, public write; values without
public read are left out of every answer, as a HANDLE.NET server leaves them out of anonymous answers) and
an ISO-8601 string ``ttl`` (an absolute expiry). A value without ``timestamp`` gets the load time.
:meth:`RecordStore.save` writes this format (the node's ``--store`` file).

Lookup follows what the captured HANDLE.NET 7.3.1 server does: handles and value types match
ASCII-case-insensitively; a handle whose prefix the node does not host is RC_SERVER_NOT_RESP (301); an
unknown handle under a hosted prefix is RC_HANDLE_NOT_FOUND (100); a type/index filter that keeps no
public value is RC_VALUES_NOT_FOUND (200). Hosted prefixes are those of every record ever loaded or added
(removing a record does not stop hosting its prefix), the prefix of every prefix handle ``0.NA/<prefix>``
(HANDLE.NET homes a prefix where its prefix handle lives) and any given explicitly.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from proto import identifier
from proto.handle.numbers import (
    RC_HANDLE_NOT_FOUND,
    RC_INVALID_HANDLE,
    RC_SERVER_NOT_RESP,
    RC_SUCCESS,
    RC_VALUES_NOT_FOUND,
)
from proto.records import (
    PERM_ADMIN_READ,
    PERM_ADMIN_WRITE,
    PERM_PUBLIC_READ,
    PERM_PUBLIC_WRITE,
    TTL_ABSOLUTE,
    HandleValue,
    Record,
    RecordFormatError,
)

__all__ = [
    "Lookup",
    "RecordStore",
    "RecordsError",
    "SAMPLE_RECORDS",
    "load_records",
    "parse_records",
    "sample_records",
]

SAMPLE_RECORDS = Path(__file__).with_name("sample_records.json")

_PERM_BITS = (PERM_ADMIN_READ, PERM_ADMIN_WRITE, PERM_PUBLIC_READ, PERM_PUBLIC_WRITE)


class RecordsError(ValueError):
    """A records file or record that does not follow the format; the message names the entry."""


def _key(text: str) -> bytes:
    """Lookup key: UTF-8 with ASCII letters lower-cased (no Unicode case folding, as HANDLE.NET)."""
    return text.encode("utf-8", "surrogatepass").lower()


def _prefix_of(handle: str) -> str:
    return handle.split("/", 1)[0]


def _permissions(raw: Any, where: str) -> int:
    if raw == "*":
        return PERM_ADMIN_READ | PERM_ADMIN_WRITE | PERM_PUBLIC_READ | PERM_PUBLIC_WRITE
    if not isinstance(raw, str) or len(raw) != 4 or set(raw) - {"0", "1"}:
        raise RecordsError(
            f"{where}: permissions must be 4 bits as a string (admin read, admin write, public read, "
            f'public write; e.g. "1110"), got {raw!r}'
        )
    return sum(bit for bit, c in zip(_PERM_BITS, raw, strict=True) if c == "1")


def _value_json(v: HandleValue) -> dict[str, Any]:
    out = v.to_rest()
    if not v.timestamp:  # unknown: left out (read back as the load time)
        del out["timestamp"]
    out["permissions"] = "".join("1" if v.permissions & bit else "0" for bit in _PERM_BITS)
    return out


def _iso_seconds(text: str, where: str) -> int:
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RecordsError(f"{where}: ttl {text!r} is neither seconds nor an ISO-8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return int(t.timestamp())


def _value(obj: Any, where: str, now: int) -> HandleValue:
    if not isinstance(obj, dict):
        raise RecordsError(f"{where}: a value must be a JSON object")
    rest = dict(obj)
    if isinstance(rest.get("data"), str):  # HANDLE.NET's JSON also takes bare text as data
        rest["data"] = {"format": "string", "value": rest["data"]}
    ttl = rest.get("ttl")
    absolute_ttl: int | None = None
    if isinstance(ttl, str):  # HANDLE.NET's JSON writes an absolute expiry as a time string
        absolute_ttl = _iso_seconds(ttl, where)
        del rest["ttl"]
    try:
        v = HandleValue.from_rest(rest)
    except RecordFormatError as e:
        raise RecordsError(f"{where}: {e}") from None
    try:
        v.type.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordsError(f"{where}: type is not valid Unicode text") from None
    if absolute_ttl is not None:
        v = replace(v, ttl=absolute_ttl, ttl_type=TTL_ABSOLUTE)
    if "permissions" in obj:
        v = replace(v, permissions=_permissions(obj["permissions"], where))
    if "timestamp" not in obj:
        v = replace(v, timestamp=now)
    elif not isinstance(obj["timestamp"], str) or v.timestamp == 0:
        raise RecordsError(f'{where}: timestamp must be an ISO-8601 time like "2026-11-21T22:44:41Z"')
    if not 0 <= v.timestamp <= 0xFFFFFFFF:
        raise RecordsError(f"{where}: timestamp does not fit in 32 bits")
    return v


def _handle_name(handle: Any, where: str) -> str:
    if not isinstance(handle, str):
        raise RecordsError(f"{where}: 'handle' must be a string")
    try:
        name = identifier.normalise(handle)
        name.encode("utf-8")
    except identifier.IdentifierError as e:
        raise RecordsError(f"{where} ({handle!r}): bad handle: {e.detail}") from None
    except UnicodeEncodeError:
        raise RecordsError(f"{where} ({handle!r}): bad handle: not valid Unicode text") from None
    return name


def _record(handle: Any, values: Any, where: str, now: int) -> Record:
    name = _handle_name(handle, where)
    where = f"{where} ({name})"
    if not isinstance(values, list):
        raise RecordsError(f"{where}: 'values' must be a list")
    vals = tuple(_value(v, f"{where}: value {i}", now) for i, v in enumerate(values))
    seen: set[int] = set()
    for v in vals:
        if v.index in seen:
            raise RecordsError(f"{where}: index {v.index} is used by two values")
        seen.add(v.index)
    return Record(name, vals)


def parse_records(obj: Any, source: str = "records", *, now: float | None = None) -> list[Record]:
    """Records from decoded JSON (list of records, or object of handle -> values). Each error names the
    entry (``source: entry 3 (88.123.99/VALVE-0002): value 1: value lacks 'type'``)."""
    stamp = int(time.time() if now is None else now)
    out: list[Record] = []
    if isinstance(obj, list):
        for i, rec in enumerate(obj):
            where = f"{source}: entry {i}"
            if not isinstance(rec, dict):
                raise RecordsError(f"{where}: a record must be an object with 'handle' and 'values'")
            out.append(_record(rec.get("handle"), rec.get("values", []), where, stamp))
    elif isinstance(obj, dict):
        for h, values in obj.items():
            out.append(_record(h, values, f"{source}: entry {h!r}", stamp))
    else:
        raise RecordsError(f"{source}: must be a JSON list of records or an object of handle -> values")
    seen: dict[bytes, str] = {}
    for r in out:
        k = _key(r.handle)
        if k in seen:
            raise RecordsError(f"{source}: handle {r.handle} is given twice (also as {seen[k]})")
        seen[k] = r.handle
    return out


def load_records(path: str | os.PathLike[str]) -> list[Record]:
    """The records in a JSON file; RecordsError names the file and the bad entry."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordsError(f"{p}: cannot read records file: {e}") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise RecordsError(f"{p}: not valid JSON: {e}") from None
    return parse_records(obj, str(p))


def sample_records() -> list[Record]:
    """The built-in sample set (``tools/harness/node/sample_records.json``)."""
    return load_records(SAMPLE_RECORDS)


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the node answers: ``code`` is RC_SUCCESS (with the public values that match the filter),
    RC_HANDLE_NOT_FOUND, RC_VALUES_NOT_FOUND, RC_SERVER_NOT_RESP or RC_INVALID_HANDLE.
    ``handle`` is the handle as it was asked for (answers echo it, as HANDLE.NET does)."""

    code: int
    handle: str
    values: tuple[HandleValue, ...] = ()
    message: str = ""

    @property
    def found(self) -> bool:
        return self.code == RC_SUCCESS


def _type_matches(wanted: Sequence[bytes], vtype: str) -> bool:
    return _key(vtype) in wanted


class RecordStore:
    """Records keyed ASCII-case-insensitively; changed at run time with :meth:`add` / :meth:`remove`."""

    def __init__(self, records: Iterable[Record | dict[str, Any]] = (), prefixes: Iterable[str] = ()) -> None:
        self._records: dict[bytes, Record] = {}
        self._prefixes: dict[bytes, str] = {}
        for p in prefixes:
            self.host(p)
        for r in records:
            self.add(r)

    def host(self, prefix: str) -> None:
        """Host ``prefix`` (answer 100 rather than 301 for unknown handles under it)."""
        if not prefix or "/" in prefix:
            raise RecordsError(f"prefix {prefix!r}: must be non-empty and contain no '/'")
        self._prefixes.setdefault(_key(prefix), prefix.upper())

    def add(self, record: Record | dict[str, Any]) -> Record:
        """Add or replace a record (a Record, or its Handle REST JSON form); returns it as stored."""
        if isinstance(record, dict):
            (rec,) = parse_records([record], "record")
        else:
            rec = Record(_handle_name(record.handle, "record"), tuple(record.values))
            indexes = [v.index for v in rec.values]
            if len(set(indexes)) != len(indexes):
                raise RecordsError(f"record ({rec.handle}): two values share an index")
        self._records[_key(rec.handle)] = rec
        self.host(_prefix_of(rec.handle))
        if rec.handle[:5].upper() == "0.NA/" and len(rec.handle) > 5:  # a prefix handle homes its prefix
            self.host(rec.handle[5:])
        return rec

    def remove(self, handle: str) -> bool:
        """Forget a record; its prefix stays hosted (the handle is then "not found", 100)."""
        return self._records.pop(_key(handle), None) is not None

    def get(self, handle: str) -> Record | None:
        """The stored record (every value, public or not), or None."""
        return self._records.get(_key(handle))

    def hosts(self, prefix: str) -> bool:
        return _key(prefix) in self._prefixes

    @property
    def prefixes(self) -> list[str]:
        return sorted(self._prefixes.values())

    def handles(self, prefix: str | None = None) -> list[str]:
        """Stored handles, all or those under ``prefix``, sorted."""
        if prefix is None:
            return sorted(r.handle for r in self._records.values())
        want = _key(prefix)
        return sorted(r.handle for r in self._records.values() if _key(_prefix_of(r.handle)) == want)

    def dump(self) -> list[dict[str, Any]]:
        """Every record in the file format :func:`load_records` reads (values with their permissions)."""
        return [
            {"handle": r.handle, "values": [_value_json(v) for v in r.values]}
            for r in sorted(self._records.values(), key=lambda r: r.handle)
        ]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`dump` to ``path`` atomically (a temporary file, fsync, rename): a node killed while
        saving leaves the previous file."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.dump(), f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, str) and _key(handle) in self._records

    def resolve(self, handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()) -> Lookup:
        """Look ``handle`` up as an anonymous client: only publicly readable values, filtered by type
        (ASCII-case-insensitive) or index (a value is kept if it matches either list)."""
        if not handle:
            return Lookup(RC_INVALID_HANDLE, handle, message="empty handle")
        rec = self._records.get(_key(handle))
        if rec is None:
            if not self.hosts(_prefix_of(handle)):
                return Lookup(RC_SERVER_NOT_RESP, handle, message="server not responsible for handle")
            return Lookup(RC_HANDLE_NOT_FOUND, handle)
        values = tuple(v for v in rec.values if v.publicly_readable)
        if types or indexes:
            wanted = [_key(t) for t in types]
            values = tuple(v for v in values if v.index in indexes or _type_matches(wanted, v.type))
            if not values:
                return Lookup(RC_VALUES_NOT_FOUND, handle)
        return Lookup(RC_SUCCESS, handle, values)
