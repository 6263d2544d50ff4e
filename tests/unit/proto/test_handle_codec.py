"""The Handle native-protocol codec against real HANDLE.NET 7.3.1 traffic, hand-written RFC 3652 vectors,
and hypothesis-generated garbage (which must only ever raise HandleFormatError). What a response code means
for a resolution is the upstream layer's (tests/unit/gateway/test_native_client.py)."""

from __future__ import annotations

import ast
import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.handle import (
    Envelope,
    ErrorResponse,
    HandleFormatError,
    Header,
    Message,
    Reassembler,
    ResolutionRequest,
    ResolutionResponse,
    StreamFramer,
    decode_answer,
    decode_envelope,
    decode_head,
    decode_message,
    decode_referral,
    decode_request,
    decode_response,
    decode_value,
    encode_message,
    encode_request,
    encode_response,
    encode_truncated,
    encode_value,
    peek_envelope,
    split_datagrams,
)
from proto.handle import numbers as N
from proto.records import TTL_ABSOLUTE, AdminRef, HandleValue
from tests.support.captures import NAMES, load_capture

ALL = {name: load_capture(name) for name in NAMES}
EVERY_DATAGRAM = [d for req, resps in ALL.values() for d in (req, *resps)]
WHOLE_MESSAGES = [req for req, _ in ALL.values()] + [
    r[0] for r in (resps for _, resps in ALL.values()) if len(r) == 1
]


def reassemble(datagrams: list[bytes]) -> bytes:
    r = Reassembler()
    out = [m for m in (r.feed(d) for d in datagrams) if m is not None]
    assert len(out) == 1 and r.complete and not r.missing
    return out[0]


def decode_any(data: bytes) -> object:
    """Everything a peer's bytes go through; must raise HandleFormatError or nothing."""
    msg = decode_message(data)
    if msg.header.is_request:
        return decode_request(msg)
    resp = decode_response(msg)
    if isinstance(resp, ErrorResponse):
        resp.referral()
    return resp


# ------------------------------------------------------------------------------------------------------
# captured traffic
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_captured_request_fields(name: str) -> None:
    data, _ = ALL[name]
    msg = decode_message(data)
    env, h = msg.envelope, msg.header
    assert (env.major, env.minor, env.flags, env.session_id, env.sequence) == (2, 5, 0, 0, 0)
    assert env.message_length == len(data) - 20
    assert (h.opcode, h.response_code, h.op_flags) == (N.OC_RESOLUTION, 0, 0x19000000)
    assert h.op_flags == N.OPF_REC | N.OPF_CA | N.OPF_PO == N.DEFAULT_REQUEST_FLAGS
    assert (h.site_info_serial, h.recursion_count) == (0xFFFF, 0)
    assert msg.credential == b""
    req = decode_request(msg)
    assert req.types == () and req.indexes == ()
    assert req.name.startswith("88.123.99/")


@pytest.mark.parametrize("name", NAMES)
def test_captured_response_envelope_echoes_request(name: str) -> None:
    req_data, resps = ALL[name]
    req = decode_message(req_data)
    for seq, d in enumerate(resps):
        env = decode_envelope(d)
        assert (env.major, env.minor, env.flags, env.session_id) == (2, 5, 0, 0)
        assert env.request_id == req.envelope.request_id
        assert env.sequence == seq
    resp = decode_message(reassemble(resps))
    assert resp.header.op_flags == 0x99000000 == N.OPF_AT | N.DEFAULT_REQUEST_FLAGS
    assert resp.header.site_info_serial == 1
    assert resp.header.opcode == N.OC_RESOLUTION
    assert resp.header.expiration == req.header.expiration
    assert resp.credential == b""


