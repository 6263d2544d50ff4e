"""Handle records: a list of typed values (RFC 3651), in the Handle REST JSON form and a compact CBOR form.

A value's ``data`` is always bytes here. The REST form shows it as a string when it is UTF-8 text, as an
``admin`` object for ``HS_ADMIN`` values and as base64 otherwise, as the Handle.Net REST API does.
"""

from __future__ import annotations

import base64
import datetime as _dt
import struct
from dataclasses import dataclass, field
from typing import Any

# Permission bits of a value (RFC 3651 section 3.1).
PERM_PUBLIC_WRITE = 0x01
PERM_PUBLIC_READ = 0x02
PERM_ADMIN_WRITE = 0x04
PERM_ADMIN_READ = 0x08
DEFAULT_PERMISSIONS = PERM_ADMIN_READ | PERM_ADMIN_WRITE | PERM_PUBLIC_READ

TTL_RELATIVE = 0
TTL_ABSOLUTE = 1
DEFAULT_TTL = 86400

# Handle.Net REST API response codes.
RC_SUCCESS = 1
RC_ERROR = 2
RC_HANDLE_NOT_FOUND = 100
RC_VALUES_NOT_FOUND = 200


class RecordFormatError(ValueError):
    """A record or value in JSON or CBOR form that does not follow the documented shape."""


def parse_value_ref(text: str) -> tuple[str, int]:
    """``"300:0.NA/88.123.99"`` -> ``("0.NA/88.123.99", 300)``: a value reference as HANDLE.NET writes an
    administrator (index, colon, handle). RecordFormatError names what is wrong."""
    index, sep, handle = text.strip().partition(":")
    if not sep or not index.isdigit() or not handle or "/" not in handle:
        raise RecordFormatError(f"{text!r} is not INDEX:HANDLE (e.g. 300:0.NA/88.123.99)")
    value = int(index)
    if not 0 <= value <= 0xFFFFFFFF:
        raise RecordFormatError(f"{text!r}: index {value} is not an unsigned 32-bit integer")
    return handle, value


@dataclass(frozen=True, slots=True)
class ValueRef:
    """A reference to one value of a handle, as HANDLE.NET names an administrator: ``300:0.NA/88.123.99`` (its
    ``str``; :func:`parse_value_ref` reads it)."""

    handle: str
    index: int

    def __str__(self) -> str:
        return f"{self.index}:{self.handle}"


@dataclass(frozen=True, slots=True)
class AdminRef(ValueRef):
    """Data of an ``HS_ADMIN`` value: who administers the handle (a value reference to the admin's key or group),
    with which rights (12-bit mask)."""

    permissions: int

    def encode(self) -> bytes:
        if not 0 <= self.permissions <= 0xFFFF:
            raise RecordFormatError(f"HS_ADMIN permissions {self.permissions} do not fit in 16 bits")
        if not 0 <= self.index <= 0xFFFFFFFF:
            raise RecordFormatError(f"HS_ADMIN index {self.index} is not an unsigned 32-bit integer")
        h = self.handle.encode()
        return struct.pack(">HI", self.permissions, len(h)) + h + struct.pack(">I", self.index)

    @classmethod
    def decode(cls, data: bytes) -> AdminRef:
        if len(data) < 10:
            raise RecordFormatError("HS_ADMIN data shorter than 10 bytes")
        perms, n = struct.unpack_from(">HI", data, 0)
        if 6 + n + 4 != len(data):
            raise RecordFormatError("HS_ADMIN data length does not match its handle length")
        try:
            handle = data[6 : 6 + n].decode()
        except UnicodeDecodeError as e:
            raise RecordFormatError("HS_ADMIN handle is not UTF-8") from e
        (index,) = struct.unpack_from(">I", data, 6 + n)
        return cls(handle, index, perms)


