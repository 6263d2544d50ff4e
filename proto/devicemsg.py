"""Device <-> gateway messages: CBOR maps with small integer keys (docs/protocol.md).

The firmware has its own codec (``firmware/carrier/cbor.py`` + ``devicemsg.py``); both are pinned by
``tests/vectors/messages.json``. Encoding is deterministic (cbor2 ``canonical=True``: shortest integers and
floats, map keys in length-first order), so both runtimes produce the same bytes for the same message.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

# -- the key table (docs/protocol.md) ------------------------------------------------------------------
# fmt: off
KEYS: dict[str, int] = {
    "token": 1, "id": 2, "code": 3, "values": 4, "ttl": 5, "etag": 6, "types": 7, "indexes": 8, "msg": 9,
    "boot": 10, "seq": 11, "uptime": 12, "heap": 13, "rssi": 14, "queue": 15, "board": 16, "fw": 17,
    "sensors": 18, "dropped": 19, "cfgver": 20, "interval": 21, "meta": 22, "source": 23, "online": 24,
    "time": 25,
}
# fmt: on
NAMES: dict[int, str] = {v: k for k, v in KEYS.items()}

# -- codes (key 3) -------------------------------------------------------------------------------------
OK = 1
NOT_FOUND = 100
VALUES_NOT_FOUND = 200
NOT_MODIFIED = 203
BAD_REQUEST = 400
FORBIDDEN = 403
TOO_LARGE = 413
RATE_LIMITED = 429
INTERNAL = 500
UPSTREAM_UNAVAILABLE = 503
UPSTREAM_TIMEOUT = 504

CODES = (
    OK,
    NOT_FOUND,
    VALUES_NOT_FOUND,
    NOT_MODIFIED,
    BAD_REQUEST,
    FORBIDDEN,
    TOO_LARGE,
    RATE_LIMITED,
    INTERNAL,
    UPSTREAM_UNAVAILABLE,
    UPSTREAM_TIMEOUT,
)

# source (key 23)
SOURCE_ZONE = 0
SOURCE_CACHE = 1
SOURCE_UPSTREAM = 2
SOURCE_STALE = 3

MAX_PAYLOAD = 16 * 1024

# -- messages: name -> (required keys, optional keys) ---------------------------------------------------
MESSAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "resolve_request": (("token", "id"), ("types", "indexes", "etag")),
    "resolve_response": (("code", "id", "values"), ("token", "ttl", "etag", "source")),
    "not_modified": (("code",), ("token", "ttl", "etag")),
    "error": (("code",), ("token", "msg", "id", "ttl")),
    "report": (
        ("id", "boot", "seq", "uptime", "heap", "rssi", "queue", "board", "fw"),
        ("sensors", "dropped", "time"),
    ),
    "report_ack": (("boot", "seq", "code"), ("cfgver",)),
    "config": (("cfgver",), ("interval", "meta")),
    "config_ack": (("id", "cfgver", "code"), ("msg",)),
    "status": (("id", "online"), ()),
}


class WireError(ValueError):
    """A payload that is not a valid message; maps to code 400 (BAD_REQUEST)."""


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFFFFFFFFFFFFFF


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _check_value(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 4
        and _is_uint(v[0])
        and isinstance(v[1], str)
        and isinstance(v[2], str | bytes)
        and _is_uint(v[3])
    )


def _check_scalar_map(v: Any, value_types: tuple[type, ...]) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, value_types) for k, x in v.items()
    )


_CHECKS: dict[str, Any] = {
    "token": lambda v: isinstance(v, bytes) and 1 <= len(v) <= 8,
    "id": lambda v: isinstance(v, str),
    "code": _is_uint,
    "values": lambda v: isinstance(v, list) and all(_check_value(x) for x in v),
    "ttl": _is_uint,
    "etag": lambda v: isinstance(v, bytes) and 1 <= len(v) <= 8,
    "types": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "indexes": lambda v: isinstance(v, list) and all(_is_uint(x) for x in v),
    "msg": lambda v: isinstance(v, str),
    "boot": _is_uint,
    "seq": _is_uint,
    "uptime": _is_uint,
    "heap": _is_uint,
    "rssi": _is_int,
    "queue": _is_uint,
    "board": lambda v: isinstance(v, str),
    "fw": lambda v: isinstance(v, str),
    "sensors": lambda v: _check_scalar_map(v, (int, float, str, bool)),
    "dropped": _is_uint,
    "cfgver": _is_uint,
    "interval": lambda v: _is_uint(v) and 10 <= v <= 86400,
    "meta": lambda v: _check_scalar_map(v, (str,)),
    "source": lambda v: _is_uint(v) and v <= 3,
    "online": lambda v: isinstance(v, bool),
    "time": _is_uint,
}


def dumps(obj: Any) -> bytes:
    """Deterministic CBOR (the encoding both runtimes share)."""
    return cbor2.dumps(obj, canonical=True)


def loads(data: bytes) -> Any:
    """CBOR to Python, raising WireError (never anything else) for bytes that are not one CBOR item."""
    if len(data) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except Exception as e:  # cbor2 raises a variety of types (CBORDecodeError, ValueError, ...)
        raise WireError(f"payload is not valid CBOR: {e}") from None
    if fp.tell() != len(data):
        raise WireError(f"payload has {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return obj


def encode(name: str, fields: Mapping[str, Any]) -> bytes:
    """Encode a message given by name and named fields; checks the fields like ``decode`` does."""
    if name not in MESSAGES:
        raise WireError(f"unknown message {name!r}")
    _validate(name, fields)
    return dumps({KEYS[k]: v for k, v in fields.items()})


def encode_resolve_response(fields: Mapping[str, Any]) -> bytes:
    """``encode("resolve_response", fields)``: the same bytes, or the same error. The answer the gateway builds
    (``code``, ``id``, ``values``, ``source``: canonical CBOR keys 2, 3, 4, 23) is written out here, since cbor2's
    encoder and the full check cost several times more on a cold miss; anything else (other fields, a negative
    or huge number, a value of another shape, text without a UTF-8 form) goes through :func:`encode`."""
    if len(fields) == 4:
        try:
            return _resolve_bytes(fields["code"], fields["id"], fields["values"], fields["source"])
        except (KeyError, _Unusual, UnicodeEncodeError):
            pass
    return encode("resolve_response", fields)


def encode_report_ack(boot: int, seq: int, code: int, cfgver: int | None = None) -> bytes:
    """``encode("report_ack", ...)`` (``cfgver`` None: left out): the same bytes, or the same error, written out
    (the gateway sends one per report)."""
    try:
        out = (b"\xa4\x03" if cfgver is not None else b"\xa3\x03") + _uint(code)
        out += b"\x0a" + _uint(boot) + b"\x0b" + _uint(seq)
        return out if cfgver is None else out + b"\x14" + _uint(cfgver)
    except _Unusual:
        fields = {"boot": boot, "seq": seq, "code": code}
        return encode("report_ack", fields if cfgver is None else {**fields, "cfgver": cfgver})


_U64 = 0xFFFFFFFFFFFFFFFF


class _Unusual(Exception):
    """A field :func:`_resolve_bytes` leaves to :func:`encode`."""


def _head(major: int, n: int) -> bytes:
    """A CBOR head: major type (already shifted) and argument ``n`` (0 <= n < 2**64), shortest form."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