def test_found() -> None:
    req_data, (resp_data,) = ALL["capture_found.hex"]
    assert len(req_data) == 79 and len(resp_data) == 237
    assert decode_envelope(req_data).request_id == 0x1C77F8E5
    resp = decode_response(decode_message(resp_data))
    assert isinstance(resp, ResolutionResponse)
    assert resp.handle == "88.123.99/PUMP-0001"
    assert [(v.index, v.type) for v in resp.values] == [(1, "URL"), (2, "EMAIL"), (100, "HS_ADMIN")]
    url, email, admin = resp.values
    assert url.data == b"https://example.com/pump/0001"
    assert email.data == b"ops@example.com"
    assert AdminRef.decode(admin.data) == AdminRef("0.NA/88.123.99", 300, 0x0FFF)
    for v in resp.values:
        assert (v.ttl, v.ttl_type, v.permissions, v.references) == (86400, 0, 0x0E, ())
        assert v.timestamp == 0x6B021ED9
    assert resp.record().to_rest()["values"][0]["data"] == {
        "format": "string",
        "value": "https://example.com/pump/0001",
    }


def test_notfound() -> None:
    _, (resp_data,) = ALL["capture_notfound.hex"]
    msg = decode_message(resp_data)
    assert msg.header.response_code == N.RC_HANDLE_NOT_FOUND == 100
    assert msg.body == b"\x00\x00\x00\x00"  # an empty UTF-8 error text
    resp = decode_response(msg)
    assert resp == ErrorResponse(100, "") and resp.referral() is None


def test_many_is_three_datagrams() -> None:
    _, resps = ALL["capture_many.hex"]
    assert [len(d) for d in resps] == [512, 512, 190]
    envs = [decode_envelope(d) for d in resps]
    assert {e.message_length for e in envs} == {1154}
    assert [e.sequence for e in envs] == [0, 1, 2]
    assert len({e.request_id for e in envs}) == 1
    with pytest.raises(HandleFormatError, match="reassemble"):
        decode_message(resps[0])


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_many_reassembles_in_any_order(order: tuple[int, ...]) -> None:
    _, resps = ALL["capture_many.hex"]
    r = Reassembler(decode_envelope(resps[0]).request_id)
    assert r.expected is None and r.missing == ()
    results = []
    for n, i in enumerate(order):
        results.append(r.feed(resps[i]))
        if n < 2:
            assert r.expected == 3 and len(r.missing) == 2 - n and not r.complete
    assert results[:2] == [None, None] and results[2] is not None
    assert r.feed(resps[order[0]]) is None and r.duplicates == 1
    resp = decode_response(decode_message(results[2]))
    assert isinstance(resp, ResolutionResponse)
    assert len(resp.values) == 21
    assert [v.index for v in resp.values] == list(range(1, 21)) + [100]


def test_ttl() -> None:
    _, (resp_data,) = ALL["capture_ttl.hex"]
    resp = decode_response(decode_message(resp_data))
    assert isinstance(resp, ResolutionResponse)
    ttls = {v.index: v.ttl for v in resp.values}
    assert ttls == {1: 5, 2: 86400, 100: 86400}


@pytest.mark.parametrize("name", NAMES)
def test_encode_request_reproduces_capture(name: str) -> None:
    data, _ = ALL[name]
    msg = decode_message(data)
    ours = encode_request(
        decode_request(msg).name,
        request_id=msg.envelope.request_id,
        expiration=msg.header.expiration,
    )
    assert ours == data


@pytest.mark.parametrize("name", NAMES)
def test_encode_response_reproduces_capture(name: str) -> None:
    req_data, resps = ALL[name]
    request = decode_message(req_data)
    response = decode_response(decode_message(reassemble(resps)))
    assert split_datagrams(encode_response(request, response)) == resps


