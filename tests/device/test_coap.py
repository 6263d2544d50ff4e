# CoAP client: codec against byte vectors written by hand from RFC 7252 (and RFC 7959 for Block2), then
# the exchange layer (retransmission timers, matching, de-duplication, separate responses, Block2, ETag
# revalidation, reports, config observation) against a fake socket with a fake clock.
from mptest import eq, ok, raises, note
from fwfakes import FakeSock, coap_reply
from carrier import coap, cbor, devicemsg
from carrier.identity import Identity

ID24 = "88.123.99/PUMP-0001-ABCD"  # 24 characters


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def test_rfc7252_get_temperature_vector():
    # RFC 7252 Appendix A, Figure 16/17: CON [0x7d34] GET /temperature (no token)
    buf = bytearray(64)
    pos = coap.header(buf, coap.CON, coap.GET, 0x7D34, 0, 0)
    pos = coap.opt(buf, pos, coap.O_URI_PATH, b"temperature")
    eq(bytes(buf[:pos]), h("40 01 7d 34 bb 74656d7065726174757265"))
    # ACK [0x7d34] 2.05 Content "22.3 C"
    m = coap.decode(memoryview(h("60 45 7d 34 ff 32322e332043")), 11, coap.Msg())
    eq((m.t, m.code, m.mid, m.tkl), (coap.ACK, coap.CONTENT, 0x7D34, 0))
    eq(coap.dotted(m.code), "2.05")
    eq(m.pl, 5)


def test_resolve_request_bytes_for_24_char_identifier():
    buf = bytearray(64)
    n = coap.resolve_request(buf, 0x1234, 0xBEEF, ID24.encode())
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
    pos = coap.header(buf, coap.CON, coap.POST, 1, 0x0102)
    pos = coap.opt(buf, pos, coap.O_URI_PATH, b"x" * 13)  # length 13 -> nibble 13, ext 0
    pos = coap.opt(buf, pos, 0, b"y" * 269)  # length 269 -> nibble 14, ext 00 00
    pos = coap.uint_opt(buf, pos, coap.O_CF - coap.O_URI_PATH, 60)
    pos = coap.uint_opt(buf, pos, 300 - coap.O_CF, 0)  # delta 288 -> nibble 14, ext 00 13
    b = bytes(buf[:pos])
    eq(b[:6], h("42 02 0001 0102"))
    eq(b[6:8], h("bd 00"))
    eq(b[21:24], h("0e 0000"))
    eq(b[24 + 269 :], h("11 3c e0 0013"))
    m = coap.decode(memoryview(b), len(b), coap.Msg())
    eq((m.cf, m.crit, m.pl, m.tok), (60, 0, len(b), 0x0102))


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
        n = coap.uint_opt(buf, 0, coap.O_MAX_AGE, v)
        eq(bytes(buf[:n]), h(want), str(v))
        d = h("60 45 0001") + bytes(buf[:n])
        eq(coap.decode(memoryview(d), len(d), coap.Msg()).max_age, v)


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
    m = coap.decode(memoryview(d), len(d), coap.Msg())
    eq(m.etag, h("0102030405060708"))
    eq((m.obs, m.cf, m.max_age, m.block2), (7, 60, 30, 0x16))
    eq(m.crit, 525)
    eq(d[m.pl :], b"\xa0")


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
        raises(coap.CoapError, coap.decode, memoryview(h(s)), len(h(s)), coap.Msg())


# ---- exchanges ------------------------------------------------------------------------------------------
def _client(idt=ID24):
    c = coap.Client(Identity({"id": idt, "coap": "coap://127.0.0.1", "key": "00" * 16}))
    c.sock = FakeSock()
    c.now = 1000
    return c


def _reply(t, code, mid, tok=None, opts=(), payload=None):
    return coap_reply(t, code, mid, tok or 0, 0 if tok is None else 2, opts, payload)


def _sent(c):
    m = coap.Msg()
    d = c.sock.tx.pop(0)
    coap.decode(memoryview(d), len(d), m)
    return m, d


