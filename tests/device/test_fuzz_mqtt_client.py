# Fuzzing the device's MQTT 3.1.1 code (carrier/mqttmsg.py, mqtt.py, mqttdevice.py) with what a broken or hostile broker can send:
# Reader.next raises only MQTTError and, fed a stream of packets cut at random points, returns every packet
# that fits exactly once and in order (oversized ones skipped and counted); Client/Transport.poll never raise;
# a well-framed PUBLISH, whatever its topic and payload, never costs the connection; every callback gets a
# well-formed result; the desired config handed on is applied by the real config.Config without an
# exception; afterwards a clean resolve still works. Seeded and bounded (fuzzlib.py).
from mptest import eq, ok, note
import fuzzlib as F
from fwfakes import FakeSock
from carrier import mqtt, mqttdevice, mqttmsg, cbor
from carrier import identity

ID = "88.123.99/PUMP-0001"
BASE = "ida/v1/d/88.123.99%2FPUMP-0001/"


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def _vl(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(b0, body):
    return bytes((b0,)) + _vl(len(body)) + body


def _publish(topic, payload, qos=0, retain=False, pid=1):
    body = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if qos else b"") + payload
    return _packet(0x30 | (qos << 1) | (1 if retain else 0), body)


def test_fuzz_reader_stream():
    F.seed("mqtt-reader")
    size = 64
    n_packets = n_dropped = 0
    for _ in range(F.rounds(80)):
        r = mqttmsg.Reader(size)
        want = []
        stream = b""
        for _ in range(1 + F.below(8)):
            body = F.rbytes(F.pick((0, 1, 5, size - 10, size, size + 40, 300)))
            p = _packet(F.pick((0x30, 0x32, 0x40, 0x90, 0xD0, 0x20)), body)
            if len(p) <= size:
                want.append((p[0], body))
            stream += p
        got = []
        pos = 0
        while pos < len(stream):
            k = 1 + F.below(20)
            sp = r.space()
            k = min(k, len(sp), len(stream) - pos)
            sp[:k] = stream[pos : pos + k]
            pos += k
            r.added(k)
            while r.next():
                got.append((r.buf[0], bytes(r.buf[r.pos : r.pos + r.len])))
                r.consume()
        eq(got, want, "stream " + stream.hex())
        eq(r.filled, 0)
        n_packets += len(want)
        n_dropped += r.dropped
    note(n_packets, "packets delivered,", n_dropped, "oversized skipped")


def test_fuzz_reader_garbage():
    F.seed("mqtt-garbage")
    n = 0
    for _ in range(F.rounds(1500)):
        r = mqttmsg.Reader(F.pick((16, 64, 1536)))
        data = F.rbytes(F.below(40)) if F.chance(2) else F.mutate(_publish(b"a/b", b"xyz", 1), ())
        pos = 0
        try:
            while pos < len(data):
                sp = r.space()
                k = min(1 + F.below(10), len(sp), len(data) - pos)
                if k <= 0:
                    break
                sp[:k] = data[pos : pos + k]
                pos += k
                r.added(k)
                while r.next():
                    ok(r.pos + r.len <= r.filled)
                    r.consume()
        except mqttmsg.MQTTError:
            pass
        except Exception as e:
            raise AssertionError("Reader raised %s: %s on %s" % (type(e).__name__, e, data.hex()))
        n += 1
    note(n, "garbage streams")


class Rig(F.ClientRig):
    def __init__(self):
        F.ClientRig.__init__(self, "fzm")
        idt = identity.parse({"id": ID, "transport": "mqtt", "mqtt": "mqtt://127.0.0.1", "key": "00" * 16})
        self.t = mqttdevice.Transport(idt, keepalive=30)
        self.t.on_config = self.on_config
        self.t.session.enabled = True
        self.now = 0
        self.reconnects = 0
        self.connect()

    def connect(self):
        c = self.t.client
        c.sock = FakeSock()
        c.state = mqtt.WAIT_CONNACK
        c._reader.reset()
        c._out_len = 0
        c.last_tx = c.last_rx = self.now
        c.sock.rx.append(h("20 02 00 00"))
        self.poll()
        eq(c.state, mqtt.UP)

    def poll(self, what=b""):
        try:
            self.t.poll(self.now)
        except Exception as e:
            raise AssertionError(
                "Transport.poll raised %s: %s after %s (seed %d)"
                % (type(e).__name__, e, bytes(what).hex(), F.SEED)
            )

    def reported(self, code, boot, seq):
        ok(
            type(code) is int and type(boot) is int and type(seq) is int,
            "report result %r" % ((code, boot, seq),),
        )
        self.keep(code)

    def tokens(self):
        return [r[0] for r in self.t._resolves]


