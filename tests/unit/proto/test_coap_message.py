"""proto/coap/message.py and numbers.py: exact bytes by hand (extended option deltas and lengths, the payload
marker), every malformed shape refused with MessageError, agreement with aiocoap's codec, and a fuzz of decode:
only MessageError may escape, and whatever decodes encodes back to the same bytes."""

from __future__ import annotations

import doctest

import aiocoap
import pytest
from aiocoap.numbers.codes import Code as AiocoapCode
from aiocoap.numbers.optionnumbers import OptionNumber
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.coap import message as coapmessage
from proto.coap import numbers as coapnumbers
from proto.coap.message import (
    Message,
    MessageError,
    encode_body,
    encode_option,
    heads,
    option_spans,
    parse_header,
    request_template,
    uint_of,
    uint_value,
)
from proto.coap.numbers import ACK, CON, CONTENT, GET, NON, RST, Code, Option, Type, dotted

PATH = ((Option.URI_PATH, b"r"), (Option.URI_PATH, b"88.123.99"), (Option.URI_PATH, b"PUMP-0001"))


def test_doctests() -> None:
    assert doctest.testmod(coapmessage).failed == 0
    assert doctest.testmod(coapnumbers).failed == 0


def test_get_by_hand() -> None:
    m = Message(CON, GET, 0xBEEF, b"\xbe\xef", PATH)
    want = (
        bytes((0x42, 0x01, 0xBE, 0xEF, 0xBE, 0xEF, 0xB1)) + b"r" + b"\x09" + b"88.123.99" + b"\x09PUMP-0001"
    )
    assert m.encode() == want
    assert Message.decode(want) == m
    assert parse_header(want) == (CON, GET, 0xBEEF, b"\xbe\xef")


def test_extended_deltas_and_lengths_by_hand() -> None:
    # delta 13..268 takes one extra byte, 269.. two; the same for lengths
    assert encode_option(12, b"x") == b"\xc1x"
    assert encode_option(13, b"x") == b"\xd1\x00x"
    assert encode_option(258, b"") == b"\xd0\xf5"  # No-Response from 0: 258 - 13 = 245
    assert encode_option(269, b"") == b"\xe0\x00\x00"
    assert encode_option(0, b"a" * 13) == b"\x0d\x00" + b"a" * 13
    assert encode_option(0, b"a" * 300) == b"\x0e\x00\x1f" + b"a" * 300  # 300 - 269 = 31
    m = Message(NON, CONTENT, 7, b"", ((Option.ETAG, b"12345678"), (Option.NO_RESPONSE, b"\x1a")), b"hi")
    raw = m.encode()
    assert raw == b"\x50\x45\x00\x07" + b"\x4812345678" + b"\xd1\xf1\x1a" + b"\xffhi"  # 258 - 4 - 13 = 241
    assert Message.decode(raw) == m
    with pytest.raises(ValueError):
        encode_option(65805, b"")


def test_options_in_number_order_repeats_kept() -> None:
    body = encode_body([(Option.URI_QUERY, b"b"), (Option.URI_PATH, b"r"), (Option.URI_QUERY, b"a")], b"p")
    assert body == b"\xb1r\x41b\x01a\xffp"
    spans, start = option_spans(b"\x00\x00\x00\x00" + body, 4)
    assert [(n, h, a, b) for n, h, a, b in spans] == [(11, 4, 5, 6), (15, 6, 7, 8), (15, 8, 9, 10)]
    assert start == 11
    m = Message.decode(b"\x40\x01\x00\x01" + body)
    assert m.option(Option.URI_QUERY) == b"b" and m.values(Option.URI_QUERY) == [b"b", b"a"]
    assert m.option(Option.ETAG) is None and m.payload == b"p"


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "shorter"),
        (b"\x40\x01\x00", "shorter"),
        (b"\x80\x01\x00\x01", "version"),
        (b"\x49\x01\x00\x01" + b"t" * 9, "token length"),
        (b"\x44\x01\x00\x01ab", "token runs"),
        (b"\x40\x01\x00\x01\xf0", "delta 15"),
        (b"\x40\x01\x00\x01\x0f", "length 15"),
        (b"\x40\x01\x00\x01\xd0", "delta runs"),
        (b"\x40\x01\x00\x01\xe0\x01", "delta runs"),
        (b"\x40\x01\x00\x01\x0d", "length runs"),
        (b"\x40\x01\x00\x01\x0e\x00", "length runs"),
        (b"\x40\x01\x00\x01\x03ab", "value runs"),
        (b"\x40\x01\x00\x01\xff", "payload marker"),
        (b"\x60\x00\x00\x01\xff", "Empty message"),
        (b"\x61\x00\x00\x01t", "Empty message"),
    ],
)
def test_malformed_datagrams_raise_message_error(raw: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why):
        Message.decode(raw)