def _resp_payload(ident="88.1/X", values=None, src=2):
    return cbor.dumps({3: 1, 2: ident, 4: values or [[1, "URL", "https://x.example/", 86400]], 23: src})


def test_piggybacked_response_and_device_cache():
    c = _client()
    got = []
    ok(c.resolve("88.1/X", got.append))
    m, d = _sent(c)
    eq((m.t, m.code, m.tkl), (coap.CON, coap.GET, 2))
    c.sock.rx.append(
        _reply(
            coap.ACK,
            coap.CONTENT,
            m.mid,
            m.tok,
            ((coap.O_ETAG, b"\x01\x02\x03\x04\x05\x06\x07\x08"), (coap.O_CF, 60), (coap.O_MAX_AGE, 60)),
            _resp_payload(),
        )
    )
    c.poll(1100)
    eq(got, [(1, "88.1/X", [[1, "URL", "https://x.example/", 86400]], 2, None)])
    ok(c.resolve("88.1/X", got.append))
    eq(c.sock.tx, [], "served from the device cache")
    eq(got[1][3], -1)
    eq(c.cache.hits, 1)


def test_retransmission_timers_and_give_up():
    c = _client()
    got = []
    c.resolve("88.1/X", got.append)
    first = c.sock.tx.pop(0)
    ex = [e for e in c._ex if e.st][0]
    ok(2000 <= ex.tmo <= 3000, "initial timeout in [ACK_TIMEOUT, ACK_TIMEOUT*1.5]: %d" % ex.tmo)
    t0 = ex.tmo
    now = 1000
    sends = []
    while not got and now < 1000 + 200000:
        now += 10
        c.poll(now)
        if c.sock.tx:
            eq(c.sock.tx.pop(0), first, "a retransmission repeats the same bytes (same MID)")
            sends.append(now - 1000)
    eq(len(sends), 4, "MAX_RETRANSMIT")
    gaps = [sends[0]] + [sends[i] - sends[i - 1] for i in range(1, 4)]
    for i, g in enumerate(gaps):
        ok(abs(g - t0 * (1 << i)) <= 10, "gap %d: %d vs %d" % (i, g, t0 << i))
    ok(abs((now - 1000) - t0 * 31) <= 50, "gives up after the last timeout: %d vs %d" % (now - 1000, t0 * 31))
    eq(got[0][0], devicemsg.NO_RESPONSE)
    eq(c.retrans, 4)
    note("retransmissions at", sends, "ms; gave up at", now - 1000, "ms")


def test_empty_ack_then_separate_response_with_duplicate():
    c = _client()
    got = []
    c.resolve("88.1/X", got.append)
    m, _ = _sent(c)
    c.sock.rx.append(_reply(coap.ACK, 0, m.mid))
    c.poll(1100)
    c.poll(1000 + 10000)
    eq(c.sock.tx, [], "no retransmission after the empty ACK")
    sep = _reply(coap.CON, coap.CONTENT, 0x5000, m.tok, ((coap.O_CF, 60),), _resp_payload())
    c.sock.rx.append(sep)
    c.sock.rx.append(sep)  # the gateway retransmits its CON response
    c.poll(12000)
    eq(len(got), 1, "delivered once")
    eq(c.sock.tx, [h("60 00 5000"), h("60 00 5000")], "each copy of the CON response is ACKed")
    eq(c.dups, 1)


def test_late_duplicate_ack_and_unknown_token():
    c = _client()
    got = []
    c.resolve("88.1/X", got.append)
    m, _ = _sent(c)
    r = _reply(coap.ACK, coap.CONTENT, m.mid, m.tok, (), _resp_payload())
    c.sock.rx.extend([r, r])
    c.poll(1100)
    eq(len(got), 1)
    c.sock.rx.append(_reply(coap.CON, coap.CONTENT, 0x6000, 0x9999, (), b"\xa0"))
    c.poll(1200)
    eq(c.sock.tx, [h("70 00 6000")], "unknown CON response -> RST")
    c.sock.rx.append(h("40 45 0001 f0"))  # malformed: dropped, counted
    c.poll(1300)
    eq(c.errors, 1)


