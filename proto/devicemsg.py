"""Device <-> gateway messages: CBOR maps with small integer keys (docs/protocol.md).

The firmware has its own codec (``firmware/carrier/cbor.py`` + ``devicemsg.py``); both are pinned by
``tests/vectors/messages.json``. Encoding is deterministic (cbor2 ``canonical=True``: shortest integers and
floats, map keys in length-first order), so both runtimes produce the same bytes for the same message.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
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
    """``encode("resolve_response", fields)`` for an answer the gateway built itself: the same bytes, with a
    quicker check of the shapes the gateway produces; anything else gets the full check of :func:`encode`."""
    values = fields.get("values")
    if (
        len(fields) == 4
        and type(fields.get("code")) is int
        and 0 <= fields["code"] <= _U64
        and type(fields.get("id")) is str
        and type(fields.get("source")) is int
        and 0 <= fields["source"] <= 3
        and type(values) is list
        and all(_quick_value(v) for v in values)
    ):
        return cbor2.dumps({KEYS[k]: v for k, v in fields.items()}, canonical=True)
    return encode("resolve_response", fields)


_U64 = 0xFFFFFFFFFFFFFFFF


def _quick_value(v: Any) -> bool:
    return (
        type(v) is list
        and len(v) == 4
        and type(v[0]) is int
        and 0 <= v[0] <= _U64
        and type(v[1]) is str
        and type(v[2]) in (str, bytes)
        and type(v[3]) is int
        and 0 <= v[3] <= _U64
    )


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
