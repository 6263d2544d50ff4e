# carrier.oscore against RFC 8613 Appendix C (context derivation C.1-C.3, protected requests C.4-C.6,
# protected responses C.7-C.8), response verification rules, sequence number persistence, and the cost of
# protect/unprotect (time per operation and heap on the unix port).
import gc
import time
from mptest import eq, ok, raises, note
from carrier import oscore

SECRET = bytes(range(1, 17))
SALT = bytes.fromhex("9e7ca92223786340")
CTX_ID = bytes.fromhex("37cbf3210017a2d3")
GET_TV1 = "4401{mid}{tok}396c6f63616c686f737483747631"  # CON GET, Uri-Host "localhost", Uri-Path "tv1"


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def test_c1_c2_c3_context_derivation():
    # (sender id, recipient id, salt, id context) -> sender key, recipient key, common IV (client side)
    cases = (
        (
            "C.1.1",
            b"",
            b"\x01",
            SALT,
            None,
            "f0910ed7295e6ad4b54fc793154302ff",
            "ffb14e093c94c9cac9471648b4f98710",
            "4622d4dd6d944168eefb54987c",
        ),
        (
            "C.2.1",
            b"\x00",
            b"\x01",
            b"",
            None,
            "321b26943253c7ffb6003b0b64d74041",
            "e57b5635815177cd679ab4bcec9d7dda",
            "be35ae297d2dace910c52e99f9",
        ),
        (
            "C.3.1",
            b"",
            b"\x01",
            SALT,
            CTX_ID,
            "af2a1300a5e95788b356336eeecd2b92",
            "e39a0c7c77b43f03b4b39ab9a268699f",
            "2ca58fb85ff1b81c0b7181b85e",
        ),
    )
    for name, sid, rid, salt, ctx, sk, rk, iv in cases:
        eq(oscore.derive(SECRET, sid, rid, salt, ctx), (h(sk), h(rk), h(iv)), name)


def _protect(sid, rid, salt, ctx, plain, seq=20, echo=None):
    c = oscore.Context(SECRET, sid, rid, salt, ctx, seq=seq)
    out = bytearray(128)
    n, used = c.protect(plain, len(plain), out, echo)
    eq(used, seq)
    eq(c.seq, seq + 1)
    return bytes(out[:n])


def test_c4_c5_c6_protected_requests():
    eq(
        _protect(b"", b"\x01", SALT, None, h(GET_TV1.format(mid="5d1f", tok="00003974"))),
        h("44025d1f00003974396c6f63616c686f7374620914ff612f1092f1776f1c1668b3825e"),
        "C.4",
    )
    eq(
        _protect(b"\x00", b"\x01", b"", None, h(GET_TV1.format(mid="71c3", tok="0000b932"))),
        h("440271c30000b932396c6f63616c686f737463091400ff4ed339a5a379b0b8bc731fffb0"),
        "C.5",
    )
    eq(
        _protect(b"", b"\x01", SALT, CTX_ID, h(GET_TV1.format(mid="2f8e", tok="ef9bbf7a"))),
        h("44022f8eef9bbf7a396c6f63616c686f73746b19140837cbf3210017a2d3ff72cd7273fd331ac45cffbe55c3"),
        "C.6",
    )


def test_c7_c8_protected_responses():
    for name, wire in (
        ("C.7", "64445d1f0000397490ffdbaad1e9a7e7b2a813d3c31524378303cdafae119106"),
        ("C.8", "64445d1f00003974920100ff4d4c13669384b67354b2b6175ff4b8658c666a6cf88e"),
    ):
        c = oscore.Context(SECRET, b"", b"\x01", SALT)
        b = h(wire)
        m, piv, obs = c.unprotect(b, len(b), 20)
        eq(bytes(c.plain[:m]), h("45ff48656c6c6f20576f726c6421"), name + " inner: 2.05 'Hello World!'")
        eq((piv, obs), (-1 if name == "C.7" else 0, -1), name)