def test_split_sets_tc_only_when_asked() -> None:
    req_data, resps = ALL["capture_many.hex"]
    whole = reassemble(resps)
    pieces = split_datagrams(whole, set_tc=True)
    assert all(decode_envelope(p).truncated for p in pieces)
    assert reassemble(pieces) == whole  # TC is cleared in the reassembled envelope
    assert split_datagrams(req_data, set_tc=True) == [req_data]  # fits: untouched
    assert len(split_datagrams(whole, max_datagram=100)) == -(-1154 // 80)
    assert reassemble(split_datagrams(whole, max_datagram=1200)) == whole


# ------------------------------------------------------------------------------------------------------
# byte vectors written by hand from the RFC 3652 layout (not produced by our encoder)
# ------------------------------------------------------------------------------------------------------
RFC_REQUEST = bytes.fromhex(
    # envelope: version 2.1, MessageFlag 0, SessionId 0, RequestId 0x01020304, SequenceNumber 0, length 60
    "02 01 0000 00000000 01020304 00000000 0000003c"
    # header: OC_RESOLUTION, RC 0, OpFlag REC|PO, SiteInfoSerial 0xffff, RecursionCount 0, reserved,
    # ExpirationTime 0x5f5e1000, BodyLength 32
    "00000001 00000000 11000000 ffff 00 00 5f5e1000 00000020"
    # body: Handle "10.1000/1", IndexList [1], TypeList ["URL"]
    "00000009 31302e313030302f31 00000001 00000001 00000001 00000003 55524c"
    # credential: none
    "00000000"
)

RFC_RESPONSE = bytes.fromhex(
    "02 01 0000 00000000 01020304 00000000 00000052"  # length 82 = 24 + 54 + 4
    "00000001 00000001 91000000 0001 00 00 5f5e1000 00000036"  # RC_SUCCESS, AT|REC|PO, body 54
    "00000009 31302e313030302f31"  # Handle (13 bytes)
    "00000001"  # one value (4 + 37 bytes):
    "00000001 00000000 00 00000e10 0e"  # index 1, timestamp 0, relative TTL 3600, PUB_READ|ADMIN_RW
    "00000003 55524c 00000008 687474703a2f2f61"  # type URL, data http://a ... (no references follow)
    "00000000"
    "00000000"  # credential
)

RFC_ERROR = bytes.fromhex(
    "02 01 0000 00000000 01020304 00000000 00000028"  # length 40 = 24 + 12 + 4
    "00000001 0000012d 11000000 0001 00 00 5f5e1000 0000000c"  # RC_SERVER_NOT_RESP (301), body 12
    "00000008 6e6f742068657265"  # ErrorMessage "not here"
    "00000000"
)


def test_rfc_request_decodes() -> None:
    msg = decode_message(RFC_REQUEST)
    assert msg.envelope == Envelope(2, 1, 0, 0, 0x01020304, 0, 60)
    assert msg.header == Header(1, 0, 0x11000000, 0xFFFF, 0, 0x5F5E1000, 32)
    assert decode_request(msg) == ResolutionRequest(b"10.1000/1", (b"URL",), (1,))


def test_rfc_request_encodes() -> None:
    ours = encode_request(
        "10.1000/1",
        request_id=0x01020304,
        types=["URL"],
        indexes=[1],
        version=(2, 1),
        op_flags=N.OPF_REC | N.OPF_PO,
        expiration=0x5F5E1000,
    )
    assert ours == RFC_REQUEST


def test_rfc_response_decodes_and_encodes() -> None:
    resp = decode_response(decode_message(RFC_RESPONSE))
    value = HandleValue(index=1, type="URL", data=b"http://a", ttl=3600, timestamp=0, permissions=0x0E)
    assert resp == ResolutionResponse("10.1000/1", (value,))
    request = decode_message(RFC_REQUEST)
    assert encode_response(request, resp) == RFC_RESPONSE  # AT | REC | the request's PO


def test_rfc_error_decodes_and_encodes() -> None:
    resp = decode_response(decode_message(RFC_ERROR))
    assert resp == ErrorResponse(301, "not here") and resp.name == "SERVER_NOT_RESP (301)"
    assert encode_response(decode_message(RFC_REQUEST), resp, authoritative=False) == RFC_ERROR


def test_request_digest_is_skipped() -> None:
    request = decode_message(RFC_REQUEST)
    resp = decode_response(decode_message(RFC_RESPONSE))
    for kind, digest in (
        (N.DIGEST_SHA1, bytes(range(20))),
        (N.DIGEST_SHA256, bytes(32)),
        (N.DIGEST_MD5_OLD_FORMAT, b"x" * 16),
    ):
        data = encode_response(request, resp, request_digest=(kind, digest))
        msg = decode_message(data)
        assert msg.header.op_flags & N.OPF_RD
        assert decode_response(msg) == resp
    bad = bytearray(encode_response(request, resp, request_digest=(N.DIGEST_SHA1, bytes(20))))
    bad[44] = 9  # unknown hash type
    with pytest.raises(HandleFormatError, match="digest type 9"):
        decode_response(decode_message(bytes(bad)))


# ------------------------------------------------------------------------------------------------------
# response codes: reported as they are, judged by nobody here
# ------------------------------------------------------------------------------------------------------
def _answer(resp: ErrorResponse) -> ErrorResponse | ResolutionResponse:
    return decode_response(decode_message(encode_response(decode_message(RFC_REQUEST), resp)))


def test_error_codes_are_reported_with_their_text() -> None:
    for code in (2, 3, 4, 100, 200, 301, 400, 401, 403, 500, 999):
        assert _answer(ErrorResponse(code, "x")) == ErrorResponse(code, "x")
    auth = _answer(ErrorResponse(402, data=b"\x00\x00\x00\x10" + bytes(16)))
    assert auth == ErrorResponse(402, "authentication needed", b"\x00\x00\x00\x10" + bytes(16))


def test_referral() -> None:
    site = HandleValue(index=1, type="HS_SITE", data=b"\x00\x01site")
    body = struct.pack(">I", 11) + b"0.NA/10.999" + struct.pack(">I", 1) + encode_value(site)
    resp = _answer(ErrorResponse(302, data=body))
    assert resp == ErrorResponse(302, "", body)
    assert decode_referral(resp.data) == ("0.NA/10.999", (site,)) == resp.referral()
    assert decode_referral(struct.pack(">I", 3) + b"a/b") == ("a/b", ())
    with pytest.raises(HandleFormatError):
        _answer(ErrorResponse(303, data=b"\x00\x00\x00\xff"))


def test_numbers() -> None:
    assert N.ResponseCode.SERVER_TOO_BUSY is N.ResponseCode.SERVER_BUSY
    assert N.ResponseCode.INVALID_ADMIN is N.ResponseCode.NOT_AUTHORIZED
    assert N.RC_AUTHEN_NEEDED == 402 and N.RC_PREFIX_REFERRAL == 303 and N.RC_SERVER_NOT_RESP == 301
    assert N.ResponseCode.describe(100) == "HANDLE_NOT_FOUND (100)"
    assert N.ResponseCode.describe(777) == "unknown (777)"
    assert [
        int(f)
        for f in (N.OPF_AT, N.OPF_CT, N.OPF_ENC, N.OPF_REC, N.OPF_CA, N.OPF_CN, N.OPF_KC, N.OPF_PO, N.OPF_RD)
    ] == [1 << b for b in range(31, 22, -1)]
    assert (int(N.ENV_CP), int(N.ENV_EC), int(N.ENV_TC)) == (0x8000, 0x4000, 0x2000)
    assert N.DEFAULT_PORT == 2641 and N.MAX_UDP_PAYLOAD == 492


# ------------------------------------------------------------------------------------------------------
# envelope flags, truncation marker, framing
# ------------------------------------------------------------------------------------------------------
def test_envelope_flags() -> None:
    env = Envelope(flags=0x8000 | 0x2000 | 0x0205)
    assert env.compressed and env.truncated and not env.encrypted
    assert env.suggested_version == (2, 5)
    assert Envelope().suggested_version is None
    data = bytearray(RFC_REQUEST)
    data[2] = 0x80
    with pytest.raises(HandleFormatError, match="compressed"):
        decode_message(bytes(data))
    data[2] = 0x40
    with pytest.raises(HandleFormatError, match="encrypted"):
        decode_message(bytes(data))
    data[2], data[0] = 0, 5
    with pytest.raises(HandleFormatError, match="version 5.1"):
        decode_message(bytes(data))


def test_encode_truncated() -> None:
    request = decode_message(ALL["capture_found.hex"][0])
    d = encode_truncated(request)
    env = decode_envelope(d)
    assert env.truncated and env.request_id == request.envelope.request_id
    assert env.message_length == len(d) - 20 and len(d) <= 512


def test_message_encode_recomputes_lengths() -> None:
    msg = decode_message(RFC_REQUEST)
    assert msg.encode() == RFC_REQUEST
    assert Message(Envelope(request_id=7), Header(1), b"abc", b"sig").encode() == encode_message(
        Envelope(request_id=7, message_length=999), Header(1, body_length=1), b"abc", b"sig"
    )
    signed = decode_message(Message(Envelope(), Header(1), b"", b"signature").encode())
    assert signed.credential == b"signature"
    # a peer that leaves the credential length out entirely
    bare = bytearray(RFC_REQUEST[:-4])
    bare[16:20] = struct.pack(">I", 56)
    assert decode_message(bytes(bare)).credential == b""


def test_framer_byte_at_a_time_and_chunks() -> None:
    stream = b"".join(WHOLE_MESSAGES)
    f = StreamFramer()
    got = [m for i in range(len(stream)) for m in f.feed(stream[i : i + 1])]
    assert got == WHOLE_MESSAGES and f.buffered == 0
    f.eof()
    f = StreamFramer()
    assert f.feed(stream + stream[:30]) == WHOLE_MESSAGES
    with pytest.raises(HandleFormatError, match="inside a message"):
        f.eof()


def test_framer_rejects_oversized_and_stays_broken() -> None:
    f = StreamFramer()
    with pytest.raises(HandleFormatError, match="exceeds"):
        f.feed(Envelope(message_length=N.MAX_MESSAGE_SIZE + 1).encode())
    with pytest.raises(HandleFormatError):
        f.feed(RFC_REQUEST)


# ------------------------------------------------------------------------------------------------------
# caps and hand-made damage
# ------------------------------------------------------------------------------------------------------
def _response_with_body(body: bytes) -> bytes:
    return encode_message(Envelope(), Header(1, 1), body)


def test_caps() -> None:
    with pytest.raises(HandleFormatError, match="value count 10001 exceeds"):
        decode_response(
            decode_message(_response_with_body(struct.pack(">I", 3) + b"a/b" + struct.pack(">I", 10_001)))
        )
    with pytest.raises(HandleFormatError, match="cannot fit"):
        decode_response(
            decode_message(_response_with_body(struct.pack(">I", 3) + b"a/b" + struct.pack(">I", 500)))
        )
    with pytest.raises(HandleFormatError, match="handle length 70000 exceeds"):
        decode_response(decode_message(_response_with_body(struct.pack(">I", 70_000) + bytes(70_000))))
    with pytest.raises(HandleFormatError, match="not UTF-8"):
        decode_response(decode_message(_response_with_body(struct.pack(">I", 2) + b"\xff\xfe" + bytes(4))))
    with pytest.raises(HandleFormatError, match="limit"):
        Reassembler().feed(Envelope(message_length=N.MAX_UDP_MESSAGE_SIZE + 1).encode() + bytes(492))
    with pytest.raises(ValueError):
        encode_value(HandleValue(index=-1, type="URL", data=b""))


def test_value_roundtrip_with_references() -> None:
    v = HandleValue(
        index=7,
        type="HS_VLIST",
        data=b"\x00\x01",
        ttl=1_900_000_000,
        ttl_type=TTL_ABSOLUTE,
        timestamp=0xFFFFFFFF,
        permissions=0x0A,
        references=(("0.NA/10.1", 200), ("10.1/admin", 300)),
    )
    assert decode_value(encode_value(v)) == v
    with pytest.raises(HandleFormatError, match="after the value"):
        decode_value(encode_value(v) + b"x")


def test_reassembler_rejects_inconsistent_pieces() -> None:
    _, resps = ALL["capture_many.hex"]
    rid = decode_envelope(resps[0]).request_id
    with pytest.raises(HandleFormatError, match="expected"):
        Reassembler(rid + 1).feed(resps[0])
    r = Reassembler()
    r.feed(resps[0])
    with pytest.raises(HandleFormatError, match="disagrees"):
        r.feed(resps[1][:16] + struct.pack(">I", 1155) + resps[1][20:])
    with pytest.raises(HandleFormatError, match="out of range"):
        r.feed(resps[1][:12] + struct.pack(">I", 3) + resps[1][16:])
    with pytest.raises(HandleFormatError, match="carries"):
        r.feed(resps[1][:-1])
    with pytest.raises(HandleFormatError, match="empty"):
        Reassembler().feed(Envelope(sequence=1).encode())
    # a bad first datagram does not poison the reassembler for the real ones
    r = Reassembler()
    with pytest.raises(HandleFormatError, match="out of range"):
        r.feed(resps[1][:12] + struct.pack(">I", 7) + resps[1][16:])
    assert r.expected is None
    assert [r.feed(d) is not None for d in resps] == [False, False, True]


@pytest.mark.parametrize("data", EVERY_DATAGRAM, ids=lambda d: f"{len(d)}B-{d[8:12].hex()}-{d[15]}")
def test_every_truncation_raises_protocol_error(data: bytes) -> None:
    for n in range(len(data)):
        cut = data[:n]
        with pytest.raises(HandleFormatError):
            decode_any(cut)
        try:
            Reassembler().feed(cut)
        except HandleFormatError:
            pass


@pytest.mark.parametrize("data", WHOLE_MESSAGES, ids=lambda d: f"{len(d)}B-{d[8:12].hex()}")
def test_every_body_truncation_with_fixed_lengths(data: bytes) -> None:
    """Cut the body but keep the envelope and header lengths consistent: the body parser must notice."""
    msg = decode_message(data)
    for n in range(len(msg.body)):
        shorter = Message(msg.envelope, msg.header, msg.body[:n], msg.credential).encode()
        try:
            decode_any(shorter)
        except HandleFormatError:
            pass


# ------------------------------------------------------------------------------------------------------
# hypothesis: garbage never raises anything but HandleFormatError
# ------------------------------------------------------------------------------------------------------
_FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _flip_bits(data: bytes, draw: st.DataObject) -> bytes:
    """``data`` with one to four bits flipped."""
    b = bytearray(data)
    for bit in draw.draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=4)):
        b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def _only_format_error(data: bytes) -> None:
    try:
        decode_any(data)
    except HandleFormatError:
        pass