def test_mismatched_token_is_not_accepted():
    c = _client()
    got = []
    c.resolve("88.1/X", got.append)
    m, _ = _sent(c)
    c.sock.rx.append(_reply(coap.ACK, coap.CONTENT, m.mid, m.tok ^ 1, (), _resp_payload()))
    c.poll(1100)
    eq(got, [])


def test_error_responses_map_to_codes():
    c = _client()
    for code, payload, want in (
        (132, cbor.dumps({3: 100, 9: "handle not found"}), (100, "handle not found")),
        (157, None, (429, "4.29")),
        (163, None, (503, "5.03")),
        (128, b"\xff\xff", (400, "4.00")),
        (160, None, (500, "5.00")),
    ):
        got = []
        c.resolve("88.1/E%d" % code, got.append)
        m, _ = _sent(c)
        c.sock.rx.append(_reply(coap.ACK, code, m.mid, m.tok, (), payload))
        c.poll(1100)
        eq((got[0][0], got[0][4]), want)


def test_block2_reassembly():
    c = _client()
    got = []
    big = _resp_payload(values=[[i, "URL", "https://example.org/%04d" % i, 60] for i in range(40)])
    ok(len(big) > 1024)
    c.resolve("88.1/BIG", got.append)
    m, _ = _sent(c)
    eq(m.block2, -1, "no Block2 on the first request")
    c.sock.rx.append(
        _reply(
            coap.ACK,
            coap.CONTENT,
            m.mid,
            m.tok,
            ((coap.O_ETAG, b"E1"), (coap.O_CF, 60), (coap.O_BLOCK2, 0x0E)),
            big[:1024],
        )
    )
    c.poll(1100)
    m2, _ = _sent(c)
    eq(m2.block2, 0x16, "asks for block 1 of 1024 bytes")
    ok(m2.mid != m.mid)
    eq(m2.tok, m.tok)
    c.sock.rx.append(
        _reply(
            coap.ACK,
            coap.CONTENT,
            m2.mid,
            m2.tok,
            ((coap.O_ETAG, b"E1"), (coap.O_CF, 60), (coap.O_BLOCK2, 0x16)),
            big[1024:],
        )
    )
    c.poll(1200)
    eq(got[0][0], 1)
    eq(len(got[0][2]), 40)


def test_etag_revalidation_refreshes_max_age():
    c = _client()
    got = []
    c.resolve("88.1/X", got.append)
    m, _ = _sent(c)
    c.sock.rx.append(
        _reply(
            coap.ACK,
            coap.CONTENT,
            m.mid,
            m.tok,
            ((coap.O_ETAG, b"tag1"), (coap.O_MAX_AGE, 1)),
            _resp_payload(),
        )
    )
    c.poll(1100)
    c.poll(3000)  # Max-Age 1 s is over
    c.resolve("88.1/X", got.append)
    m, d = _sent(c)
    eq(m.etag, b"tag1", "revalidates with the ETag")
    c.sock.rx.append(
        _reply(coap.ACK, coap.VALID, m.mid, m.tok, ((coap.O_ETAG, b"tag1"), (coap.O_MAX_AGE, 30)))
    )
    c.poll(3100)
    eq((got[1][0], got[1][2], got[1][3]), (1, [[1, "URL", "https://x.example/", 86400]], -2))
    c.poll(20000)
    c.resolve("88.1/X", got.append)
    eq(c.sock.tx, [], "2.03 refreshed the entry for 30 s")


