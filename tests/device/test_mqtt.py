# MQTT 3.1.1: packets against bytes written by hand from the OASIS spec, the incremental reader fed whole,
# byte by byte and with oversized/malformed input, the client against a fake socket and clock (QoS 1
# resend with DUP, PUBACK of inbound QoS 1, keepalive and dead-broker detection), the reconnect backoff,
# and a real loopback TCP connection in-process. The broker-backed tests are tests/integration/test_firmware_mqtt.py.
import socket
import select
from mptest import eq, ok, raises, note
from fwfakes import FakeSock
from carrier import mqtt, devicemsg, cbor
from carrier.identity import Identity


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def test_remaining_length_table():
    # MQTT 3.1.1 section 2.2.3, Table 2.4
    for n, want in (
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16383, "ff7f"),
        (16384, "808001"),
        (2097151, "ffff7f"),
        (2097152, "80808001"),
        (268435455, "ffffff7f"),
    ):
        buf = bytearray(4)
        eq(bytes(buf[: mqtt.varlen(buf, 0, n)]), h(want), str(n))


def test_connect_packets():
    buf = bytearray(128)
    n = mqtt.connect(buf, b"abc", 60)
    eq(bytes(buf[:n]), h("10 0f 0004 4d515454 04 02 003c 0003 616263"))
    n = mqtt.connect(buf, b"dev", 60, True, (b"w/t", b"\xa1\x18\x18\xf4", 1, True), b"u", b"pw")
    # flags: user 80 | password 40 | will retain 20 | will QoS 1 08 | will 04 | clean 02 = ee
    eq(
        bytes(buf[:n]),
        h("10 21 0004 4d515454 04 ee 003c 0003 646576 0003 772f74 0004 a11818f40001 75 0002 7077"),
    )


def test_publish_subscribe_puback_packets():
    buf = bytearray(64)
    eq(bytes(buf[: mqtt.publish(buf, b"a/b", b"hi", 1, False, False, 10)]), h("32 09 0003 612f62 000a 6869"))
    eq(bytes(buf[: mqtt.publish(buf, b"a/b", b"hi", 1, False, True, 10)]), h("3a 09 0003 612f62 000a 6869"))
    eq(bytes(buf[: mqtt.publish(buf, b"a/b", b"", 0, True)]), h("31 05 0003 612f62"))
    eq(mqtt.publish_size(b"a/b", b"hi", 1), 11)
    eq(
        bytes(buf[: mqtt.subscribe(buf, 1, [(b"a/b", 1), (b"c", 0)])]),
        h("82 0c 0001 0003 612f62 01 0001 63 00"),
    )
    eq(bytes(buf[: mqtt.puback(buf, 0x1234)]), h("40 02 1234"))


STREAM = h("20 02 00 00") + h("30 07 0003 612f62 7879") + h("d0 00") + h("32 09 0003 612f62 0007 6869")


def _parse_all(r):
    got = []
    while r.next():
        got.append((r.buf[0], bytes(r.buf[r.pos : r.pos + r.len])))
        r.consume()
    return got


def test_reader_whole_and_byte_by_byte():
    want = [(0x20, h("0000")), (0x30, h("0003612f627879")), (0xD0, b""), (0x32, h("0003612f6200076869"))]
    for step in (len(STREAM), 1, 3):
        r = mqtt.Reader(64)
        got = []
        for i in range(0, len(STREAM), step):
            c = STREAM[i : i + step]
            r.space()[: len(c)] = c
            r.added(len(c))
            got += _parse_all(r)
        eq(got, want, "step %d" % step)


def test_reader_skips_oversized_and_rejects_malformed():
    r = mqtt.Reader(16)
    big = h("30 14 0001 61") + b"x" * 17  # 22 bytes > 16
    data = big + h("d0 00")
    for i in range(len(data)):
        r.space()[:1] = data[i : i + 1]
        r.added(1)
        got = _parse_all(r)
        if got:
            eq(got, [(0xD0, b"")])
    eq(r.dropped, 1)
    eq(r.n, 0)
    r = mqtt.Reader(16)
    r.space()[:6] = h("30 ff ff ff ff 01")
    r.added(6)
    raises(mqtt.MQTTError, r.next)