@dataclass(frozen=True, slots=True)
class HandleValue:
    index: int
    type: str
    data: bytes
    ttl: int = DEFAULT_TTL
    ttl_type: int = TTL_RELATIVE
    timestamp: int = 0
    permissions: int = DEFAULT_PERMISSIONS
    references: tuple[tuple[str, int], ...] = ()

    @property
    def publicly_readable(self) -> bool:
        return bool(self.permissions & PERM_PUBLIC_READ)

    def text(self) -> str | None:
        """The data as text when it is UTF-8 (and not an admin value), else None."""
        if self.type == "HS_ADMIN":
            return None
        try:
            return self.data.decode()
        except UnicodeDecodeError:
            return None

    def lifetime(self, now: float) -> float:
        """Seconds this value may be cached from ``now`` (absolute TTLs count down to their expiry)."""
        if self.ttl_type == TTL_ABSOLUTE:
            return max(0.0, self.ttl - now)
        return float(self.ttl)

    # -- Handle REST JSON ------------------------------------------------------------------------------
    def to_rest(self) -> dict[str, Any]:
        data: dict[str, Any]
        if self.type == "HS_ADMIN":
            try:
                adm = AdminRef.decode(self.data)
                data = {
                    "format": "admin",
                    "value": {
                        "handle": adm.handle,
                        "index": adm.index,
                        "permissions": format(adm.permissions, "012b"),
                    },
                }
            except RecordFormatError:
                data = {"format": "base64", "value": base64.b64encode(self.data).decode()}
        else:
            txt = self.text()
            if txt is not None:
                data = {"format": "string", "value": txt}
            else:
                data = {"format": "base64", "value": base64.b64encode(self.data).decode()}
        out: dict[str, Any] = {"index": self.index, "type": self.type, "data": data}
        if self.ttl_type == TTL_ABSOLUTE:
            out["ttlType"] = 1
        out["ttl"] = self.ttl
        out["timestamp"] = _iso(self.timestamp)
        return out

    @classmethod
    def from_rest(cls, obj: Any) -> HandleValue:
        if not isinstance(obj, dict):
            raise RecordFormatError("value must be a JSON object")
        try:
            index = obj["index"]
            vtype = obj["type"]
            d = obj["data"]
        except KeyError as e:
            raise RecordFormatError(f"value lacks {e.args[0]!r}") from None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= 0xFFFFFFFF:
            raise RecordFormatError("value index must be an unsigned 32-bit integer")
        if not isinstance(vtype, str):
            raise RecordFormatError("value type must be a string")
        if not isinstance(d, dict) or "value" not in d:
            raise RecordFormatError("value data must be an object with format and value")
        fmt = d.get("format", "string")
        raw = d["value"]
        try:
            if fmt == "string":
                data = str(raw).encode()
            elif fmt == "base64":
                data = base64.b64decode(str(raw), validate=True)
            elif fmt == "hex":
                data = bytes.fromhex(str(raw))
            elif fmt == "admin":
                data = AdminRef(
                    str(raw["handle"]), int(raw["index"]), int(str(raw["permissions"]), 2)
                ).encode()
            else:
                data = str(raw).encode() if isinstance(raw, str) else repr(raw).encode()
        except (ValueError, KeyError, TypeError) as e:
            raise RecordFormatError(f"value data in format {fmt!r} is malformed: {e}") from None
        ttl = obj.get("ttl", DEFAULT_TTL)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not -(2**31) <= ttl <= 0xFFFFFFFF:
            raise RecordFormatError("value ttl must be an integer")
        ts = obj.get("timestamp")
        return cls(
            index=index,
            type=vtype,
            data=data,
            ttl=ttl,
            ttl_type=TTL_ABSOLUTE if obj.get("ttlType") == 1 else TTL_RELATIVE,
            timestamp=_parse_iso(ts) if isinstance(ts, str) else 0,
        )

    # -- device CBOR form: [index, type, data, ttl] ----------------------------------------------------
    def to_device(self, now: float) -> list[Any]:
        txt = self.text()
        return [self.index, self.type, txt if txt is not None else self.data, int(self.lifetime(now))]


@dataclass(frozen=True, slots=True)
class Record:
    handle: str
    values: tuple[HandleValue, ...] = field(default_factory=tuple)

    def min_ttl(self, now: float) -> float | None:
        """The smallest value lifetime, None for a record without values."""
        if not self.values:
            return None
        return min(v.lifetime(now) for v in self.values)

    def select(self, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()) -> Record:
        """Values matching the type or index filters (a value matches if it matches either list)."""
        if not types and not indexes:
            return self
        tset = {t.upper() for t in types}
        keep = tuple(v for v in self.values if v.index in indexes or v.type.upper() in tset)
        return Record(self.handle, keep)

    def to_rest(self) -> dict[str, Any]:
        return {
            "responseCode": RC_SUCCESS,
            "handle": self.handle,
            "values": [v.to_rest() for v in self.values],
        }

    @classmethod
    def from_rest(cls, obj: Any) -> Record:
        if not isinstance(obj, dict):
            raise RecordFormatError("record must be a JSON object")
        handle = obj.get("handle")
        values = obj.get("values", [])
        if not isinstance(handle, str):
            raise RecordFormatError("record lacks a string 'handle'")
        if not isinstance(values, list):
            raise RecordFormatError("record 'values' must be a list")
        return cls(handle, tuple(HandleValue.from_rest(v) for v in values))

    def to_device_values(self, now: float) -> list[list[Any]]:
        return [v.to_device(now) for v in self.values]


def rest_error(code: int, handle: str, message: str | None = None) -> dict[str, Any]:
    """The Handle REST JSON body for a failed resolution."""
    out: dict[str, Any] = {"responseCode": code, "handle": handle}
    if message:
        out["message"] = message
    return out


def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(s: str) -> int:
    try:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return int(t.timestamp())