def test_cache_bounds():
    from carrier import rcache

    ca = rcache.Cache(entries=2, max_bytes=100)
    ca.put("a", None, 60, b"x" * 40, 0)
    ca.put("b", None, 60, b"x" * 40, 0)
    ca.get("a")
    ca.put("c", None, 60, b"x" * 40, 0)
    eq(sorted(e[0] for e in ca._e), ["a", "c"], "least recently used goes first")
    ca.put("d", None, 60, b"x" * 90, 0)
    eq([e[0] for e in ca._e], ["d"])
    eq(ca.put("e", None, 60, b"x" * 101, 0), None, "larger than the cache")
    eq(ca.put("f", None, 0, b"x", 0), None, "Max-Age 0 without ETag is not kept")
    ok(ca.bytes <= 100)


def test_report_post_and_ack():
    c = _client("88.123.99/pump/7")
    got = []
    payload = cbor.dumps({2: "88.123.99/pump/7", 10: 3, 11: 1})
    ok(c.report(payload, 3, 1, lambda code, b, s: got.append((code, b, s))))
    m, d = _sent(c)
    eq((m.t, m.code, m.cf), (coap.CON, coap.POST, 60))
    # Uri-Path d / 88.123.99 / pump / 7 / rpt, then Content-Format
    ok(b"\xb1d\x0988.123.99\x04pump\x017\x03rpt\x11\x3c\xff" in d, d)
    eq(d[m.pl :], payload)
    c.sock.rx.append(_reply(coap.ACK, coap.CHANGED, m.mid, m.tok, (), cbor.dumps({10: 3, 11: 1, 3: 1})))
    c.poll(1100)
    eq(got, [(1, 3, 1)])
    c.report(payload, 3, 2, lambda code, b, s: got.append((code, b, s)))
    m, d = _sent(c)
    c.sock.rx.append(_reply(coap.ACK, coap.CHANGED, m.mid, m.tok, (), cbor.dumps({10: 3, 11: 9, 3: 1})))
    c.poll(1200)
    eq(got[1], (500, 3, 2), "an ack for another report is not this report's ack")


def test_slots_are_bounded_and_stop_fails_pending():
    c = _client()
    got = []
    n = 0
    while c.resolve("88.1/S%d" % n, got.append):
        n += 1
    eq(n, coap.SLOTS)
    ok(not c.ready())
    c.stop()
    eq(len(got), coap.SLOTS)
    ok(all(g[0] == devicemsg.NO_RESPONSE for g in got))
    ok(not c.resolve("88.1/after", got.append), "no socket: not accepted")


def test_config_observe_and_notifications():
    c = _client()
    cfgs = []
    c.on_config = cfgs.append
    ok(c.get_config())
    m, d = _sent(c)
    eq(m.obs, 0, "registers an observation")
    ok(b"\x51d" in d and d.endswith(b"\x03cfg"), d)
    c.sock.rx.append(
        _reply(
            coap.ACK,
            coap.CONTENT,
            m.mid,
            m.tok,
            ((coap.O_OBSERVE, 5), (coap.O_CF, 60)),
            cbor.dumps({20: 1, 21: 60}),
        )
    )
    c.poll(1100)
    eq(cfgs, [cbor.dumps({20: 1, 21: 60})])
    note_ = _reply(
        coap.CON,
        coap.CONTENT,
        0x7000,
        m.tok,
        ((coap.O_OBSERVE, 6), (coap.O_CF, 60)),
        cbor.dumps({20: 2, 21: 30}),
    )
    c.sock.rx.extend([note_, note_])
    c.poll(1200)
    eq(len(cfgs), 2, "a notification delivered once")
    eq(c.sock.tx, [h("60 00 7000"), h("60 00 7000")])
    c.sock.tx.clear()
    c.cfg_ack(cbor.dumps({2: ID24, 20: 2, 3: 1}))
    m, d = _sent(c)
    eq(m.code, coap.POST)
    ok(d.find(b"\x03cfg") > 0)


def test_icmp_unreachable_fails_fast():
    c = _client()
    got = []
    c.resolve("88.1/X", got.append)
    c.sock.rx.append(OSError(111))  # ECONNREFUSED: nothing listens on the gateway port
    c.poll(1100)
    eq(got[0][0], devicemsg.NO_RESPONSE)
    ok(c.ready())