def _uint(v: Any) -> bytes:
    if type(v) is not int or not 0 <= v <= _U64:
        raise _Unusual
    return _head(0x00, v)


def _text(v: Any) -> bytes:
    if type(v) is not str:
        raise _Unusual
    b = v.encode()
    return _head(0x60, len(b)) + b


def _resolve_bytes(code: Any, ident: Any, values: Any, source: Any) -> bytes:
    if type(values) is not list or type(source) is not int or not 0 <= source <= 3:
        raise _Unusual
    out = [b"\xa4\x02", _text(ident), b"\x03", _uint(code), b"\x04", _head(0x80, len(values))]
    for v in values:
        if type(v) is not list or len(v) != 4:
            raise _Unusual
        data = v[2]
        encoded = _head(0x40, len(data)) + data if type(data) is bytes else _text(data)
        out += (b"\x84", _uint(v[0]), _text(v[1]), encoded, _uint(v[3]))
    out += (b"\x17", bytes((source,)))
    return b"".join(out)


def decode(name: str, data: bytes) -> dict[str, Any]:
    """Decode a payload expected to be message ``name``; returns named fields (unknown keys dropped)."""
    obj = loads(data)
    if not isinstance(obj, dict):
        raise WireError(f"{name}: payload must be a CBOR map")
    fields = {NAMES[k]: v for k, v in obj.items() if isinstance(k, int) and k in NAMES}
    _validate(name, fields)
    return fields


