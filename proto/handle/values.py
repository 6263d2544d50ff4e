"""Handle values on the wire, and the body of a referral (which is a handle and values).

Value layout: index(4) timestamp(4) ttl_type(1) ttl(4) permissions(1) type(len4+bytes) data(len4+bytes)
references(count4, each handle(len4+bytes) index(4)). The timestamp is 4 bytes in the deployed
implementation (the captures in ``tests/vectors/handle-native`` show it).
"""

from __future__ import annotations

from proto.handle.errors import HandleFormatError
from proto.handle.numbers import MAX_LIST, MAX_VALUES
from proto.handle.wire import MIN_REFERENCE, MIN_VALUE, U32_MASK, VALUE_FIXED, Reader, blob, pack, u32
from proto.records import HandleValue

__all__ = ["decode_referral", "decode_value", "encode_value", "read_values"]


def encode_value(v: HandleValue) -> bytes:
    """One handle value in the wire layout (TTL and timestamp as unsigned 32-bit, negative TTLs wrap)."""
    out = [
        pack(VALUE_FIXED, v.index, v.timestamp & U32_MASK, v.ttl_type, v.ttl & U32_MASK, v.permissions),
        blob(v.type.encode()),
        blob(v.data),
        u32(len(v.references)),
    ]
    for handle, index in v.references:
        out.append(blob(handle.encode()))
        out.append(u32(index))
    return b"".join(out)


def _read_value(r: Reader, i: int) -> HandleValue:
    index, timestamp, ttl_type, ttl, permissions = r.unpack(VALUE_FIXED, f"value {i}")
    vtype = r.text(f"value {i} type")
    data = r.blob(f"value {i} data")
    nref = r.count(f"value {i} reference count", MAX_LIST, MIN_REFERENCE)
    refs = tuple(
        (r.text(f"value {i} reference {j} handle"), r.u32(f"value {i} reference {j} index"))
        for j in range(nref)
    )
    return HandleValue(
        index=index,
        type=vtype,
        data=data,
        ttl=ttl,
        ttl_type=ttl_type,
        timestamp=timestamp,
        permissions=permissions,
        references=refs,
    )


def decode_value(data: bytes) -> HandleValue:
    """Parse exactly one encoded value."""
    r = Reader(data, "value")
    v = _read_value(r, 0)
    if r.remaining():
        raise HandleFormatError(f"value: {r.remaining()} bytes after the value")
    return v


def read_values(r: Reader) -> tuple[HandleValue, ...]:
    """A value count and that many values, from ``r``."""
    n = r.count("value count", MAX_VALUES, MIN_VALUE)
    return tuple(_read_value(r, i) for i in range(n))


def decode_referral(data: bytes) -> tuple[str, tuple[HandleValue, ...]]:
    """Body of a 302/303 referral: the service handle to ask next and, when present, its values."""
    r = Reader(data, "referral")
    handle = r.text("service handle")
    values = read_values(r) if r.remaining() else ()
    return handle, values