def _payload(rig):
    k = F.below(6)
    if k == 0:
        return F.rbytes(F.below(30))
    name = F.pick(("resolve_response", "not_modified", "error", "report_ack", "config", "report_ack"))
    m = F.message(name)
    toks = rig.tokens()
    if toks and name in ("resolve_response", "not_modified", "error") and not F.chance(4):
        m[1] = F.pick(toks)
    if name == "report_ack" and rig.t._report and not F.chance(4):
        m[10], m[11] = rig.t._report[0], rig.t._report[1]
    try:
        d = cbor.dumps(m)
    except cbor.CBORError:
        d = b""
    return F.mutate(d) if k == 1 else d


def _topic():
    k = F.below(8)
    if k < 5:
        return (BASE + F.pick(("res", "ack", "cfg", "res", "ack"))).encode()
    if k == 5:
        return (BASE + F.pick(("req", "rpt", "xyz", "", "re"))).encode()
    if k == 6:
        return F.pick((b"", b"/", b"ida/v1/d/x/res", BASE.encode() + b"res/x", b"\xff\xfe/res"))
    return F.rbytes(F.below(len(BASE) + 6))


def test_fuzz_transport():
    F.seed("mqtt-transport")
    r = Rig()
    t = r.t
    try:
        framed = garbage = 0
        base = F.heap()
        for i in range(F.rounds(800)):
            if F.chance(3) and len(t._resolves) < 2:
                t.resolve(F.pick(("88.1/X", "88.1/Y", "0.NA/88.1")), r.resolved, F.pick((None, "URL")))
            if F.chance(5) and t._report is None:
                t.report(cbor.dumps({2: ID, 10: 3, 11: i}), 3, i, r.reported)
            c = t.client
            if F.chance(8):  # garbage on the stream: may cost the connection, never an exception
                d = F.rbytes(1 + F.below(20)) if F.chance(2) else F.mutate(_publish(_topic(), _payload(r), 1))
                c.sock.rx.append(d)
                r.poll(d)
                garbage += 1
            else:
                d = _publish(_topic(), _payload(r), F.below(2), F.chance(3), 1 + F.below(0xFFFF))
                c.sock.rx.append(d)
                r.poll(d)
                framed += 1
                eq(
                    c.state,
                    mqtt.UP,
                    "a well-framed PUBLISH closed the connection (%s): %s" % (c.reason, d.hex()),
                )
            if F.chance(15):
                r.now += F.pick((100, 5001, 30001))
                r.poll()
            if (
                c.state != mqtt.UP or c._reader.filled or c._reader.skip
            ):  # closed, or a partial packet left: the stream is out of step
                r.reconnects += 1
                r.connect()
            c.sock.tx.clear()
        note(
            framed,
            "framed and",
            garbage,
            "garbage packets;",
            r.nresults,
            "results,",
            r.configs,
            "configs,",
            r.reconnects,
            "reconnects",
        )
        # a clean resolve still works
        for _ in range(10):
            r.now += 10000
            r.poll()
            if t.client.state != mqtt.UP:
                r.connect()
        eq(t._resolves, [], "pending resolves at %d" % r.now)
        r.results = []
        t.cache.clear()
        ok(t.resolve("88.1/CLEAN", r.resolved))
        tok = t._resolves[0][0]
        t.client.sock.rx.append(
            _publish(
                (BASE + "res").encode(),
                cbor.dumps({1: tok, 3: 1, 2: "88.1/CLEAN", 4: [[1, "URL", "u", 5]], 5: 60, 23: 2}),
            )
        )
        r.poll()
        eq(r.results, [(1, "88.1/CLEAN", [[1, "URL", "u", 5]], 2, None)])
        r.check_heap(base, "transport")
    finally:
        r.close()


# -- findings -----------------------------------------------------------------------------------------------
def test_regression_float_key_in_report_ack_and_config():
    # fuzz finding (every seed, through the MQTT path): a report_ack {10: 2**64-1, 11: 22, 3.0: {}} on the ack
    # topic, or a config {20.0: {"0.NA/x": "\u0085"}} on cfg, raised TypeError out of Transport.poll (devicemsg.check
    # indexed its type table with the float key); the device app treats that as a crash and resets.
    r = Rig()
    try:
        got = []
        ok(r.t.report(b"\xa0", 22, 22, lambda *a: got.append(a)))
        for packet in (
            "333700226964612f76312f642f38382e3132332e393925324650554d502d303030312f61636b6da3"
            "a30a1bffffffffffffffff0b16f94200a0",
            "323600226964612f76312f642f38382e3132332e393925324650554d502d303030312f636667b68d"
            "a2106161f94d001b7fffffffffffffff",
            "323200226964612f76312f642f38382e3132332e393925324650554d502d303030312f61636bc58c"
            "a30a0a0b190100f9420018ff",
        ):
            r.t.client.sock.rx.append(h(packet))
            r.poll(h(packet))
            eq(r.t.client.state, mqtt.UP)
        eq(got, [], "a malformed ack acknowledges nothing")
        eq((r.configs, r.cfg.rejected), (1, 1))
        ok(r.t.errors >= 2)
    finally:
        r.close()