@_FAST
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    _only_format_error(data)
    try:
        Reassembler().feed(data)
    except HandleFormatError:
        pass
    try:
        StreamFramer().feed(data)
    except HandleFormatError:
        pass


@st.composite
def _framed_garbage(draw: st.DrawFn) -> bytes:
    """A valid envelope and header around an arbitrary body: reaches the body parsers every time."""
    body = draw(st.binary(max_size=400))
    code = draw(st.sampled_from([0, 1, 2, 3, 100, 200, 301, 302, 303, 402, 999]))
    flags = draw(st.sampled_from([0, int(N.DEFAULT_REQUEST_FLAGS), int(N.OPF_RD | N.OPF_AT)]))
    cred = draw(st.sampled_from([b"", b"\x00\x00\x00\x00", b"\x00\x00\x00\x05ab", b"\x00\x00"]))
    data = Envelope().encode() + Header(1, code, flags, body_length=len(body)).encode() + body + cred
    return Envelope(message_length=len(data) - 20).encode() + data[20:]


@_FAST
@given(_framed_garbage())
def test_framed_garbage(data: bytes) -> None:
    _only_format_error(data)


@_FAST
@given(st.sampled_from(EVERY_DATAGRAM), st.data())
def test_bit_flips(data: bytes, draw: st.DataObject) -> None:
    flipped = _flip_bits(data, draw)
    _only_format_error(flipped)
    try:
        Reassembler().feed(flipped)
    except HandleFormatError:
        pass


