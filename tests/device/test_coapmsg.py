# CoAP messages (carrier/coapmsg.py): the codec against byte vectors written by hand from RFC 7252 (and
# RFC 7959 for Block2).
from mptest import eq, ok, raises, note
from carrier import coapmsg

ID24 = "88.123.99/PUMP-0001-ABCD"  # 24 characters


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def test_rfc7252_get_temperature_vector():
    # RFC 7252 Appendix A, Figure 16/17: CON [0x7d34] GET /temperature (no token)
    buf = bytearray(64)
    pos = coapmsg.header(buf, coapmsg.CON, coapmsg.GET, 0x7D34, 0, 0)
    pos = coapmsg.opt(buf, pos, coapmsg.O_URI_PATH, b"temperature")
    eq(bytes(buf[:pos]), h("40 01 7d 34 bb 74656d7065726174757265"))
    # ACK [0x7d34] 2.05 Content "22.3 C"
    m = coapmsg.decode(memoryview(h("60 45 7d 34 ff 32322e332043")), 11, coapmsg.Msg())
    eq((m.type, m.code, m.mid, m.tkl), (coapmsg.ACK, coapmsg.CONTENT, 0x7D34, 0))
    eq(coapmsg.dotted(m.code), "2.05")
    eq(m.payload_at, 5)


def test_resolve_request_bytes_for_24_char_identifier():
    buf = bytearray(64)
    n = coapmsg.resolve_request(buf, 0x1234, 0xBEEF, ID24.encode())
    want = h(
        "42 01 1234 beef"  # ver 1, CON, TKL 2, GET, MID, token
        "b1 72"  # Uri-Path (11) "r"
        "09 38382e3132332e3939"  # Uri-Path "88.123.99" (delta 0, length 9)
        "0d 01 50554d502d303030312d41424344"
    )  # Uri-Path, length 14 = 13 + ext byte 1
    eq(bytes(buf[:n]), want)
    ok(n <= 48, "resolve request must be <= 48 bytes")
    note("CoAP resolve request for a 24-character identifier:", n, "bytes on the wire (target <= 48)")


def test_options_with_extended_delta_and_length():
    buf = bytearray(400)
    pos = coapmsg.header(buf, coapmsg.CON, coapmsg.POST, 1, 0x0102)
    pos = coapmsg.opt(buf, pos, coapmsg.O_URI_PATH, b"x" * 13)  # length 13 -> nibble 13, ext 0
    pos = coapmsg.opt(buf, pos, 0, b"y" * 269)  # length 269 -> nibble 14, ext 00 00
    pos = coapmsg.uint_opt(buf, pos, coapmsg.O_CF - coapmsg.O_URI_PATH, 60)
    pos = coapmsg.uint_opt(buf, pos, 300 - coapmsg.O_CF, 0)  # delta 288 -> nibble 14, ext 00 13
    b = bytes(buf[:pos])
    eq(b[:6], h("42 02 0001 0102"))
    eq(b[6:8], h("bd 00"))
    eq(b[21:24], h("0e 0000"))
    eq(b[24 + 269 :], h("11 3c e0 0013"))
    m = coapmsg.decode(memoryview(b), len(b), coapmsg.Msg())
    eq((m.content_format, m.crit, m.payload_at, m.token), (60, 0, len(b), 0x0102))


def test_uint_option_encodings():
    # Max-Age (14) from option 0: delta 14 = nibble 13 + extension byte 1; minimal-length uint value
    for v, want in (
        (0, "d0 01"),
        (1, "d1 01 01"),
        (255, "d1 01 ff"),
        (256, "d2 01 0100"),
        (3600, "d2 01 0e10"),
        (0x10000, "d3 01 010000"),
    ):
        buf = bytearray(8)
        n = coapmsg.uint_opt(buf, 0, coapmsg.O_MAX_AGE, v)
        eq(bytes(buf[:n]), h(want), str(v))
        d = h("60 45 0001") + bytes(buf[:n])
        eq(coapmsg.decode(memoryview(d), len(d), coapmsg.Msg()).max_age, v)


def test_decode_options_etag_observe_block2_unknown():
    # 2.05, token 2, ETag 8 bytes, Observe 7, Content-Format 60, Max-Age 30, Block2 num 1 M=0 SZX 6,
    # then unknown options 525 (odd: critical) and 794 (even: elective), both with 2-byte deltas
    d = h(
        "62 45 0002 abcd"
        "48 0102030405060708"  # ETag (4)
        "21 07"  # Observe (6)
        "61 3c"  # Content-Format (12)
        "21 1e"  # Max-Age (14)
        "91 16"  # Block2 (23): 0x16 = num 1, M 0, SZX 6
        "e0 00e9"  # delta 269 + 0xe9 = 502: option 525
        "e0 0000"  # delta 269: option 794
        "ff a0"
    )
    m = coapmsg.decode(memoryview(d), len(d), coapmsg.Msg())
    eq(m.etag, h("0102030405060708"))
    eq((m.observe, m.content_format, m.max_age, m.block2), (7, 60, 30, 0x16))
    eq(m.crit, 525)
    eq(d[m.payload_at :], b"\xa0")


def test_decode_rejects_malformed():
    bad = [
        "40 01",  # shorter than a header
        "80 01 0001",  # version 2
        "49 01 0001 00",  # TKL 9
        "42 01 0001 00",  # token truncated
        "40 01 0001 ff",  # payload marker without payload
        "40 01 0001 f0",  # nibble 15 as delta
        "40 01 0001 0f",  # nibble 15 as length
        "40 01 0001 d0",  # extended delta missing
        "40 01 0001 b5 7274",  # option longer than the message
        "40 00 0001 ff 00",  # empty message with payload
        "40 45 0001 e1 00",  # 2-byte extension truncated
        "40 45 0001 d5 01 0102030405",  # Max-Age longer than 4 bytes
        "40 45 0001 49 0102030405060708 09",  # ETag longer than 8 bytes
    ]
    for s in bad:
        raises(coapmsg.CoapError, coapmsg.decode, memoryview(h(s)), len(h(s)), coapmsg.Msg())
