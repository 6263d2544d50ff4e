"""The CPython side against the shared vectors (the MicroPython side: tests/device/test_carrier_vectors.py)."""

from __future__ import annotations

import pytest

from proto import devicemsg, identifier
from tests.support.vecload import from_json, load, same

IDS = load("identifiers.json")
MSGS = load("messages.json")
CBOR = load("cbor.json")


def _input(v: dict) -> str | bytes:
    return bytes.fromhex(v["input_hex"]) if "input_hex" in v else v["input"]


@pytest.mark.parametrize("v", IDS["valid"], ids=lambda v: v["input"][:40])
def test_valid_identifier(v: dict) -> None:
    ident = identifier.parse(v["input"])
    assert (str(ident), ident.prefix, ident.suffix) == (v["normalised"], v["prefix"], v["suffix"])
    assert identifier.parse(v["input"].encode()) == ident


@pytest.mark.parametrize("v", IDS["invalid"], ids=lambda v: repr(_input(v))[:40])
def test_invalid_identifier(v: dict) -> None:
    with pytest.raises(identifier.IdentifierError) as e:
        identifier.parse(_input(v))
    assert e.value.reason == v["reason"]
    assert e.value.reason in identifier.REASONS


@pytest.mark.parametrize("v", MSGS["messages"], ids=lambda v: f"{v['message']}-{v['description']}")
def test_message_vector(v: dict) -> None:
    fields = from_json(v["fields"])
    assert devicemsg.encode(v["message"], fields).hex() == v["hex"]
    assert same(devicemsg.decode(v["message"], bytes.fromhex(v["hex"])), fields)


@pytest.mark.parametrize("v", MSGS["invalid"], ids=lambda v: f"{v['message']}-{v['description']}")
def test_invalid_message_vector(v: dict) -> None:
    with pytest.raises(devicemsg.WireError):
        devicemsg.decode(v["message"], bytes.fromhex(v["hex"]))


@pytest.mark.parametrize("v", CBOR["items"], ids=lambda v: v["hex"][:24])
def test_cbor_item(v: dict) -> None:
    value = from_json(v["value"])
    assert devicemsg.dumps(value).hex() == v["hex"]
    assert same(devicemsg.loads(bytes.fromhex(v["hex"])), value)


@pytest.mark.parametrize("v", CBOR["decode"], ids=lambda v: v["hex"])
def test_cbor_decode_only(v: dict) -> None:
    assert same(devicemsg.loads(bytes.fromhex(v["hex"])), from_json(v["value"]))


@pytest.mark.parametrize("v", CBOR["reject"], ids=lambda v: v["why"])
def test_cbor_reject(v: dict) -> None:
    with pytest.raises(devicemsg.WireError):
        devicemsg.loads(bytes.fromhex(v["hex"]))


def test_every_message_type_has_a_vector() -> None:
    assert {v["message"] for v in MSGS["messages"]} == set(devicemsg.MESSAGES)


def test_every_reason_has_a_vector() -> None:
    assert {v["reason"] for v in IDS["invalid"]} == set(identifier.REASONS)


def test_encode_resolve_response_is_encode() -> None:
    ok = {
        "code": 1,
        "id": "88.123.99/P",
        "values": [[1, "URL", "https://x", 86400], [2, "B", b"\x00", 0]],
        "source": 2,
    }
    assert devicemsg.encode_resolve_response(ok) == devicemsg.encode("resolve_response", ok)
    for bad in ({**ok, "values": [[1, "URL", "x", -5]]}, {**ok, "source": 9}, {**ok, "code": True}):
        with pytest.raises(devicemsg.WireError):
            devicemsg.encode_resolve_response(bad)
