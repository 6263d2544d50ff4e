"""The MQTT v5 client codec (proto/mqtt/packets.py): packets checked against paho's encoder and by hand, the
incremental reader fed in every split, and fuzzed: any bytes give packets or MqttProtocolError, nothing else."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from proto.mqtt import packets as mqttwire
from proto.mqtt.packets import MqttProtocolError, Reader


def test_doctests() -> None:
    assert doctest.testmod(mqttwire).failed == 0


def test_connect_by_hand() -> None:
    pkt = mqttwire.connect("c1", 30, username="u", password="p", max_packet=65536)
    props = b"\x05\x27\x00\x01\x00\x00"
    body = b"\x00\x04MQTT\x05\xc2\x00\x1e" + props + b"\x00\x02c1\x00\x01u\x00\x01p"
    assert pkt == bytes((0x10, len(body))) + body
    assert mqttwire.connect("c", 0)[9] == 0x02  # no credentials: clean start only
    with pytest.raises(ValueError):
        mqttwire.connect("c", 70000)


def test_subscribe_unsubscribe_publish_by_hand() -> None:
    assert mqttwire.subscribe(7, [("a/+", 0)]) == b"\x82\x09\x00\x07\x00\x00\x03a/+\x00"
    assert mqttwire.unsubscribe(7, ["a/+"]) == b"\xa2\x08\x00\x07\x00\x00\x03a/+"
    assert mqttwire.publish(b"t", b"xy") == b"\x30\x06\x00\x01t\x00xy"
    big = mqttwire.publish(b"t", b"z" * 200)
    assert big[:3] == b"\x30\xcc\x01" and len(big) == 3 + 204  # two-byte remaining length
    assert mqttwire.puback(0x1234) == b"\x40\x02\x12\x34"


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455])
def test_varlen_round_trip(n: int) -> None:
    enc = mqttwire.varlen(n)
    assert len(enc) == 1 + (n >= 128) + (n >= 16384) + (n >= 2097152)
    assert mqttwire.read_varint(enc, 0) == (n, len(enc))


def test_connack_suback_disconnect() -> None:
    props = Properties(PacketTypes.CONNACK)
    props.ServerKeepAlive = 15
    props.AssignedClientIdentifier = "auto-1"
    body = b"\x01\x00" + props.pack()
    present, code, got = mqttwire.parse_connack(body)
    assert present and code == 0 and got[0x13] == 15 and got[0x12] == b"auto-1"
    assert mqttwire.parse_suback(b"\x00\x07\x00\x00\x80") == (7, [0, 0x80])
    dprops = Properties(PacketTypes.DISCONNECT)
    dprops.ReasonString = "bye now"
    assert mqttwire.parse_disconnect(b"\x8b" + dprops.pack()) == (0x8B, "bye now")
    assert mqttwire.parse_disconnect(b"") == (0, "")
    assert mqttwire.reason(0x86) == "bad user name or password" and mqttwire.reason(0x7F) == "0x7f"


def test_publish_with_properties_and_qos1() -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("k", "v")
    props.MessageExpiryInterval = 60
    p = props.pack()
    body = b"\x00\x03a/b" + b"\x00\x09" + p + b"payload"
    assert mqttwire.parse_publish(0x32, body) == (b"a/b", b"payload", 9)
    assert mqttwire.parse_publish(0x30, b"\x00\x03a/b\x00") == (b"a/b", b"", 0)
    for bad in (b"\x00\x03a/b", b"\x00", b"\x00\x03a/b\x05\x01"):
        with pytest.raises(MqttProtocolError):
            mqttwire.parse_publish(0x30, bad)
    with pytest.raises(MqttProtocolError):
        mqttwire.parse_publish(0x36, b"\x00\x01a\x00\x01\x00")  # QoS 3


def test_reader_every_split() -> None:
    stream = (
        mqttwire.publish(b"x/y", b"1" * 300)
        + mqttwire.PINGRESP
        + mqttwire.publish(b"z", b"")
        + b"\x90\x04\x00\x01\x00\x00"
    )
    whole = Reader(1 << 16).feed(stream)
    assert [f >> 4 for f, _ in whole] == [3, 13, 3, 9]
    for cut in range(len(stream) + 1):
        r = Reader(1 << 16)
        assert r.feed(stream[:cut]) + r.feed(stream[cut:]) == whole
    r = Reader(1 << 16)
    assert [p for b in stream for p in r.feed(bytes((b,)))] == whole  # one byte at a time


def test_reader_refuses_oversized_and_overlong() -> None:
    with pytest.raises(MqttProtocolError, match="announced maximum"):
        Reader(100).feed(mqttwire.publish(b"t", b"z" * 200))
    with pytest.raises(MqttProtocolError, match="longer than 4 bytes"):
        Reader(1 << 30).feed(b"\x30\xff\xff\xff\xff\x01")


def test_unknown_property_is_a_protocol_error() -> None:
    with pytest.raises(MqttProtocolError, match="unknown property"):
        mqttwire.parse_connack(b"\x00\x00\x02\x7f\x00")
    with pytest.raises(MqttProtocolError):
        mqttwire.parse_connack(b"\x00\x00\x05\x13\x00")  # properties longer than the packet
    with pytest.raises(MqttProtocolError, match="no value"):
        mqttwire.parse_connack(b"\x00\x00\x01\x01")  # a property without its value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_fuzz_control_packet_bodies(body: bytes) -> None:
    for parse in (mqttwire.parse_connack, mqttwire.parse_suback, mqttwire.parse_disconnect):
        try:
            parse(body)
        except MqttProtocolError:
            pass
    for first in (0x30, 0x32, 0x34):
        try:
            mqttwire.parse_publish(first, body)
        except MqttProtocolError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_reader_and_parsers(chunks: list[bytes]) -> None:
    r = Reader(4096)
    try:
        packets = [p for c in chunks for p in r.feed(c)]
    except MqttProtocolError:
        return
    for first, body in packets:
        kind = first >> 4
        try:
            if kind == 3:
                mqttwire.parse_publish(first, body)
            elif kind == 2:
                mqttwire.parse_connack(body)
            elif kind in (9, 11):
                mqttwire.parse_suback(body)
            elif kind == 14:
                mqttwire.parse_disconnect(body)
        except MqttProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.binary(max_size=300), st.integers(0, 1), st.integers(1, 0xFFFF))
def test_fuzz_publish_round_trip(topic: bytes, payload: bytes, qos: int, pid: int) -> None:
    if qos:
        body = len(topic).to_bytes(2, "big") + topic + pid.to_bytes(2, "big") + b"\x00" + payload
        pkt = bytes((0x32,)) + mqttwire.varlen(len(body)) + body
    else:
        pkt = mqttwire.publish(topic, payload)
    [(first, body)] = Reader(1 << 16).feed(pkt)
    assert mqttwire.parse_publish(first, body) == (topic, payload, pid if qos else 0)