def _validate(name: str, fields: Mapping[str, Any]) -> None:
    required, optional = MESSAGES[name]
    for k in required:
        if k not in fields:
            raise WireError(f"{name}: missing {k} (key {KEYS[k]})")
    for k, v in fields.items():
        if k not in KEYS:
            raise WireError(f"{name}: unknown field {k!r}")
        if k not in required and k not in optional:
            continue  # a known key this message does not use: ignored, as receivers do
        if not _CHECKS[k](v):
            raise WireError(f"{name}: field {k} (key {KEYS[k]}) has the wrong type or range: {v!r}")


# -- reports the gateway stores (docs/protocol.md "Reports the gateway stores") ---------------------------
REPORT_TEXT_MAX = 255  # characters of board, fw and a sensor's text value
REPORT_ID_MAX = 255  # characters of id (the identifier rules themselves are the gateway's check)
SENSORS_MAX = 32  # entries of the sensors map
SENSOR_NAME_MAX = 32  # characters of a sensor name
_I64 = 2**63


class InvalidReport(WireError):
    """A report that can never be stored: permanent. Answer it with code 400 (CoAP 4.00, an MQTT ``report_ack``
    with code 400) so the device drops it from its queue instead of sending it again."""


@dataclass(frozen=True, slots=True)
class Report:
    """A report that passed :func:`check_report`: every field can be stored as it is.

    ``fields`` holds the report's own keys only (id, boot, seq, ...), in the order they came; ``raw`` is the
    report as one CBOR map of those keys (the payload as received when it had no other keys)."""

    id: str
    boot: int
    seq: int
    fields: dict[str, Any]
    raw: bytes


def _text_ok(v: str) -> bool:
    """Text that UTF-8 can carry (a lone surrogate from a Python caller cannot be stored)."""
    if v.isascii():
        return True
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def _sensors_ok(v: Any) -> bool:
    if not isinstance(v, dict) or len(v) > SENSORS_MAX:
        return False
    for name, x in v.items():
        if type(name) is not str or not 0 < len(name) <= SENSOR_NAME_MAX or not _text_ok(name):
            return False
        t = type(x)
        if t is float:
            if not math.isfinite(x):  # JSON (northbound, the API) has no NaN or Infinity
                return False
        elif t is int:
            if not -_I64 <= x < _I64:
                return False
        elif t is str:
            if len(x) > REPORT_TEXT_MAX or not _text_ok(x):
                return False
        elif t is not bool:
            return False
    return True


# the report's keys -> kind: U uint (64 bit), K uint below 2^63 (boot, seq: SQLite integers), I int64,
# T text up to REPORT_TEXT_MAX, D the identifier text, S the sensors map
_REPORT_KINDS = {
    "id": "D",
    "boot": "K",
    "seq": "K",
    "uptime": "U",
    "heap": "U",
    "rssi": "I",
    "queue": "U",
    "board": "T",
    "fw": "T",
    "sensors": "S",
    "dropped": "U",
    "time": "U",
}
_REPORT_REQUIRED = MESSAGES["report"][0]
assert set(_REPORT_KINDS) == {*MESSAGES["report"][0], *MESSAGES["report"][1]}


