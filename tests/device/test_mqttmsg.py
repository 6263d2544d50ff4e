# MQTT 3.1.1 packets (carrier/mqttmsg.py) against bytes written by hand from the OASIS spec, and the incremental
# reader fed whole, byte by byte and with oversized/malformed input.
from mptest import eq, raises
from carrier import mqttmsg


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
        eq(bytes(buf[: mqttmsg.varlen(buf, 0, n)]), h(want), str(n))


def test_connect_packets():
    buf = bytearray(128)
    n = mqttmsg.connect(buf, b"abc", 60)
    eq(bytes(buf[:n]), h("10 0f 0004 4d515454 04 02 003c 0003 616263"))
    n = mqttmsg.connect(buf, b"dev", 60, True, (b"w/t", b"\xa1\x18\x18\xf4", 1, True), b"u", b"pw")
    # flags: user 80 | password 40 | will retain 20 | will QoS 1 08 | will 04 | clean 02 = ee
    eq(
        bytes(buf[:n]),
        h("10 21 0004 4d515454 04 ee 003c 0003 646576 0003 772f74 0004 a11818f40001 75 0002 7077"),
    )


def test_publish_subscribe_puback_packets():
    buf = bytearray(64)
    eq(
        bytes(buf[: mqttmsg.publish(buf, b"a/b", b"hi", 1, False, False, 10)]),
        h("32 09 0003 612f62 000a 6869"),
    )
    eq(
        bytes(buf[: mqttmsg.publish(buf, b"a/b", b"hi", 1, False, True, 10)]),
        h("3a 09 0003 612f62 000a 6869"),
    )
    eq(bytes(buf[: mqttmsg.publish(buf, b"a/b", b"", 0, True)]), h("31 05 0003 612f62"))
    eq(mqttmsg.publish_size(b"a/b", b"hi", 1), 11)
    eq(
        bytes(buf[: mqttmsg.subscribe(buf, 1, [(b"a/b", 1), (b"c", 0)])]),
        h("82 0c 0001 0003 612f62 01 0001 63 00"),
    )
    eq(bytes(buf[: mqttmsg.puback(buf, 0x1234)]), h("40 02 1234"))


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
        r = mqttmsg.Reader(64)
        got = []
        for i in range(0, len(STREAM), step):
            c = STREAM[i : i + step]
            r.space()[: len(c)] = c
            r.added(len(c))
            got += _parse_all(r)
        eq(got, want, "step %d" % step)


def test_reader_skips_oversized_and_rejects_malformed():
    r = mqttmsg.Reader(16)
    big = h("30 14 0001 61") + b"x" * 17  # 22 bytes > 16
    data = big + h("d0 00")
    for i in range(len(data)):
        r.space()[:1] = data[i : i + 1]
        r.added(1)
        got = _parse_all(r)
        if got:
            eq(got, [(0xD0, b"")])
    eq(r.dropped, 1)
    eq(r.filled, 0)
    r = mqttmsg.Reader(16)
    r.space()[:6] = h("30 ff ff ff ff 01")
    r.added(6)
    raises(mqttmsg.MQTTError, r.next)
