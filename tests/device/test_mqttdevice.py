# The device protocol over MQTT (carrier/mqttdevice.py: topics, last will, resolve with tokens, the device
# cache and retries, reports and their acks, config, the MQTT password and client id) on a fake socket and clock.
from mptest import eq, ok
from fwfakes import FakeSock
from carrier import mqtt, mqttdevice, mqttmsg, devicemsg, cbor
from carrier import identity


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def _transport(ident="88.123.99/PUMP-0001", connack="20 02 00 00"):
    """A Transport on a fake socket that has just read the broker's CONNACK."""
    idt = identity.parse(
        {
            "id": ident,
            "transport": "mqtt",
            "mqtt": "mqtt://127.0.0.1",
            "key": "00112233445566778899aabbccddeeff",
        }
    )
    t = mqttdevice.Transport(idt, keepalive=30)
    t.client.sock = FakeSock()
    t.client.state = mqtt.WAIT_CONNACK
    t.session.enabled = True
    t.client.sock.rx.append(h(connack))
    t.poll(0)
    return t


def _pubs(t):
    """Decode the PUBLISH packets the client wrote: [(topic, payload, qos, retain)]."""
    data = b"".join(t.client.sock.tx)
    t.client.sock.tx.clear()
    r = mqttmsg.Reader(2048)
    r.space()[: len(data)] = data
    r.added(len(data))
    out = []
    while r.next():
        b0 = r.buf[0]
        if b0 >> 4 == mqttmsg.PUBLISH:
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
        elif b0 >> 4 == mqttmsg.SUBSCRIBE:
            out.append(("SUBSCRIBE", bytes(r.buf[r.pos : r.pos + r.len]), 1, 0))
        r.consume()
    return out


def test_transport_connect_status_and_subscriptions():
    t = _transport()
    eq(t.client.will[0], b"ida/v1/d/88.123.99%2FPUMP-0001/status")
    eq(cbor.loads(t.client.will[1]), {2: "88.123.99/PUMP-0001", 24: False})
    eq((t.client.will[2], t.client.will[3]), (1, True))
    eq(t.client.user, b"88.123.99%2FPUMP-0001")
    pubs = _pubs(t)
    eq(pubs[0][0], "ida/v1/d/88.123.99%2FPUMP-0001/status")
    eq(cbor.loads(pubs[0][1]), {2: "88.123.99/PUMP-0001", 24: True})
    eq(pubs[0][2:], (1, 1), "QoS 1, retained")
    eq(pubs[1][0], "SUBSCRIBE")
    for s in (b"/res\x01", b"/ack\x01", b"/cfg\x01"):
        ok(s in pubs[1][1])


def _deliver(t, topic, payload, qos=0, pid=1):
    buf = bytearray(1024)
    n = mqttmsg.publish(
        buf, ("ida/v1/d/88.123.99%2FPUMP-0001/" + topic).encode(), payload, qos, False, False, pid
    )
    t.client.sock.rx.append(bytes(buf[:n]))
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
    t.poll(t.now + mqttdevice.RESOLVE_WAIT + 1)
    second = _req(t)[0]
    ok(first[1] != second[1], "retried with a new token")
    t.poll(t.now + mqttdevice.RESOLVE_WAIT + 1)
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
    ok(h("40 02 0009") in t.client.sock.tx, "PUBACK for the QoS 1 ack")
    cfgs = []
    t.on_config = cfgs.append
    _deliver(t, "cfg", cbor.dumps({20: 3, 21: 30}), 1, 10)
    _deliver(t, "cfg", b"", 1, 11)  # cleared: ignored
    eq(cfgs, [cbor.dumps({20: 3, 21: 30})])
    ok(t.report(b"\xa0", 2, 2, cb))
    t.poll(t.now + mqttdevice.REPORT_WAIT + 1)
    eq(acks[-1], (devicemsg.NO_RESPONSE, 2, 2))


def test_password_is_derived_not_the_key():
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    pw = mqtt.password(key)
    eq(len(pw), 32)
    ok(key.hex().encode() not in pw)
    import hashlib

    eq(pw, hashlib.sha256(b"ida/mqtt/password/v1" + key).digest()[:16].hex().encode())
    t = _transport()
    eq(t.client.pwd, pw)


def test_client_id_cut_to_23_bytes_when_rejected():
    t = _transport()
    eq(t.client.cid, b"88.123.99%2FPUMP-0001")  # 21 bytes: fine
    t = _transport("88.123.99/A-RATHER-LONG-DEVICE-NAME", "20 02 00 02")  # identifier rejected
    eq(t.client.state, mqtt.IDLE)
    eq(t.client.cid, b"88.123.99%2FA-RATHER-LO")