def test_response_verification_rules():
    c = oscore.Context(SECRET, b"", b"\x01", SALT)
    good = h("64445d1f0000397490ffdbaad1e9a7e7b2a813d3c31524378303cdafae119106")
    # answer to another request (other Partial IV in the AAD and nonce)
    raises(oscore.OscoreError, c.unprotect, good, len(good), 21)
    # every bit of the ciphertext or tag matters
    for i in range(9, len(good)):
        b = bytearray(good)
        b[i] ^= 0x80
        raises(oscore.OscoreError, c.unprotect, b, len(b), 20)
    # kid in a response must be the recipient id; unknown flag bits and kid context are refused
    for opt in ("9108", "920802", "9120", "9110", "9106"):
        b = h("64445d1f00003974" + opt + "ff" + "dbaad1e9a7e7b2a813d3c31524378303cdafae119106")
        raises(oscore.OscoreError, c.unprotect, b, len(b), 20)
    # kid = recipient id is fine
    b = h("64445d1f00003974" + "920801" + "ff" + "dbaad1e9a7e7b2a813d3c31524378303cdafae119106")
    eq(c.unprotect(b, len(b), 20)[0], 14)
    # no OSCORE option, no payload
    plain = h("64455d1f00003974ff48656c6c6f20576f726c6421")
    raises(oscore.NotProtected, c.unprotect, plain, len(plain), 20)
    raises(oscore.OscoreError, c.unprotect, good[:9], 9, 20)


def test_observe_stays_outer_and_inner_echo_is_added():
    plain = h("4201 1234 abcd 60 51 64 03 636667")  # CON GET Observe:0 /d/cfg
    out = _protect(b"\x01", b"", oscore.SALT, None, plain, seq=5, echo=b"\x01\x02\x03")
    eq(out[:6], h("4205 1234 abcd"), "outer code FETCH")
    eq(out[6:7], h("60"), "outer Observe: 0 (empty value)")
    eq(out[7:11], h("33 09 05 01"), "OSCORE option: flags n=1 k, piv 5, kid 01")
    eq(out[11], 0xFF)
    # decrypt it back with the gateway's view of the context (sender/recipient swapped) to check the inner part
    g = oscore.Context(SECRET, b"", b"\x01", oscore.SALT)
    n = len(out) - 12
    piv = bytearray(1)
    piv[0] = 5
    ok(g._rcv.decrypt(g._mknonce(b"\x01", piv, 0, 1), _req_aad(b"\x01", piv), out[12:], n, g.plain) > 0)
    eq(
        bytes(g.plain[: n - 8]),
        h("01 60 51 64 03 636667 d3 e4 010203"),
        "inner: GET, Observe 0, Uri-Path d, cfg, Echo (delta 241 = 13 + 0xe4)",
    )


def _req_aad(kid, piv):
    """The AAD of a request from kid with Partial IV piv (what a gateway computes)."""
    c = oscore.Context(SECRET, kid, b"\xfe")
    return bytes(c._aad[: c._mkaad(piv, 0, len(piv))])


class Store:
    def __init__(self):
        self.kv = {}
        self.writes = 0

    def kv_get(self, k):
        return self.kv.get(k)

    def kv_set(self, k, v):
        self.writes += 1
        self.kv[k] = bytes(v)


def test_sequence_numbers_reserved_ahead_and_never_reused():
    st = Store()
    key = bytes(16)
    start, persist = oscore.seq_store(st, key)
    eq(start, 0)
    c = oscore.Context(key, b"\x01", b"", seq=start, persist=persist)
    used = [c.next_seq() for _ in range(250)]
    eq(used, list(range(250)))
    eq(st.writes, 3, "one flash write per %d numbers" % oscore.SEQ_WINDOW)
    # power cut now: the next boot starts above everything that may have been used
    start2, _ = oscore.seq_store(st, key)
    eq(start2, 300)
    ok(start2 > max(used))
    # another key (re-provisioned device) starts again at 0
    eq(oscore.seq_store(st, b"\x01" * 16)[0], 0)

    # a failing flash write means the number is not used
    def broken(limit):
        raise OSError(28)

    c2 = oscore.Context(key, b"\x01", b"", seq=300, persist=broken)
    raises(OSError, c2.next_seq)
    eq(c2.seq, 300)
    c3 = oscore.Context(key, b"\x01", b"", seq=oscore.MAX_SEQ)
    raises(oscore.OscoreError, c3.next_seq)


