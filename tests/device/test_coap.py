# CoAP client (carrier/coap.py): the exchange layer (retransmission timers, matching, de-duplication, separate
# responses, Block2, ETag revalidation, reports, config observation) against a fake socket with a fake clock.
# The message codec has its own tests (test_coapmsg.py).
from mptest import eq, ok, note
from fwfakes import FakeSock, coap_reply
from carrier import coap, coapmsg, cbor, devicemsg
from carrier import identity

ID24 = "88.123.99/PUMP-0001-ABCD"  # 24 characters


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def _client(idt=ID24):
    c = coap.Client(identity.parse({"id": idt, "coap": "coap://127.0.0.1", "key": "00" * 16}))
    c.sock = FakeSock()
    c.now = 1000
    return c


def _reply(t, code, mid, tok=None, opts=(), payload=None):
    return coap_reply(t, code, mid, tok or 0, 0 if tok is None else 2, opts, payload)


def _sent(c):
    m = coapmsg.Msg()
    d = c.sock.tx.pop(0)
    coapmsg.decode(memoryview(d), len(d), m)
    return m, d


def _resp_payload(ident="88.1/X", values=None, src=2):
    return cbor.dumps({3: 1, 2: ident, 4: values or [[1, "URL", "https://x.example/", 86400]], 23: src})