def _up(keepalive=10, retry=5000):
    c = mqtt.Client(b"dev", keepalive, retry_ms=retry)
    c.sock = FakeSock()
    c.state = mqtt.WAIT_CONNACK
    c.sock.rx.append(h("20 02 00 00"))
    c.poll(0)
    eq(c.state, mqtt.UP)
    return c


def test_qos1_resend_with_dup_until_puback():
    c = _up(keepalive=30)
    acks = []
    c.on_puback = acks.append
    pid = c.publish(b"a/b", b"hi", 1, False, 0)
    eq(pid, 1)
    c.poll(0)
    eq(c.sock.tx, [h("32 09 0003 612f62 0001 6869")])
    c.sock.tx.clear()
    c.poll(4999)
    eq(c.sock.tx, [])
    c.poll(5000)
    eq(c.sock.tx, [h("3a 09 0003 612f62 0001 6869")], "resent with DUP")
    c.sock.rx.append(h("40 02 0001"))
    c.poll(5100)
    eq((acks, c.inflight()), ([1], 0))
    c.sock.tx.clear()
    c.poll(20000)
    ok(h("3a 09 0003 612f62 0001 6869") not in c.sock.tx, "no resend after PUBACK")


def test_window_and_output_buffer_bound():
    c = _up()
    pids = [c.publish(b"t", b"x", 1, False, 0) for _ in range(mqtt.INFLIGHT + 1)]
    eq(pids[-1], -1, "in-flight window full")
    eq(c.publish(b"t", b"x" * 2000, 0), -1, "larger than the output buffer")


def test_inbound_qos1_gets_puback():
    c = _up()
    got = []
    c.on_msg = lambda t, p, r: got.append((bytes(t), bytes(p), r))
    c.sock.rx.append(h("33 09 0003 612f62 0007 6869"))  # QoS 1, retained
    c.poll(100)
    eq(got, [(b"a/b", b"hi", 1)])
    eq(c.sock.tx, [h("40 02 0007")])


def test_keepalive_ping_and_dead_broker():
    c = _up(keepalive=10)
    c.poll(4999)
    eq(c.sock.tx, [])
    c.poll(5000)
    eq(c.sock.tx, [h("c0 00")], "PINGREQ after keepalive/2 idle")
    c.sock.rx.append(h("d0 00"))
    c.poll(6000)
    eq(c.state, mqtt.UP)
    c.sock.tx.clear()
    c.poll(11000)
    eq(c.sock.tx, [h("c0 00")])
    c.poll(16001)  # no PINGRESP within keepalive/2
    eq(c.state, mqtt.IDLE)
    ok("PINGREQ" in c.reason, c.reason)


def test_refusal_eof_and_garbage_close_the_connection():
    c = mqtt.Client(b"dev", 10)
    c.sock = FakeSock()
    c.state = mqtt.WAIT_CONNACK
    c.sock.rx.append(h("20 02 00 05"))
    c.poll(0)
    eq((c.state, c.refused), (mqtt.IDLE, 5))
    c = _up()
    c.sock.rx.append(b"")
    c.poll(10)
    eq(c.state, mqtt.IDLE)
    ok("closed" in c.reason)
    c = _up()
    c.sock.rx.append(h("f0 00"))  # reserved packet type
    c.poll(10)
    eq(c.state, mqtt.IDLE)
    c = _up()
    c.sock.rx.append(OSError(104))
    c.poll(10)
    eq(c.state, mqtt.IDLE)
    ok("104" in c.reason)


class _Refusing:
    state = mqtt.IDLE
    reason = None

    def __init__(self):
        self.opens = []

    def open(self, addr, now):
        self.opens.append(now)
        raise OSError(111)

    def poll(self, now):
        pass