def _report_value_ok(kind: str, v: Any) -> bool:
    t = type(v)
    if kind == "U":
        return t is int and 0 <= v <= _U64
    if kind == "K":
        return t is int and 0 <= v < _I64
    if kind == "T":
        return t is str and len(v) <= REPORT_TEXT_MAX and _text_ok(v)
    if kind == "I":
        return t is int and -_I64 <= v < _I64
    if kind == "D":
        return t is str and 0 < len(v) <= REPORT_ID_MAX and _text_ok(v)
    return _sensors_ok(v)


def _checked(fields: Mapping[Any, Any]) -> tuple[dict[str, Any], bool]:
    """The report's own fields, checked; and whether ``fields`` held other keys (dropped)."""
    out: dict[str, Any] = {}
    dropped = False
    kinds = _REPORT_KINDS
    for k, v in fields.items():
        kind = kinds.get(k) if type(k) is str else None
        if kind is None:
            dropped = True
            continue
        if not _report_value_ok(kind, v):
            raise InvalidReport(f"report: field {k} (key {KEYS[k]}) has the wrong type or range: {_short(v)}")
        out[k] = v
    if len(out) < len(kinds):
        for k in _REPORT_REQUIRED:
            if k not in out:
                raise InvalidReport(f"report: missing {k} (key {KEYS[k]})")
    return out, dropped


def check_report(fields: Mapping[Any, Any]) -> Report:
    """Check a report given by named fields completely, as the gateway will store it; InvalidReport if not.

    Every key of the ``report`` message gets its type and range checked (the table in docs/protocol.md plus the
    storage limits above); every other key -- a key of another message such as ``token`` or ``etag``, a name
    this codec does not know -- is dropped whatever its value (the one rule for keys a report does not define)."""
    out, _ = _checked(fields)
    return Report(out["id"], out["boot"], out["seq"], out, cbor2.dumps({KEYS[k]: v for k, v in out.items()}))


def decode_report(data: bytes) -> Report:
    """Decode a ``report`` payload and check it as :func:`check_report` does, in one pass (WireError for bytes
    that are not one CBOR item, InvalidReport for anything else that is not a storable report)."""
    obj = loads(data)
    if not isinstance(obj, dict):
        raise InvalidReport("report: payload must be a CBOR map")
    named = {NAMES[k]: v for k, v in obj.items() if type(k) is int and k in NAMES}
    out, dropped = _checked(named)
    if dropped or len(named) != len(obj):  # keep only the report's own keys
        data = cbor2.dumps({KEYS[k]: v for k, v in out.items()})
    return Report(out["id"], out["boot"], out["seq"], out, data)


def stored_fields(data: bytes) -> dict[str, Any]:
    """The named fields of a report stored as ``Report.raw`` (checked when it was stored: read as it is)."""
    obj = loads(data)
    if not isinstance(obj, dict):
        raise WireError("stored report: not a CBOR map")
    return {NAMES[k]: v for k, v in obj.items() if type(k) is int and k in NAMES}


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# -- MQTT topic tree ----------------------------------------------------------------------------------
TOPIC_ROOT = "ida/v1/d"
_TOPIC_ESCAPES = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "$": "%24"}


def topic_key(identifier: str) -> str:
    """The identifier as one MQTT topic level (percent-encodes % / + # $)."""
    return "".join(_TOPIC_ESCAPES.get(c, c) for c in identifier)


def identifier_from_topic_key(key: str) -> str:
    out = []
    i = 0
    while i < len(key):
        c = key[i]
        if c == "%":
            esc = key[i : i + 3].upper()
            for raw, code in _TOPIC_ESCAPES.items():
                if code == esc:
                    out.append(raw)
                    break
            else:
                raise WireError(f"bad escape {key[i : i + 3]!r} in topic key")
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def topic(identifier: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}/{topic_key(identifier)}/{leaf}"
