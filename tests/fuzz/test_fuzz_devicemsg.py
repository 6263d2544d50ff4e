"""Fuzzing the device <-> gateway CBOR messages (gateway/devicemsg.py), and the two runtimes against each other.

* ``devicemsg.decode(name, payload)`` for every message name raises only WireError, whatever the payload (protocol-
  shaped maps with wrong types and float/bool keys, any CBOR value, raw bytes, tags, indefinite lengths, huge
  declared lengths, deep nesting, trailing bytes);
* what it accepts re-encodes, and decoding that again gives the same message (encode/decode are one codec);
* the firmware's ``devicemsg.decode`` (under the real micropython) accepts and rejects the same payloads as the
  gateway, apart from the differences listed in ``_known_difference`` (each one is the device being stricter).

Campaign size: IDA_FUZZ_EXAMPLES (tests/support/fuzzing.py) multiplies the examples.
"""

from __future__ import annotations

import math
from typing import Any

import cbor2
from hypothesis import Phase, given
from hypothesis import strategies as st

from proto import devicemsg
from tests.support.fuzzing import cbor_payloads, fuzz_settings, message_maps
from tests.support.mp import run_mp

NAMES = sorted(devicemsg.MESSAGES)


@fuzz_settings(150)
@given(st.sampled_from(NAMES), st.data())
def test_fuzz_decode_only_wire_error(name: str, data: st.DataObject) -> None:
    payload = data.draw(cbor_payloads(name) | cbor_payloads())
    try:
        fields = devicemsg.decode(name, payload)
    except devicemsg.WireError:
        return
    again = devicemsg.encode(name, fields)
    assert devicemsg.encode(name, devicemsg.decode(name, again)) == again


@fuzz_settings(100)
@given(st.binary(max_size=devicemsg.MAX_PAYLOAD + 8))
def test_fuzz_loads_only_wire_error(payload: bytes) -> None:
    try:
        devicemsg.loads(payload)
    except devicemsg.WireError:
        pass


FIRMWARE = """
import sys, binascii
from carrier import devicemsg
for line in sys.stdin:
    name, _, hx = line.strip().partition(" ")
    try:
        devicemsg.decode(name, binascii.unhexlify(hx))
        print("ok")
    except devicemsg.WireError as e:
        print("reject " + str(e).replace(" ", "_"))
    except Exception as e:
        print("CRASH %s:%s" % (type(e).__name__, e))
"""


def _ints(v: Any) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [i for x in v for i in _ints(x)]
    if isinstance(v, dict):
        return [i for x in v.values() for i in _ints(x)]
    return []


def _known_difference(name: str, obj: Any, gateway_ok: bool) -> str | None:
    """Why the runtimes may disagree on this payload (the firmware is stricter or has no 64-bit limits)."""
    if not isinstance(obj, dict):
        return None
    required, optional = devicemsg.MESSAGES[name]
    used = {devicemsg.KEYS[k] for k in (*required, *optional)}
    if gateway_ok and any(isinstance(k, float) and k in used for k in obj):
        return "float key equal to a key of the message: the gateway ignores it, the device refuses it"
    rssi = obj.get(devicemsg.KEYS["rssi"]) if name == "report" else None
    if (
        not gateway_ok
        and isinstance(rssi, int)
        and not isinstance(rssi, bool)
        and not -(2**63) <= rssi < 2**63
    ):
        return "rssi beyond int64: the gateway refuses it, the device has no 64-bit limit"
    return None


@fuzz_settings(2, phases=[Phase.explicit, Phase.generate])  # each example runs micropython once; no shrinking
@given(st.lists(st.tuples(st.sampled_from(NAMES), st.data()), min_size=40, max_size=80))
def test_fuzz_firmware_agrees_with_gateway(cases: list[tuple[str, st.DataObject]]) -> None:
    items: list[tuple[str, bytes]] = []
    for name, data in cases:
        m = data.draw(message_maps(name))
        try:
            items.append((name, cbor2.dumps(m)))
        except Exception:
            continue
    out = run_mp(FIRMWARE, stdin="".join(f"{n} {p.hex()}\n" for n, p in items)).splitlines()
    assert len(out) == len(items)
    bad = []
    for (name, payload), fw in zip(items, out, strict=True):
        assert not fw.startswith("CRASH"), f"firmware devicemsg.decode({name!r}, {payload.hex()}): {fw}"
        try:
            devicemsg.decode(name, payload)
            gw_ok = True
        except devicemsg.WireError:
            gw_ok = False
        if gw_ok != (fw == "ok"):
            obj = cbor2.loads(payload)
            if _known_difference(name, obj, gw_ok) is None:
                bad.append(
                    f"{name} {payload.hex()}: gateway {'accepts' if gw_ok else 'rejects'}, firmware {fw}"
                )
    assert not bad, "\n".join(bad[:20])


def test_regression_wire_odd_payloads() -> None:
    """Fixed inputs: self-referencing CBOR, huge declared lengths, deep nesting, NaN keys, bignums."""
    for hx in (
        "d81c81d81d00",
        "9bffffffffffffffff",
        "5b0000001000000000",
        "81" * 5000 + "00",
        "a1f97e0001",
        "c249010000000000000000",
        "a10bc249010000000000000000",
        "bf0102ff",
        "a1" * 3000 + "00" * 3001,
    ):
        for name in NAMES:
            try:
                devicemsg.decode(name, bytes.fromhex(hx))
            except devicemsg.WireError:
                pass
    # a sensors map with NaN round-trips to the same bytes (NaN != NaN must not break re-encoding)
    rep = {
        "id": "88.1/X",
        "boot": 1,
        "seq": 1,
        "uptime": 1,
        "heap": 1,
        "rssi": 0,
        "queue": 0,
        "board": "b",
        "fw": "f",
        "sensors": {"t": math.nan},
    }
    b = devicemsg.encode("report", rep)
    assert devicemsg.encode("report", devicemsg.decode("report", b)) == b


@fuzz_settings(60)
@given(message_maps("resolve_response"))
def test_fuzz_quick_resolve_response_encoder_matches_encode(m: dict[Any, Any]) -> None:
    """devicemsg.encode_resolve_response (the CoAP answer's fast shape check) gives encode()'s bytes or its error."""
    fields = {
        devicemsg.NAMES.get(k, str(k)) if isinstance(k, int) and not isinstance(k, bool) else str(k): v
        for k, v in m.items()
    }
    try:
        want: bytes | None = devicemsg.encode("resolve_response", fields)
    except devicemsg.WireError:
        want = None
    try:
        got: bytes | None = devicemsg.encode_resolve_response(fields)
    except devicemsg.WireError:
        got = None
    assert got == want