def test_kid_is_six_bytes_of_the_identifier_hash():
    k = oscore.kid(b"88.123.99/PUMP-0001-ABCD")
    eq(len(k), 6)
    ok(k != oscore.kid(b"88.123.99/PUMP-0001-ABCE"))


def test_cost_of_protect_and_unprotect():
    key = bytes(range(16))
    c = oscore.Context(key, oscore.kid(b"88.123.99/PUMP-0001-ABCD"), b"")
    plain = h("4201 1234 beef b172 09 38382e3132332e3939 0d01 50554d502d303030312d41424344")
    out = bytearray(128)
    gc.collect()
    before = gc.mem_alloc()
    n, _ = c.protect(plain, len(plain), out)
    used = gc.mem_alloc() - before
    note(
        "resolve request, 24-char identifier:",
        len(plain),
        "bytes plain,",
        n,
        "bytes OSCORE (+%d)" % (n - len(plain)),
    )
    note("protect heap:", used, "bytes")
    N = 200
    t0 = time.ticks_us()
    for _ in range(N):
        c.protect(plain, len(plain), out)
    dt = time.ticks_diff(time.ticks_us(), t0) / N
    note("protect a %d-byte request on the unix port: %.0f us" % (len(plain), dt))
    # a 2.05 answer of ~120 bytes protected as the gateway would (request nonce reused): decrypt cost
    g = oscore.Context(key, b"", oscore.kid(b"88.123.99/PUMP-0001-ABCD"))
    inner = bytearray(128)
    inner[0] = 0x45
    pl = 120
    piv = bytearray(5)
    pn = oscore._put_piv(piv, c.seq - 1)
    resp = bytearray(200)
    resp[0:8] = h("6244 1234 beef 90 ff")  # ACK 2.04, token, empty OSCORE option, marker
    k = g._snd.encrypt(
        g._mknonce(c.sid, piv, 0, pn), _req_aad(c.sid, piv[:pn]), inner, pl, memoryview(resp)[8:]
    )
    gc.collect()
    before = gc.mem_alloc()
    m, piv_, _ = c.unprotect(resp, 8 + k, c.seq - 1)
    used = gc.mem_alloc() - before
    eq((m, piv_), (pl, -1))
    t0 = time.ticks_us()
    for _ in range(N):
        c.unprotect(resp, 8 + k, c.seq - 1)
    dt = time.ticks_diff(time.ticks_us(), t0) / N
    note("unprotect a %d-byte response: %.0f us, heap %d bytes" % (8 + k, dt, used))


def test_retransmissions_repeat_the_protected_bytes():
    # every request is protected into one buffer the exchanges share, again at each retransmission with the
    # request's own sequence number (and Echo): the bytes on the wire are the first ones, the numbers not spent
    from carrier import identity
    from fwfakes import FakeHal, FakeSock, tmpdir, rmtree

    d = tmpdir("osc")
    try:
        ident = identity.parse({"id": "88.1/x", "coap": "coap://127.0.0.1", "key": "00" * 16, "secure": True})
        c = oscore.Client(ident, store=FakeHal(d))
        c.sock = FakeSock()
        c.now = 1000
        ok(c.resolve("88.1/x", lambda r: None))
        ok(c.report(b"\xa1\x02\x66\x38\x38\x2e\x31\x2f\x78", 1, 1, lambda *a: None))
        first = list(c.sock.tx)
        eq((len(first), c.ctx.seq), (2, 2))
        c.poll(1000 + 3001)  # past both first timeouts (2-3 s)
        eq(sorted(c.sock.tx[2:]), sorted(first), "retransmitted byte for byte")
        eq((c.retrans, c.ctx.seq), (2, 2), "no sequence number spent on a retransmission")
    finally:
        rmtree(d[:-1])