def test_session_backoff_with_jitter():
    c = _Refusing()
    s = mqtt.Session(c, "127.0.0.1", 1)
    s.start(0)
    now = 0
    while len(c.opens) < 9:
        s.poll(now)
        now += 10
    gaps = [c.opens[i] - c.opens[i - 1] for i in range(1, len(c.opens))]
    b = mqtt.BACKOFF_MIN
    for g in gaps:
        ok(b // 2 <= g <= b + 10, "gap %d within [%d, %d]" % (g, b // 2, b))
        b = min(b * 2, mqtt.BACKOFF_MAX)
    note("reconnect gaps (ms):", gaps)


def test_loopback_connect_subscribe_publish():
    # MicroPython has no getsockname(): take the first free port of a range
    for port in range(47100, 47200):
        srv = socket.socket()
        try:
            srv.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
            break
        except OSError:
            srv.close()
    srv.listen(1)
    c = mqtt.Client(b"dev", 30)
    up = []
    s = mqtt.Session(c, "127.0.0.1", port, lambda now: up.append(now))
    s.start(0)
    s.poll(0)
    conn, _ = srv.accept()
    p = select.poll()
    p.register(conn, select.POLLIN)
    for i in range(50):
        s.poll(i)
        if p.poll(10):
            break
    data = conn.recv(100)
    eq(data, h("10 0f 0004 4d515454 04 02 001e 0003 646576"))
    conn.send(h("20 02 00 00"))
    for i in range(50, 100):
        s.poll(i)
        if up:
            break
    eq(c.state, mqtt.UP)
    eq(len(up), 1)
    c.publish(b"x", b"y", 0, False, 100)
    s.poll(101)
    p.poll(1000)
    eq(conn.recv(100), h("30 04 0001 78 79"))
    conn.close()
    for i in range(200, 300):
        s.poll(i)
        if c.state == mqtt.IDLE:
            break
    eq(c.state, mqtt.IDLE, "broker closed")
    srv.close()


# ---- the device protocol ------------------------------------------------------------------------------
def _transport():
    idt = Identity(
        {
            "id": "88.123.99/PUMP-0001",
            "transport": "mqtt",
            "mqtt": "mqtt://127.0.0.1",
            "key": "00112233445566778899aabbccddeeff",
        }
    )
    t = mqtt.Transport(idt, keepalive=30)
    t.c.sock = FakeSock()
    t.c.state = mqtt.WAIT_CONNACK
    t.s.enabled = True
    t.c.sock.rx.append(h("20 02 00 00"))
    t.poll(0)
    return t


def _pubs(t):
    """Decode the PUBLISH packets the client wrote: [(topic, payload, qos, retain)]."""
    data = b"".join(t.c.sock.tx)
    t.c.sock.tx.clear()
    r = mqtt.Reader(2048)
    r.space()[: len(data)] = data
    r.added(len(data))
    out = []
    while r.next():
        b0 = r.buf[0]
        if b0 >> 4 == mqtt.PUBLISH:
            p = r.pos
            tl = (r.buf[p] << 8) | r.buf[p + 1]
            q = (b0 >> 1) & 3
            out.append(
                (
                    bytes(r.buf[p + 2 : p + 2 + tl]).decode(),
                    bytes(r.buf[p + 2 + tl + (2 if q else 0) : p + r.len]),
                    q,
                    b0 & 1,
                )
            )
        elif b0 >> 4 == mqtt.SUBSCRIBE:
            out.append(("SUBSCRIBE", bytes(r.buf[r.pos : r.pos + r.len]), 1, 0))
        r.consume()
    return out


def test_transport_connect_status_and_subscriptions():
    t = _transport()
    eq(t.c.will[0], b"ida/v1/d/88.123.99%2FPUMP-0001/status")
    eq(cbor.loads(t.c.will[1]), {2: "88.123.99/PUMP-0001", 24: False})
    eq((t.c.will[2], t.c.will[3]), (1, True))
    eq(t.c.user, b"88.123.99%2FPUMP-0001")
    pubs = _pubs(t)
    eq(pubs[0][0], "ida/v1/d/88.123.99%2FPUMP-0001/status")
    eq(cbor.loads(pubs[0][1]), {2: "88.123.99/PUMP-0001", 24: True})
    eq(pubs[0][2:], (1, 1), "QoS 1, retained")
    eq(pubs[1][0], "SUBSCRIBE")
    for s in (b"/res\x01", b"/ack\x01", b"/cfg\x01"):
        ok(s in pubs[1][1])


def _deliver(t, topic, payload, qos=0, pid=1):
    buf = bytearray(1024)
    n = mqtt.publish(
        buf, ("ida/v1/d/88.123.99%2FPUMP-0001/" + topic).encode(), payload, qos, False, False, pid
    )
    t.c.sock.rx.append(bytes(buf[:n]))
    t.poll(t.now + 1)


def _req(t):
    """The resolve requests published since the last look (the unacknowledged status may be resent)."""
    return [devicemsg.decode("resolve_request", p[1]) for p in _pubs(t) if p[0].endswith("/req")]


def test_transport_resolve_with_token_cache_and_retry():
    t = _transport()
    _pubs(t)
    got = []
    ok(t.resolve("88.1/X", got.append))
    ((topic, payload, q, _r),) = _pubs(t)
    eq((topic, q), ("ida/v1/d/88.123.99%2FPUMP-0001/req", 0))
    req = devicemsg.decode("resolve_request", payload)
    _deliver(t, "res", cbor.dumps({1: b"zz", 3: 1, 2: "88.1/X", 4: [], 5: 60, 6: b"e1"}))
    eq(got, [], "another request's token")
    _deliver(
        t, "res", cbor.dumps({1: req[1], 3: 1, 2: "88.1/X", 4: [[1, "URL", "u", 5]], 5: 60, 6: b"e1", 23: 2})
    )
    eq(got, [(1, "88.1/X", [[1, "URL", "u", 5]], 2, None)])
    ok(t.resolve("88.1/X", got.append))
    eq(got[1][3], -1, "device cache")
    eq(_pubs(t), [])
    ok(t.resolve("88.1/Y", got.append))
    first = _req(t)[0]
    t.poll(t.now + mqtt.RESOLVE_WAIT + 1)
    second = _req(t)[0]
    ok(first[1] != second[1], "retried with a new token")
    t.poll(t.now + mqtt.RESOLVE_WAIT + 1)
    eq(got[2][0], devicemsg.NO_RESPONSE)
    ok(t.resolve("88.1/Z", got.append))
    tok = _req(t)[0][1]
    _deliver(t, "res", cbor.dumps({1: tok, 3: 100, 9: "handle not found", 5: 30}))
    eq(got[3], (100, "88.1/Z", None, 0, "handle not found"))


def test_transport_report_ack_and_config():
    t = _transport()
    _pubs(t)
    acks = []
    cb = lambda code, b, s: acks.append((code, b, s))
    ok(t.report(b"\xa0", 2, 1, cb))
    ok(not t.report(b"\xa0", 2, 2, cb), "one report at a time")
    ((topic, payload, q, r),) = _pubs(t)
    eq((topic[-3:], payload, q, r), ("rpt", b"\xa0", 1, 0))
    _deliver(t, "ack", cbor.dumps({10: 2, 11: 1, 3: 1}), 1, 9)
    eq(acks, [(1, 2, 1)])
    ok(h("40 02 0009") in t.c.sock.tx, "PUBACK for the QoS 1 ack")
    cfgs = []
    t.on_config = cfgs.append
    _deliver(t, "cfg", cbor.dumps({20: 3, 21: 30}), 1, 10)
    _deliver(t, "cfg", b"", 1, 11)  # cleared: ignored
    eq(cfgs, [cbor.dumps({20: 3, 21: 30})])
    ok(t.report(b"\xa0", 2, 2, cb))
    t.poll(t.now + mqtt.REPORT_WAIT + 1)
    eq(acks[-1], (devicemsg.NO_RESPONSE, 2, 2))


def test_password_is_derived_not_the_key():
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    pw = mqtt.password(key)
    eq(len(pw), 32)
    ok(key.hex().encode() not in pw)
    import hashlib

    eq(pw, hashlib.sha256(b"ida/mqtt/password/v1" + key).digest()[:16].hex().encode())
    t = _transport()
    eq(t.c.pwd, pw)


def test_client_id_cut_to_23_bytes_when_rejected():
    t = _transport()
    eq(t.c.cid, b"88.123.99%2FPUMP-0001")  # 21 bytes: fine
    idt = Identity(
        {
            "id": "88.123.99/A-RATHER-LONG-DEVICE-NAME",
            "transport": "mqtt",
            "mqtt": "mqtt://127.0.0.1",
            "key": "00112233445566778899aabbccddeeff",
        }
    )
    t = mqtt.Transport(idt, keepalive=30)
    t.c.sock = FakeSock()
    t.c.state = mqtt.WAIT_CONNACK
    t.s.enabled = True
    t.c.sock.rx.append(h("20 02 00 02"))  # identifier rejected
    t.poll(0)
    eq(t.c.state, mqtt.IDLE)
    eq(t.c.cid, b"88.123.99%2FA-RATHER-LO")