@_FAST
@given(st.lists(st.sampled_from(range(3)), min_size=3, max_size=12).filter(lambda xs: set(xs) == {0, 1, 2}))
def test_random_datagram_orders_with_duplicates(order: list[int]) -> None:
    _, resps = ALL["capture_many.hex"]
    r = Reassembler()
    outs = [r.feed(resps[i]) for i in order]
    done = [o for o in outs if o is not None]
    assert len(done) == 1
    assert r.duplicates == len(order) - 3
    resp = decode_response(decode_message(done[0]))
    assert isinstance(resp, ResolutionResponse) and len(resp.values) == 21


@_FAST
@given(st.lists(st.binary(min_size=0, max_size=520), max_size=6), st.integers(0, 2))
def test_reassembler_garbage_mixed_with_real_pieces(garbage: list[bytes], where: int) -> None:
    _, resps = ALL["capture_many.hex"]
    r = Reassembler()
    feed = [*resps[:where], *garbage, *resps[where:]]
    for d in feed:
        try:
            out = r.feed(d)
        except HandleFormatError:
            continue
        if out is not None:
            _only_format_error(out)


@_FAST
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_framer_random_split_points(sizes: list[int]) -> None:
    stream = b"".join(WHOLE_MESSAGES)
    f = StreamFramer()
    got: list[bytes] = []
    pos = 0
    for s in itertools.cycle(sizes):
        if pos >= len(stream):
            break
        got += f.feed(stream[pos : pos + s])
        pos += s
    assert got == WHOLE_MESSAGES


