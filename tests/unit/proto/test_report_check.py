"""proto/devicemsg.py check_report / decode_report: every key of a report checked for type and range (and the
storage limits), every other key dropped whatever its value, a report that can never be stored rejected with the
permanent InvalidReport, and ``raw`` the payload itself when it held only report keys."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest

from proto import devicemsg
from proto.devicemsg import InvalidReport, check_report, decode_report

DEV = "88.123.99/PUMP-0001"


def report(**extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": DEV,
        "boot": 3,
        "seq": 17,
        "uptime": 3600,
        "heap": 81234,
        "rssi": -61,
        "queue": 0,
        "board": "esp32-devkitc",
        "fw": "0.1.0",
    }
    out.update(extra)
    return out


def wire(fields: dict[str, Any]) -> bytes:
    return cbor2.dumps({devicemsg.KEYS[k] if k in devicemsg.KEYS else k: v for k, v in fields.items()})


def test_a_valid_report_is_kept_as_it_came() -> None:
    payload = devicemsg.encode("report", report(sensors={"temp": 21.5, "ok": True}, dropped=2, time=0))
    r = decode_report(payload)
    assert (r.id, r.boot, r.seq) == (DEV, 3, 17)
    assert r.raw == payload  # nothing to drop: the payload is what gets stored
    assert r.fields == devicemsg.decode("report", payload)
    assert devicemsg.stored_fields(r.raw) == r.fields


@pytest.mark.parametrize(
    "key, value",
    [
        ("etag", b"\x01\x02"),  # issue 19: a known key of another message, a byte string
        ("token", b"\xff" * 8),
        ("values", [[1, "URL", b"x", 0]]),
        ("msg", "hello"),
        ("online", True),
    ],
)
def test_keys_of_other_messages_are_dropped(key: str, value: Any) -> None:
    payload = wire({**report(), key: value})
    r = decode_report(payload)
    assert key not in r.fields and r.fields == report()
    assert r.raw != payload and devicemsg.stored_fields(r.raw) == report()  # re-encoded without it
    assert key not in check_report({**report(), key: value}).fields


def test_unknown_keys_are_dropped_whatever_their_value() -> None:
    payload = cbor2.dumps({**{devicemsg.KEYS[k]: v for k, v in report().items()}, 99: b"x" * 100, "n": 1.5})
    r = decode_report(payload)
    assert r.fields == report() and devicemsg.stored_fields(r.raw) == report()


@pytest.mark.parametrize(
    "key, value",
    [
        ("board", b"esp32"),  # a byte string under a text key
        ("fw", 1),
        ("heap", b"\x00"),  # a byte string under a uint key
        ("heap", True),  # a bool for an int
        ("queue", 1.0),
        ("uptime", -1),
        ("uptime", 2**64),
        ("rssi", 2**63),
        ("boot", 2**63),  # SQLite integers end at 2^63 - 1
        ("seq", -1),
        ("board", "x" * (devicemsg.REPORT_TEXT_MAX + 1)),
        ("board", "bad \ud800 surrogate"),
        ("id", ""),
        ("id", "x" * 256),
        ("sensors", {"t": math.nan}),
        ("sensors", {"t": math.inf}),
        ("sensors", {"t": -math.inf}),
        ("sensors", {"t": b"raw"}),
        ("sensors", {"t": [1, 2]}),
        ("sensors", {"t": None}),
        ("sensors", {"": 1}),
        ("sensors", {1: 1}),
        ("sensors", {"t" * (devicemsg.SENSOR_NAME_MAX + 1): 1}),
        ("sensors", {"t": "v" * (devicemsg.REPORT_TEXT_MAX + 1)}),
        ("sensors", {"t": 2**63}),
        ("sensors", {f"s{i}": i for i in range(devicemsg.SENSORS_MAX + 1)}),  # an oversize map
        ("sensors", [1, 2]),
    ],
)
def test_a_report_that_can_never_be_stored_is_invalid(key: str, value: Any) -> None:
    with pytest.raises(InvalidReport) as e:
        check_report(report(**{key: value}))
    assert key in str(e.value)
    assert isinstance(e.value, devicemsg.WireError) and isinstance(e.value, ValueError)  # 400 everywhere
    if not (isinstance(value, str) and "\ud800" in value):  # CBOR cannot carry a lone surrogate
        with pytest.raises(InvalidReport):
            decode_report(wire(report(**{key: value})))


def test_limits_are_inclusive() -> None:
    r = check_report(
        report(
            boot=2**63 - 1,
            uptime=2**64 - 1,
            rssi=-(2**63),
            board="b" * devicemsg.REPORT_TEXT_MAX,
            sensors={
                f"s{i:0{devicemsg.SENSOR_NAME_MAX - 1}d}": -(2**63) for i in range(devicemsg.SENSORS_MAX)
            },
        )
    )
    assert r.boot == 2**63 - 1 and devicemsg.stored_fields(r.raw) == r.fields


@pytest.mark.parametrize("missing", devicemsg.MESSAGES["report"][0])
def test_missing_required_key(missing: str) -> None:
    fields = report()
    del fields[missing]
    with pytest.raises(InvalidReport, match=missing):
        check_report(fields)


@pytest.mark.parametrize("payload", [b"\x83\x01\x02\x03", cbor2.dumps("text"), cbor2.dumps({True: b"x"})])
def test_not_a_report_map(payload: bytes) -> None:
    with pytest.raises(InvalidReport):
        decode_report(payload)


def test_garbage_is_a_wire_error() -> None:
    with pytest.raises(devicemsg.WireError):
        decode_report(b"\xff\x00")