def test_every_prefix_and_trailing_data() -> None:
    """A datagram is one message: a prefix of one is another message or MessageError; bytes after a payload are
    payload."""
    raw = Message(CON, GET, 0x1234, b"tok", PATH + ((Option.URI_QUERY, b"a" * 20),), b"payload").encode()
    for i in range(len(raw) + 1):
        try:
            m = Message.decode(raw[:i])
        except MessageError:
            continue
        assert m.encode() == raw[:i]
    assert Message.decode(raw + b"++").payload == b"payload++"


def test_header_helpers_and_uints() -> None:
    assert heads(ACK, CONTENT)[2] == b"\x62\x45" and heads(NON, 0x43)[0] == b"\x50\x43"
    assert parse_header(b"\x68\x45\x00\x01abc") is None  # token longer than the datagram
    assert parse_header(b"\x60\x00\x12\x34") == (ACK, 0, 0x1234, b"")
    assert [uint_value(n) for n in (0, 1, 255, 256, 3600)] == [
        b"",
        b"\x01",
        b"\xff",
        b"\x01\x00",
        b"\x0e\x10",
    ]
    assert uint_of(b"") == 0 and uint_of(b"\x0e\x10") == 3600


def test_request_template() -> None:
    t = request_template(("d", "x"), code=0x02, token_len=4, options=[(Option.CONTENT_FORMAT, b"\x3c")])
    assert t.token_len == 4 and t.confirmable
    assert t.datagram(0x0102, b"abcd", b"P") == b"\x44\x02\x01\x02abcd\xb1d\x01x\x11\x3c\xffP"
    n = request_template(("r",), confirmable=False, token_len=0, query=("type=URL",))
    assert not n.confirmable and n.datagram(9, b"") == b"\x50\x01\x00\x09\xb1r\x48type=URL"
    with pytest.raises(ValueError):
        request_template(("r",), token_len=9)


def test_numbers_agree_with_aiocoap() -> None:
    for c in Code:
        assert int(getattr(AiocoapCode, c.name if c.name != "IPATCH" else "iPATCH")) == c, c
        assert c.dotted == AiocoapCode(int(c)).dotted
    for o in Option:
        assert int(getattr(OptionNumber, o.name)) == o, o
    assert [t.name for t in Type] == ["CON", "NON", "ACK", "RST"] and (CON, NON, ACK, RST) == (0, 1, 2, 3)
    assert dotted(0x45) == "2.05" and dotted(0xA3) == "5.03"
    assert Code.GET.is_request() and not Code.EMPTY.is_request() and Code.CONTENT.is_response()
    assert Code.CONTENT.is_successful() and not Code.NOT_FOUND.is_successful()


_options = st.lists(  # opaque, uint and unknown options: aiocoap decodes any bytes there
    st.tuples(st.sampled_from([1, 4, 12, 14, 17, 60, 258, 300, 2000]), st.binary(max_size=300)), max_size=6
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([0, 1, 2, 3]),
    st.integers(1, 255),
    st.integers(0, 0xFFFF),
    st.binary(max_size=8),
    _options,
    st.binary(max_size=40),
)
def test_encode_agrees_with_aiocoap(
    mtype: int, code: int, mid: int, token: bytes, options: list[tuple[int, bytes]], payload: bytes
) -> None:
    ours = Message(mtype, code, mid, token, tuple(options), payload).encode()
    theirs = aiocoap.Message.decode(ours)
    assert (theirs.mtype, theirs.code, theirs.mid, theirs.token) == (mtype, code, mid, token)
    assert theirs.payload == payload
    assert [int(o.number) for o in theirs.opt.option_list()] == sorted(n for n, _v in options)
    assert Message.decode(ours) == Message(
        mtype, code, mid, token, tuple(sorted(options, key=lambda o: o[0])), payload
    )


@settings(max_examples=2000, deadline=None)
@given(
    st.binary(max_size=60)
    | st.builds(
        lambda a, b: a + b,
        st.sampled_from([b"\x40\x01\x00\x01", b"\x62\x45\x00\x02ab"]),
        st.binary(max_size=40),
    )
)
def test_fuzz_decode_only_message_error_escapes(raw: bytes) -> None:
    try:
        m = Message.decode(raw)
    except MessageError:
        return
    assert m.encode() == raw  # the option encoding has one form per value: decoding loses nothing
