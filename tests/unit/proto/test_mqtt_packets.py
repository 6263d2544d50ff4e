"""The MQTT codec (proto/mqtt), 3.1.1 and v5: what it builds is checked byte for byte against paho's own encoder
and by hand; the incremental reader is fed whole, in every split, byte by byte and with trailing data; and it is
fuzzed: any bytes give packets or MqttProtocolError, nothing else."""

from __future__ import annotations

import doctest
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from proto import mqtt
from proto.mqtt import decode, encode, numbers, reader
from proto.mqtt.errors import MqttProtocolError
from proto.mqtt.reader import Reader

V311, V5 = mqtt.MQTT311, mqtt.MQTT5
PAHO = {V311: paho.MQTTv311, V5: paho.MQTTv5}


def test_doctests() -> None:
    for module in (encode, decode, reader, numbers):
        assert doctest.testmod(module).failed == 0


def paho_sent(version: int, act: Callable[[paho.Client], Any], **client: Any) -> list[bytes]:
    """The packets paho's encoder builds for ``act(client)`` (its send queue intercepted; no socket)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=PAHO[version], **client)
    sent: list[bytes] = []

    def queue(command: int, packet: bytes, mid: int, qos: int, info: Any = None) -> MQTTErrorCode:
        sent.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    c._packet_queue = queue  # type: ignore[method-assign]
    c._sock = object()  # type: ignore[assignment]  # _send_publish refuses to queue without one
    try:
        act(c)
    finally:
        c._sock = None
    return sent


# -- building, against paho -------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("with_will", [False, True])
@pytest.mark.parametrize("login", [None, ("dev-1", None), ("gw-1", "s3cret")])
def test_connect_is_pahos(version: int, with_will: bool, login: tuple[str, str | None] | None) -> None:
    def act(c: paho.Client) -> None:
        if login is not None:
            c.username_pw_set(*login)
        if with_will:
            c.will_set("ida/v1/d/x/status", b"\xa1\x01\xf4", qos=1, retain=True)
        c._send_connect(45)

    kw = {"client_id": "c-1"} if version == V5 else {"client_id": "c-1", "clean_session": True}
    user, password = login or (None, None)
    will = ("ida/v1/d/x/status", b"\xa1\x01\xf4", 1, True) if with_will else None
    ours = mqtt.connect("c-1", 45, version=version, will=will, username=user, password=password)
    assert [ours] == paho_sent(version, act, **kw)


def test_connect_maximum_packet_size_is_pahos() -> None:
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = 65536

    def act(c: paho.Client) -> None:
        c.username_pw_set("u", "p")
        c._connect_properties = props
        c._send_connect(30)

    ours = mqtt.connect("c1", 30, version=V5, username="u", password="p", max_packet=65536)
    assert [ours] == paho_sent(V5, act, client_id="c1")


@pytest.mark.parametrize("version", [V311, V5])
def test_subscribe_unsubscribe_are_pahos(version: int) -> None:
    filters = [("ida/v1/d/+/req", 0), ("a/#", 1), ("$share/g/x", 2)]
    options: list[tuple[bytes, Any]] = [
        (t.encode(), SubscribeOptions(qos=q) if version == V5 else q) for t, q in filters
    ]
    theirs = paho_sent(
        version, lambda c: (c._send_subscribe(False, options), c._send_unsubscribe(False, [b"a/#"]))
    )
    # paho numbers its packets 1, 2, ...
    assert theirs == [
        mqtt.subscribe(1, filters, version=version),
        mqtt.unsubscribe(2, ["a/#"], version=version),
    ]


@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("size", [0, 5, 200, 20000])
def test_publish_is_pahos(version: int, qos: int, retain: bool, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    topic = "ida/v1/d/88.123.99%2FPUMP-0001/res"
    theirs = paho_sent(version, lambda c: c._send_publish(513, topic.encode(), payload, qos, retain))
    ours = mqtt.publish(topic, payload, version=version, qos=qos, retain=retain, packet_id=513)
    assert [ours] == theirs
    if not qos and not retain:
        assert mqtt.publish_head(topic.encode(), size, version=version) + payload == ours


@pytest.mark.parametrize("version", [V311, V5])
def test_puback_pingreq_disconnect_are_pahos(version: int) -> None:
    theirs = paho_sent(version, lambda c: (c._send_puback(0x1234), c._send_pingreq(), c._send_disconnect()))
    assert theirs == [mqtt.puback(0x1234), mqtt.PINGREQ_BYTES, mqtt.DISCONNECT_BYTES]


# -- building, by hand ------------------------------------------------------------------------------------------
def test_connect_by_hand() -> None:
    pkt = mqtt.connect("c1", 30, version=V5, username="u", password="p", max_packet=65536)
    props = b"\x05\x27\x00\x01\x00\x00"
    body = b"\x00\x04MQTT\x05\xc2\x00\x1e" + props + b"\x00\x02c1\x00\x01u\x00\x01p"
    assert pkt == bytes((0x10, len(body))) + body
    assert mqtt.connect("c", 0, version=V5)[9] == 0x02  # no credentials: clean start only
    con = mqtt.connect("dev", 60, version=V311, will=("ida/v1/d/x/status", b"off", 1, True))
    assert con[2:11] == b"\x00\x04MQTT\x04\x2e\x00"  # clean session, will at QoS 1 retained; keepalive
    assert con.endswith(b"\x00\x03dev\x00\x11ida/v1/d/x/status\x00\x03off")
    for bad in (
        lambda: mqtt.connect("c", 70000, version=V5),
        lambda: mqtt.connect("c", 1, version=3),
        lambda: mqtt.connect("c", 1, version=V311, password="p"),
        lambda: mqtt.connect("c", 1, version=V311, max_packet=100),
        lambda: mqtt.connect("c", 1, version=V5, will=("t", b"", 3, False)),
    ):
        with pytest.raises(ValueError):
            bad()


def test_subscribe_unsubscribe_publish_puback_by_hand() -> None:
    assert mqtt.subscribe(7, [("a/+", 0)], version=V5) == b"\x82\x09\x00\x07\x00\x00\x03a/+\x00"
    assert mqtt.subscribe(7, [("a/+", 1)], version=V311) == b"\x82\x08\x00\x07\x00\x03a/+\x01"
    assert mqtt.unsubscribe(7, ["a/+"], version=V5) == b"\xa2\x08\x00\x07\x00\x00\x03a/+"
    assert mqtt.unsubscribe(7, ["a/+"], version=V311) == b"\xa2\x07\x00\x07\x00\x03a/+"
    assert mqtt.publish(b"t", b"xy", version=V5) == b"\x30\x06\x00\x01t\x00xy"
    assert mqtt.publish("t", b"xy", version=V311) == b"\x30\x05\x00\x01txy"
    big = mqtt.publish(b"t", b"z" * 200, version=V5)
    assert big[:3] == b"\x30\xcc\x01" and len(big) == 3 + 204  # two-byte remaining length
    assert mqtt.puback(0x1234) == b"\x40\x02\x12\x34"
    assert mqtt.publish_topic(b"a/res", version=V5) == b"\x00\x05a/res\x00"
    for bad in (
        lambda: mqtt.subscribe(0, [("a", 0)], version=V5),  # packet identifier 0
        lambda: mqtt.subscribe(1, [], version=V5),
        lambda: mqtt.subscribe(1, [("a", 3)], version=V5),
        lambda: mqtt.unsubscribe(1, [], version=V311),
        lambda: mqtt.publish("t", b"", version=V5, qos=1),  # QoS 1 without a packet identifier
        lambda: mqtt.publish("t", b"", version=V5, qos=3, packet_id=1),
        lambda: mqtt.publish("t" * 70000, b"", version=V5),
        lambda: mqtt.puback(0x10000),
    ):
        with pytest.raises(ValueError):
            bad()


def test_fixed_headers_are_encoded_once_and_bounded() -> None:
    heads = mqtt.FixedHeaders(0x30, limit=3)
    assert heads[5] == b"\x30\x05" and heads[200] == b"\x30\xc8\x01" and heads[5] is heads[5]
    heads[6], heads[7]  # noqa: B018
    assert len(heads) <= 3 and heads[200] == b"\x30\xc8\x01"


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455])
def test_varlen_round_trip(n: int) -> None:
    enc = mqtt.varlen(n)
    assert len(enc) == 1 + (n >= 128) + (n >= 16384) + (n >= 2097152)
    assert mqtt.read_varint(enc, 0) == (n, len(enc))


def test_varlen_out_of_range() -> None:
    for n in (-1, 268435456):
        with pytest.raises(ValueError):
            mqtt.varlen(n)


# -- reading bodies ---------------------------------------------------------------------------------------------
def test_connack_suback_disconnect() -> None:
    props = Properties(PacketTypes.CONNACK)
    props.ServerKeepAlive = 15
    props.AssignedClientIdentifier = "auto-1"
    present, code, got = mqtt.parse_connack(b"\x01\x00" + props.pack(), version=V5)
    assert present and code == 0 and got[0x13] == 15 and got[0x12] == b"auto-1"
    assert mqtt.parse_connack(b"\x00\x04", version=V311) == (False, 4, {})
    assert mqtt.reason(4, V311) == "bad user name or password"
    assert mqtt.parse_suback(b"\x00\x07\x00\x00\x80", version=V5) == (7, [0, 0x80])
    assert mqtt.parse_suback(b"\x00\x07\x01\x80", version=V311) == (7, [1, 0x80])
    assert mqtt.parse_suback(b"\x00\x07", version=V311) == (7, [])  # a 3.1.1 UNSUBACK
    dprops = Properties(PacketTypes.DISCONNECT)
    dprops.ReasonString = "bye now"
    assert mqtt.parse_disconnect(b"\x8b" + dprops.pack()) == (0x8B, "bye now")
    assert mqtt.parse_disconnect(b"") == (0, "")
    assert mqtt.reason(0x86) == "bad user name or password" and mqtt.reason(0x7F) == "0x7f"
    for body, version in ((b"\x00", V311), (b"\x00\x00\x00", V311), (b"\x00\x00", V5)):
        with pytest.raises(MqttProtocolError):
            mqtt.parse_connack(body, version=version)
    with pytest.raises(MqttProtocolError):
        mqtt.parse_suback(b"\x00\x07", version=V5)


def test_publish_with_properties_and_qos1() -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("k", "v")
    props.MessageExpiryInterval = 60
    p = props.pack()
    body = b"\x00\x03a/b" + b"\x00\x09" + p + b"payload"
    assert mqtt.parse_publish(0x32, body, version=V5) == (b"a/b", b"payload", 9)
    assert mqtt.parse_publish(0x30, b"\x00\x03a/b\x00", version=V5) == (b"a/b", b"", 0)
    assert mqtt.parse_publish(0x33, b"\x00\x03a/b\x00\x09xy", version=V311) == (b"a/b", b"xy", 9)
    assert mqtt.parse_publish(0x30, b"\x00\x03a/b", version=V311) == (b"a/b", b"", 0)
    for bad in (b"\x00\x03a/b", b"\x00", b"\x00\x03a/b\x05\x01"):
        with pytest.raises(MqttProtocolError):
            mqtt.parse_publish(0x30, bad, version=V5)
    for first, bad in ((0x30, b"\x00\x05a/b"), (0x32, b"\x00\x03a/b\x00"), (0x32, b"\x00\x01a\x00\x00")):
        with pytest.raises(MqttProtocolError):  # topic past the end, half a packet id, packet id 0
            mqtt.parse_publish(first, bad, version=V311)
    with pytest.raises(MqttProtocolError):
        mqtt.parse_publish(0x36, b"\x00\x01a\x00\x01\x00", version=V5)  # QoS 3


def test_unknown_property_is_a_protocol_error() -> None:
    with pytest.raises(MqttProtocolError, match="unknown property"):
        mqtt.parse_connack(b"\x00\x00\x02\x7f\x00", version=V5)
    with pytest.raises(MqttProtocolError):
        mqtt.parse_connack(b"\x00\x00\x05\x13\x00", version=V5)  # properties longer than the packet
    with pytest.raises(MqttProtocolError, match="no value"):
        mqtt.parse_connack(b"\x00\x00\x01\x01", version=V5)  # a property without its value


# -- the reader -------------------------------------------------------------------------------------------------
STREAM = (
    mqtt.publish(b"x/y", b"1" * 300, version=V5)
    + mqtt.PINGRESP_BYTES
    + mqtt.publish(b"z", b"", version=V311, qos=1, packet_id=3)
    + b"\x90\x04\x00\x01\x00\x00"
)
WHOLE = [
    (0x30, b"\x00\x03x/y\x00" + b"1" * 300),
    (0xD0, b""),
    (0x32, b"\x00\x01z\x00\x03"),
    (0x90, b"\x00\x01\x00\x00"),
]


def test_reader_whole_every_split_and_byte_by_byte() -> None:
    assert Reader(1 << 16).feed(STREAM) == WHOLE
    for cut in range(len(STREAM) + 1):
        r = Reader(1 << 16)
        assert r.feed(STREAM[:cut]) + r.feed(STREAM[cut:]) == WHOLE and r.buffered == 0
    r = Reader(1 << 16)
    assert [p for b in STREAM for p in r.feed(bytes((b,)))] == WHOLE  # one byte at a time
    r = Reader(1 << 16)
    assert r.feed(bytearray(STREAM)) == WHOLE  # any bytes-like object


def test_reader_keeps_trailing_data() -> None:
    r = Reader(1 << 16)
    first = STREAM[: len(STREAM) - 3]  # the SUBACK cut short
    assert r.feed(first) == WHOLE[:3] and r.buffered == 3
    assert r.feed(STREAM[-3:] + STREAM[:10]) == WHOLE[3:] and r.buffered == 10  # and the start of the next
    assert r.feed(STREAM[10:]) == WHOLE and r.buffered == 0


def test_reader_refuses_oversized_overlong_and_type_0() -> None:
    with pytest.raises(MqttProtocolError, match="exceeds the maximum of 100"):
        Reader(100).feed(mqtt.publish(b"t", b"z" * 200, version=V5)[:3])  # as soon as the header says so
    assert Reader(100).feed(mqtt.publish(b"t", b"z" * 94, version=V5))  # 100 bytes in all
    with pytest.raises(MqttProtocolError, match="longer than 4 bytes"):
        Reader().feed(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(MqttProtocolError, match="type 0"):
        Reader().feed(b"\x00\x00")
    with pytest.raises(ValueError):
        Reader(1)


# -- fuzz -------------------------------------------------------------------------------------------------------
def _parse(first: int, body: bytes, version: int) -> None:
    kind = first >> 4
    if kind == mqtt.PUBLISH:
        mqtt.parse_publish(first, body, version=version)
    elif kind == mqtt.CONNACK:
        mqtt.parse_connack(body, version=version)
    elif kind in (mqtt.SUBACK, mqtt.UNSUBACK):
        mqtt.parse_suback(body, version=version)
    elif kind == mqtt.DISCONNECT:
        mqtt.parse_disconnect(body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.sampled_from([V311, V5]))
def test_fuzz_control_packet_bodies(body: bytes, version: int) -> None:
    for first in (0x20, 0x30, 0x32, 0x34, 0x36, 0x90, 0xB0, 0xE0):
        try:
            _parse(first, body, version)
        except MqttProtocolError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.sampled_from([V311, V5]))
def test_fuzz_reader_and_parsers(chunks: list[bytes], version: int) -> None:
    r = Reader(4096)
    try:
        packets = [p for c in chunks for p in r.feed(c)]
    except MqttProtocolError:
        return
    assert r.buffered <= 4096 + 4
    for first, body in packets:
        try:
            _parse(first, body, version)
        except MqttProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=1, max_size=40),
    st.binary(max_size=300),
    st.integers(0, 2),
    st.booleans(),
    st.integers(1, 0xFFFF),
    st.sampled_from([V311, V5]),
    st.integers(1, 7),
)
def test_fuzz_publish_round_trip(
    topic: bytes, payload: bytes, qos: int, retain: bool, pid: int, version: int, split: int
) -> None:
    pkt = mqtt.publish(topic, payload, version=version, qos=qos, retain=retain, packet_id=pid)
    r = Reader(1 << 16)
    got = [p for i in range(0, len(pkt), split) for p in r.feed(pkt[i : i + split])]
    [(first, body)] = got
    assert first >> 4 == mqtt.PUBLISH and (first >> 1) & 3 == qos and first & 1 == retain
    assert mqtt.parse_publish(first, body, version=version) == (topic, payload, pid if qos else 0)
