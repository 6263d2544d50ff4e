"""The client's one-call reading of an answer: :func:`decode_answer` = ``decode_response(decode_message(data))``.

The usual answer -- one whole success message without request digest, values without references -- is read
here in one pass without intermediate objects (a cold miss spends a good part of its time here); anything
else, and anything that does not parse, goes through the general decoders, which also word the error. The
tests hold the two readings equal on captures, their truncations, bit flips and garbage.
"""

from __future__ import annotations

from proto.handle.envelope import decode_message
from proto.handle.numbers import (
    CREDENTIAL_LENGTH_SIZE,
    ENV_CP,
    ENV_EC,
    ENVELOPE_SIZE,
    HEADER_SIZE,
    MAX_FIELD_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_VALUES,
    OC_RESOLUTION,
    OPF_RD,
    PROTOCOL_MAJOR,
    RC_SUCCESS,
)
from proto.handle.response import ResolutionResponse, Response, decode_response
from proto.handle.wire import ENVELOPE, HEADER, MIN_VALUE, U32, VALUE_HEAD
from proto.records import HandleValue

__all__ = ["decode_answer"]

# Plain ints of the flags tested here (an IntFlag's ``&`` runs Python code in enum).
_CP_EC = int(ENV_CP | ENV_EC)
_RD = int(OPF_RD)
_OC_RESOLUTION = int(OC_RESOLUTION)
_RC_SUCCESS = int(RC_SUCCESS)


def decode_answer(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Response:
    """``decode_response(decode_message(data, max_size=max_size))``: the same result, the same errors."""
    fast = _success_answer(data if type(data) is bytes else bytes(data), max_size)
    if fast is not None:
        return fast
    return decode_response(decode_message(data, max_size=max_size))


def _text(data: bytes, pos: int, size: int, end: int) -> str | None:
    """The ``size`` bytes at ``pos`` as UTF-8, None when they (and the 4-byte length after them) overrun
    ``end``, exceed the field cap or are not UTF-8."""
    if size > MAX_FIELD_SIZE or end - pos < size + 4:
        return None
    try:
        return data[pos : pos + size].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _success_answer(data: bytes, max_size: int) -> ResolutionResponse | None:
    """:func:`decode_answer`'s one-pass reading, None whenever the general decoders must judge."""
    n = len(data)
    if n < ENVELOPE_SIZE + HEADER_SIZE:
        return None
    major, _minor, flags, _session, _rid, _seq, length = ENVELOPE.unpack_from(data, 0)
    if major != PROTOCOL_MAJOR or flags & _CP_EC or length != n - ENVELOPE_SIZE or length > max_size:
        return None
    opcode, code, op_flags, _serial, _rec, _res, _exp, body_length = HEADER.unpack_from(data, ENVELOPE_SIZE)
    if code != _RC_SUCCESS or opcode != _OC_RESOLUTION or op_flags & _RD:
        return None
    pos = ENVELOPE_SIZE + HEADER_SIZE
    end = pos + body_length
    after = n - end
    if after < 0 or (
        after and (after < CREDENTIAL_LENGTH_SIZE or U32.unpack_from(data, end)[0] != after - 4)
    ):
        return None
    if end - pos < 8:
        return None
    (size,) = U32.unpack_from(data, pos)
    handle = _text(data, pos + 4, size, end)
    if handle is None:
        return None
    pos += 4 + size
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_VALUES or count * MIN_VALUE > end - pos:
        return None
    values = []
    for _ in range(count):
        if end - pos < VALUE_HEAD.size:
            return None
        index, timestamp, ttl_type, ttl, permissions, size = VALUE_HEAD.unpack_from(data, pos)
        pos += VALUE_HEAD.size
        vtype = _text(data, pos, size, end)
        if vtype is None:
            return None
        pos += size
        (size,) = U32.unpack_from(data, pos)
        pos += 4
        if size > MAX_FIELD_SIZE or end - pos < size + 4:
            return None
        vdata = data[pos : pos + size]
        pos += size
        if U32.unpack_from(data, pos)[0]:  # references: the general decoder
            return None
        pos += 4
        values.append(HandleValue(index, vtype, vdata, ttl, ttl_type, timestamp, permissions, ()))
    return ResolutionResponse(handle, tuple(values))
