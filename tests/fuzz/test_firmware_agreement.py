"""Property tests: the firmware's CBOR codec and identifier parser (run by the real micropython) agree with
cbor2 and with the gateway's parser on generated inputs, not only on the fixed vectors."""

from __future__ import annotations

import json

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import devicemsg, identifier
from tests.support.fuzzing import cbor_scalars, cbor_trees
from tests.support.mp import run_mp

# generated values: integers in [-(2**63), 2**64 - 1], floats without NaN, strings up to 40 long
values = cbor_trees(
    cbor_scalars(
        st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=False, width=64), 40
    ),
    st.integers(min_value=-30, max_value=300) | st.text(max_size=8),
    20,
)

ROUNDTRIP = """
import sys, binascii
from carrier import cbor
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    try:
        v = cbor.loads(binascii.unhexlify(line))
        print(binascii.hexlify(cbor.dumps(v)).decode())
    except Exception as e:
        print("ERR %s %s" % (type(e).__name__, e))
"""


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(st.lists(values, min_size=20, max_size=60))
def test_firmware_cbor_matches_cbor2(items: list) -> None:
    encoded = [devicemsg.dumps(v).hex() for v in items]
    out = run_mp(ROUNDTRIP, stdin="\n".join(encoded) + "\n").split()
    assert out == encoded  # decoded by the firmware, re-encoded byte-identical to cbor2 canonical


IDENT = """
import sys, json
from carrier import idsyntax
for line in sys.stdin:
    s = json.loads(line)
    try:
        print(json.dumps({"ok": idsyntax.parse(s)}))
    except idsyntax.IdentifierError as e:
        print(json.dumps({"reason": e.reason}))
"""

ident_text = st.text(
    alphabet=st.sampled_from(list("88.123/abcXYZ-_ .$\x00\x1f\x7f\u0085\u00e9\u6c34/")), max_size=30
) | st.text(max_size=300)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(st.lists(ident_text, min_size=30, max_size=80))
def test_firmware_identifier_parser_matches_gateway(texts: list[str]) -> None:
    # ensure_ascii=False: MicroPython's json turns a \ud83d\ude00 escape pair into two surrogates (CESU-8)
    out = run_mp(IDENT, stdin="".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)).splitlines()
    assert len(out) == len(texts)
    for text, line in zip(texts, out, strict=True):
        got = json.loads(line)
        try:
            want = {"ok": identifier.normalise(text)}
        except identifier.IdentifierError as e:
            want = {"reason": e.reason}
        assert got == want, text


@given(st.binary(max_size=200))
def test_wire_loads_only_raises_wire_error(data: bytes) -> None:
    try:
        devicemsg.loads(data)
    except devicemsg.WireError:
        pass


@given(st.sampled_from(sorted(devicemsg.MESSAGES)), values)
def test_wire_decode_only_raises_wire_error(name: str, v: object) -> None:
    try:
        devicemsg.decode(name, cbor2.dumps(v))
    except devicemsg.WireError:
        pass


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_identifier_parse_only_raises_identifier_error(text: str | bytes) -> None:
    try:
        ident = identifier.parse(text)
    except identifier.IdentifierError as e:
        assert e.reason in identifier.REASONS
    else:
        assert identifier.parse(str(ident)) == ident  # normalising is idempotent