def test_piggybacked_response_and_device_cache():
    c = _client()
    got = []
    ok(c.resolve("88.1/X", got.append))
    m, d = _sent(c)
    eq((m.type, m.code, m.tkl), (coapmsg.CON, coapmsg.GET, 2))
    c.sock.rx.append(
        _reply(
            coapmsg.ACK,
            coapmsg.CONTENT,
            m.mid,
            m.token,
            (
                (coapmsg.O_ETAG, b"\x01\x02\x03\x04\x05\x06\x07\x08"),
                (coapmsg.O_CF, 60),
                (coapmsg.O_MAX_AGE, 60),
            ),
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
    ex = [e for e in c.exchanges if e.state][0]
    ok(2000 <= ex.timeout <= 3000, "initial timeout in [ACK_TIMEOUT, ACK_TIMEOUT*1.5]: %d" % ex.timeout)
    t0 = ex.timeout
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
    c.sock.rx.append(_reply(coapmsg.ACK, 0, m.mid))
    c.poll(1100)
    c.poll(1000 + 10000)
    eq(c.sock.tx, [], "no retransmission after the empty ACK")
    sep = _reply(coapmsg.CON, coapmsg.CONTENT, 0x5000, m.token, ((coapmsg.O_CF, 60),), _resp_payload())
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
    r = _reply(coapmsg.ACK, coapmsg.CONTENT, m.mid, m.token, (), _resp_payload())
    c.sock.rx.extend([r, r])
    c.poll(1100)
    eq(len(got), 1)
    c.sock.rx.append(_reply(coapmsg.CON, coapmsg.CONTENT, 0x6000, 0x9999, (), b"\xa0"))
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
    c.sock.rx.append(_reply(coapmsg.ACK, coapmsg.CONTENT, m.mid, m.token ^ 1, (), _resp_payload()))
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
        c.sock.rx.append(_reply(coapmsg.ACK, code, m.mid, m.token, (), payload))
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
            coapmsg.ACK,
            coapmsg.CONTENT,
            m.mid,
            m.token,
            ((coapmsg.O_ETAG, b"E1"), (coapmsg.O_CF, 60), (coapmsg.O_BLOCK2, 0x0E)),
            big[:1024],
        )
    )
    c.poll(1100)
    m2, _ = _sent(c)
    eq(m2.block2, 0x16, "asks for block 1 of 1024 bytes")
    ok(m2.mid != m.mid)
    eq(m2.token, m.token)
    c.sock.rx.append(
        _reply(
            coapmsg.ACK,
            coapmsg.CONTENT,
            m2.mid,
            m2.token,
            ((coapmsg.O_ETAG, b"E1"), (coapmsg.O_CF, 60), (coapmsg.O_BLOCK2, 0x16)),
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
            coapmsg.ACK,
            coapmsg.CONTENT,
            m.mid,
            m.token,
            ((coapmsg.O_ETAG, b"tag1"), (coapmsg.O_MAX_AGE, 1)),
            _resp_payload(),
        )
    )
    c.poll(1100)
    c.poll(3000)  # Max-Age 1 s is over
    c.resolve("88.1/X", got.append)
    m, d = _sent(c)
    eq(m.etag, b"tag1", "revalidates with the ETag")
    c.sock.rx.append(
        _reply(
            coapmsg.ACK, coapmsg.VALID, m.mid, m.token, ((coapmsg.O_ETAG, b"tag1"), (coapmsg.O_MAX_AGE, 30))
        )
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
    eq(sorted(e[0] for e in ca._lru), ["a", "c"], "least recently used goes first")
    ca.put("d", None, 60, b"x" * 90, 0)
    eq([e[0] for e in ca._lru], ["d"])
    eq(ca.put("e", None, 60, b"x" * 101, 0), None, "larger than the cache")
    eq(ca.put("f", None, 0, b"x", 0), None, "Max-Age 0 without ETag is not kept")
    ok(ca.bytes <= 100)


def test_report_post_and_ack():
    c = _client("88.123.99/pump/7")
    got = []
    payload = cbor.dumps({2: "88.123.99/pump/7", 10: 3, 11: 1})
    ok(c.report(payload, 3, 1, lambda code, b, s: got.append((code, b, s))))
    m, d = _sent(c)
    eq((m.type, m.code, m.content_format), (coapmsg.CON, coapmsg.POST, 60))
    # Uri-Path d / 88.123.99 / pump / 7 / rpt, then Content-Format
    ok(b"\xb1d\x0988.123.99\x04pump\x017\x03rpt\x11\x3c\xff" in d, d)
    eq(d[m.payload_at :], payload)
    c.sock.rx.append(
        _reply(coapmsg.ACK, coapmsg.CHANGED, m.mid, m.token, (), cbor.dumps({10: 3, 11: 1, 3: 1}))
    )
    c.poll(1100)
    eq(got, [(1, 3, 1)])
    c.report(payload, 3, 2, lambda code, b, s: got.append((code, b, s)))
    m, d = _sent(c)
    c.sock.rx.append(
        _reply(coapmsg.ACK, coapmsg.CHANGED, m.mid, m.token, (), cbor.dumps({10: 3, 11: 9, 3: 1}))
    )
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
    eq(m.observe, 0, "registers an observation")
    ok(b"\x51d" in d and d.endswith(b"\x03cfg"), d)
    c.sock.rx.append(
        _reply(
            coapmsg.ACK,
            coapmsg.CONTENT,
            m.mid,
            m.token,
            ((coapmsg.O_OBSERVE, 5), (coapmsg.O_CF, 60)),
            cbor.dumps({20: 1, 21: 60}),
        )
    )
    c.poll(1100)
    eq(cfgs, [cbor.dumps({20: 1, 21: 60})])
    note_ = _reply(
        coapmsg.CON,
        coapmsg.CONTENT,
        0x7000,
        m.token,
        ((coapmsg.O_OBSERVE, 6), (coapmsg.O_CF, 60)),
        cbor.dumps({20: 2, 21: 30}),
    )
    c.sock.rx.extend([note_, note_])
    c.poll(1200)
    eq(len(cfgs), 2, "a notification delivered once")
    eq(c.sock.tx, [h("60 00 7000"), h("60 00 7000")])
    c.sock.tx.clear()
    c.cfg_ack(cbor.dumps({2: ID24, 20: 2, 3: 1}))
    m, d = _sent(c)
    eq(m.code, coapmsg.POST)
    ok(d.find(b"\x03cfg") > 0)


def test_icmp_unreachable_fails_fast():
    c = _client()
    got = []
    c.resolve("88.1/X", got.append)
    c.sock.rx.append(OSError(111))  # ECONNREFUSED: nothing listens on the gateway port
    c.poll(1100)
    eq(got[0][0], devicemsg.NO_RESPONSE)
    ok(c.ready())


def test_report_refused_for_now_carries_max_age():
    # 5.03 / 4.29 with a Max-Age: the callback gets the wait in seconds as a 4th argument; without one (or for
    # any other failure) -1; an acknowledgement (2.04) comes with the usual three
    c = _client("88.123.99/pump/7")
    got = []
    payload = cbor.dumps({2: "88.123.99/pump/7", 10: 3, 11: 1})
    err = cbor.dumps({3: 503, 9: "overloaded"})
    for code, opts, want in (
        (163, ((coapmsg.O_MAX_AGE, 9),), (503, 3, 1, 9)),
        (157, ((coapmsg.O_MAX_AGE, 0),), (429, 3, 1, 0)),
        (163, (), (503, 3, 1, -1)),
        (128, ((coapmsg.O_MAX_AGE, 9),), (400, 3, 1, -1)),
    ):
        ok(c.report(payload, 3, 1, lambda *a: got.append(a)))
        m, d = _sent(c)
        body = err if code != 157 else cbor.dumps({3: 429})
        if code == 128:
            body = cbor.dumps({3: 400})
        c.sock.rx.append(_reply(coapmsg.ACK, code, m.mid, m.token, opts, body))
        c.poll(1100)
        eq(got[-1], want, coapmsg.dotted(code))
    eq((c.errors, c.retrans), (0, 0), "an answer, even a refusal, is not a network error")
