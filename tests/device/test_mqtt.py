# MQTT client (carrier/mqtt.py) against a fake socket and clock (QoS 1 resend with DUP, PUBACK of inbound QoS 1,
# keepalive and dead-broker detection), the reconnect backoff, and a real loopback TCP connection in-process.
# The packets have their own tests (test_mqttmsg.py), the device protocol on top test_mqttdevice.py; the
# broker-backed tests are tests/integration/test_firmware_mqtt.py.
import socket
import select
from mptest import eq, ok, note
from fwfakes import FakeSock
from carrier import mqtt


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


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