def test_the_codec_has_its_own_error_and_imports_nothing_of_the_gateway() -> None:
    """proto.handle raises its own HandleFormatError (also a ValueError) and imports only proto modules."""
    assert issubclass(HandleFormatError, ValueError)
    package = Path(N.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("gateway", "tools", "tests", "carrier"), (path.name, name)


@_FAST
@given(st.binary(max_size=64), st.sampled_from([24, 1000, N.MAX_UDP_MESSAGE_SIZE]))
def test_peek_envelope_accepts_what_decode_envelope_accepts(data: bytes, max_size: int) -> None:
    peeked = peek_envelope(data, max_size)
    try:
        env = decode_envelope(data, max_size=max_size)
    except HandleFormatError:
        assert peeked is None
    else:
        assert peeked == (env.flags, env.request_id, env.sequence, env.message_length)


def test_decode_head_of_a_broken_request() -> None:
    broken = RFC_REQUEST[:50]  # the header and a few body bytes: the lengths do not hold
    with pytest.raises(HandleFormatError):
        decode_message(broken)
    head = decode_head(broken)
    assert head.envelope == decode_envelope(RFC_REQUEST) and head.header.opcode == N.OC_RESOLUTION
    assert (head.header.expiration, head.header.op_flags, head.body) == (0x5F5E1000, 0x11000000, b"")
    for short in (RFC_REQUEST[:43], RFC_REQUEST[:19], b"\x05" + RFC_REQUEST[1:]):
        with pytest.raises(HandleFormatError):
            decode_head(short)


# ------------------------------------------------------------------------------------------------------
# the client's shortcuts: decode_answer and the filterless encode_request give what the general code gives
# ------------------------------------------------------------------------------------------------------
def _general_answer(data: bytes) -> object:
    try:
        return decode_response(decode_message(data, max_size=N.MAX_UDP_MESSAGE_SIZE))
    except HandleFormatError as e:
        return ("HandleFormatError", str(e))


def _quick(data: bytes) -> object:
    try:
        return decode_answer(data, max_size=N.MAX_UDP_MESSAGE_SIZE)
    except HandleFormatError as e:
        return ("HandleFormatError", str(e))


def _same_answer(data: bytes) -> None:
    assert _quick(data) == _general_answer(data)
    assert _quick(bytearray(data)) == _general_answer(data)


_values = st.lists(
    st.builds(
        HandleValue,
        index=st.integers(0, 2**32 - 1),
        type=st.text(max_size=12),
        data=st.binary(max_size=40),
        ttl=st.integers(0, 2**32 - 1),
        ttl_type=st.integers(0, 1),
        timestamp=st.integers(0, 2**32 - 1),
        permissions=st.integers(0, 255),
        references=st.lists(st.tuples(st.text(max_size=8), st.integers(0, 2**32 - 1)), max_size=2).map(tuple),
    ),
    max_size=4,
)


@_FAST
@given(
    st.text(max_size=30),
    _values,
    st.sampled_from([b"", b"\x00\x00\x00\x00", b"\x00\x00\x00\x02ab"]),
    st.sampled_from([0, int(N.DEFAULT_REQUEST_FLAGS), int(N.OPF_AT | N.OPF_REC), int(N.OPF_RD)]),
)
def test_decode_answer_is_the_general_decoding(
    handle: str, values: list[HandleValue], cred: bytes, flags: int
) -> None:
    body = ResolutionResponse(handle, tuple(values))
    req = decode_message(encode_request(handle, request_id=7))
    if flags == int(N.OPF_RD):  # a request digest before the body: the general decoder's
        data = encode_response(req, body, request_digest=(N.DIGEST_SHA1, bytes(20)))
    else:
        data = encode_response(req, body, op_flags=flags)
    if cred:  # a credential after the body (length word + bytes), message length fixed up
        data = data[:-4] + cred
        data = data[:16] + struct.pack(">I", len(data) - 20) + data[20:]
    _same_answer(data)
    answer = _quick(data)
    assert isinstance(answer, ResolutionResponse) and answer.values == tuple(values)
    for n in range(0, len(data), 7):  # cut anywhere: the same error
        _same_answer(data[:n])


@pytest.mark.parametrize(
    "data",
    [*EVERY_DATAGRAM, *(reassemble(r) for _, r in ALL.values())],
    ids=lambda d: f"{len(d)}B-{d[8:12].hex()}",
)
def test_decode_answer_on_captures_and_their_truncations(data: bytes) -> None:
    _same_answer(data)
    for n in range(len(data)):
        _same_answer(data[:n])
    whole = _general_answer(data)
    if isinstance(whole, (ResolutionResponse, ErrorResponse)):  # the body cut, the lengths kept consistent
        msg = decode_message(data)
        for n in range(len(msg.body)):
            _same_answer(Message(msg.envelope, msg.header, msg.body[:n], msg.credential).encode())


@_FAST
@given(st.sampled_from(EVERY_DATAGRAM), st.data())
def test_decode_answer_bit_flips(data: bytes, draw: st.DataObject) -> None:
    _same_answer(_flip_bits(data, draw))


@_FAST
@given(_framed_garbage())
def test_decode_answer_framed_garbage(data: bytes) -> None:
    _same_answer(data)


@_FAST
@given(st.binary(max_size=300))
def test_decode_answer_arbitrary_bytes(data: bytes) -> None:
    _same_answer(data)


@_FAST
@given(
    st.text(max_size=40),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from([(), ("URL",), ("URL", "EMAIL")]),
    st.sampled_from([(), (1,), (1, 300)]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.sampled_from([(2, 10), (2, 1), (3, 0)]),
)
def test_encode_request_is_the_general_encoding(
    handle: str,
    rid: int,
    session: int,
    flags: int,
    types: tuple[str, ...],
    indexes: tuple[int, ...],
    exp: int,
    recursion: int,
    version: tuple[int, int],
) -> None:
    ours = encode_request(
        handle,
        request_id=rid,
        session_id=session,
        op_flags=flags,
        types=types,
        indexes=indexes,
        expiration=exp,
        recursion_count=recursion,
        version=version,
    )
    general = encode_message(
        Envelope(major=version[0], minor=version[1], session_id=session, request_id=rid),
        Header(opcode=N.OC_RESOLUTION, op_flags=flags, recursion_count=recursion, expiration=exp),
        ResolutionRequest(handle.encode(), tuple(t.encode() for t in types), indexes).encode_body(),
    )
    assert ours == general
    if version[0] == N.PROTOCOL_MAJOR:
        assert decode_request(decode_message(ours)) == ResolutionRequest(
            handle.encode(), tuple(t.encode() for t in types), indexes
        )


def test_encode_request_refuses_what_it_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the limit"):
        encode_request("x" * (N.MAX_FIELD_SIZE + 1), request_id=1)
    with pytest.raises(ValueError, match="field out of range"):
        encode_request("x", request_id=2**32)
    with pytest.raises(ValueError, match="field out of range"):
        encode_request("x", request_id=1, recursion_count=256)
