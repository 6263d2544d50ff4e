"""Identifier edge cases: the gateway's parser (proto/identifier.py) and the firmware's (firmware/carrier/idsyntax.py,
run by the real micropython) must give the same normalised form or the same reason for every input, as bytes
and (when it is UTF-8) as text. tests/fuzz/test_firmware_agreement.py has the random agreement test; this module
aims at the corners: malformed UTF-8 (overlong forms, surrogates, beyond U+10FFFF, truncated sequences, lone
continuation bytes), C0/C1 controls, the 255-character limit with multi-byte characters, and the order of
the checks. test_regression_* hold the exact inputs of findings."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proto import identifier
from tests.support.mp import run_mp

FIRMWARE = """
import sys, json, binascii
from carrier import idsyntax
for line in sys.stdin:
    kind, _, hx = line.strip().partition(" ")
    b = binascii.unhexlify(hx)
    inp = b if kind == "b" else str(b, "utf-8")
    try:
        print(json.dumps({"ok": binascii.hexlify(idsyntax.parse(inp).encode()).decode()}))
    except idsyntax.IdentifierError as e:
        print(json.dumps({"reason": e.reason}))
    except Exception as e:
        print(json.dumps({"crash": "%s: %s" % (type(e).__name__, e)}))
"""

# Malformed UTF-8 (RFC 3629): each must be NOT_UTF8 in both runtimes, wherever it sits.
BAD_UTF8 = [
    b"\xc0\xaf",  # overlong '/'
    b"\xc1\xbf",  # overlong U+007F
    b"\xe0\x80\xaf",  # overlong '/' in 3 bytes
    b"\xe0\x9f\xbf",  # overlong U+07FF
    b"\xf0\x80\x80\xaf",  # overlong '/' in 4 bytes
    b"\xf0\x8f\xbf\xbf",  # overlong U+FFFF
    b"\xed\xa0\x80",  # U+D800 (surrogate)
    b"\xed\xbf\xbf",  # U+DFFF (surrogate)
    b"\xed\xa0\xbd\xed\xb2\xa9",  # a surrogate pair encoded as two 3-byte sequences (CESU-8)
    b"\xf4\x90\x80\x80",  # U+110000
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xfc\x84\x80\x80\x80\x80",
    b"\xfe",
    b"\xff",
    b"\x80",  # lone continuation bytes
    b"\xbf",
    b"\xc2",  # truncated sequences
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc2\x41",  # lead byte followed by a non-continuation
    b"\xe2\x28\xa1",
]
# Valid but unusual UTF-8.
ODD_UTF8 = [
    "\u00a0",  # NBSP (after the C1 range)
    "\u0080",  # C1 controls: CONTROL_CHAR
    "\u009f",
    "\u0085",
    "\x7f",
    "\u07ff",
    "\u0800",
    "\ud7ff",
    "\ue000",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "\U00010000",
    "\U0010ffff",
    "\u2028",
    "\u0131",  # dotless i (upper() would be 'I' if the prefix were not ASCII-only)
    "\u00df",
    "\u212a",  # Kelvin sign (lower() is ASCII 'k')
]
PREFIXES = ["88.123.99", "0.na", "a", "A-_.b", "88..1", ".88", "88.", "8 8", "", "\u00e988", "88\u0131"]


def _cases() -> list[bytes]:
    out: list[bytes] = []
    for bad in BAD_UTF8:
        out += [bad, b"88/" + bad, bad + b"/x", b"88/x" + bad, b"88" + bad + b"/x", b"88/" + bad + b"x" * 300]
    for odd in ODD_UTF8:
        e = odd.encode()
        out += [e, b"88/" + e, e + b"/x", b"88/x" + e + b"y", b"88" + e + b"/x"]
    for p in PREFIXES:
        for s in ["x", "", "/", "a/b", "x/", "\u00e9", " ", "\t"]:
            out.append(f"{p}/{s}".encode())
        out.append(p.encode())
    # the 255-character limit counts characters, not bytes
    for ch in ["x", "\u00e9", "\u6c34", "\U0001f600"]:
        for n in (250, 251, 252, 253):
            out.append(b"88/" + ch.encode() * n)
    out += [
        b"88/" + "\U0001f600".encode() * 252 + b"\x00",
        b"88/" + b"x" * 253 + b"\x00",
    ]  # TOO_LONG before CONTROL
    out += [b"\x00" * 256, b"/" * 256, b"", b"/", b"//", b"a//", b"a/\x00", b"a\x00/b"]
    return out


def _firmware(inputs: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    out = run_mp(FIRMWARE, stdin="".join(f"{kind} {b.hex()}\n" for kind, b in inputs))
    return [json.loads(line) for line in out.splitlines()]


def _gateway(inp: str | bytes) -> dict[str, str]:
    try:
        return {"ok": identifier.normalise(inp).encode("utf-8", "surrogatepass").hex()}
    except identifier.IdentifierError as e:
        return {"reason": e.reason}


def _agree(cases: list[bytes]) -> None:
    inputs: list[tuple[str, bytes]] = []
    for b in cases:
        inputs.append(("b", b))
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        inputs.append(("s", b))
    got = _firmware(inputs)
    assert len(got) == len(inputs)
    bad = []
    for (kind, b), fw in zip(inputs, got, strict=True):
        gw = _gateway(b if kind == "b" else b.decode())
        if fw != gw:
            bad.append(f"{kind} {b[:40]!r}{'...' if len(b) > 40 else ''}: gateway {gw} firmware {fw}")
    assert not bad, "\n".join(bad)


def test_edge_cases_agree() -> None:
    _agree(_cases())


def test_every_malformed_utf8_is_not_utf8() -> None:
    for bad in BAD_UTF8:
        for b in (bad, b"88/" + bad, bad + b"/x"):
            assert identifier.reason_of(b) == identifier.NOT_UTF8, b


def test_regression_gateway_lone_surrogate_identifier() -> None:
    # finding: identifier.parse accepted text with a lone surrogate (valid Python str, no UTF-8 form), which then
    # failed as UnicodeEncodeError in the Handle request encoder or SQLite: 500 and a traceback instead of 400
    # a str the network cannot produce (cbor2, paho and aiocoap decode UTF-8 strictly), but a caller can
    assert identifier.reason_of("88/\ud800") == identifier.NOT_UTF8
    assert identifier.reason_of("\udc80/x") == identifier.NOT_UTF8


@settings(
    max_examples=4,
    deadline=None,
    phases=[
        Phase.explicit,
        Phase.generate,
    ],  # no shrinking: each example runs micropython; the report lists all
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(
        st.builds(
            lambda pre, mid, post: pre + mid + post,
            st.sampled_from([b"", b"88/", b"88.1", b"a/b", b"88/" + b"x" * 250]),
            st.sampled_from(BAD_UTF8) | st.binary(max_size=6),
            st.sampled_from([b"", b"/x", b"x", b"\xc2\x85", b"/"]),
        ),
        min_size=40,
        max_size=80,
    )
)
def test_spliced_bytes_agree(cases: list[bytes]) -> None:
    _agree(cases)


# -- findings -----------------------------------------------------------------------------------------------
def test_regression_firmware_accepts_malformed_utf8() -> None:
    # finding: MicroPython's str(b, "utf-8") checks only the lead/continuation structure, so the firmware
    # parsed overlong forms, UTF-16 surrogates and code points past U+10FFFF as text (b"88/\xed\xa0\x80" was
    # a valid identifier on the device, NOT_UTF8 on the gateway; b"88\xc0\xafx" was NO_SEPARATOR).
    cases = [b"88/\xed\xa0\x80", b"88\xc0\xafx", b"88/\xf4\x90\x80\x80", b"88/\xe0\x80\xaf", b"88/x\xc1\xbf"]
    got = _firmware([("b", b) for b in cases])
    assert got == [{"reason": "NOT_UTF8"}] * len(cases)
    assert [_gateway(b) for b in cases] == got


def test_regression_flashed_identifier_beyond_bmp(tmp_path: Path) -> None:
    # finding (from the strict check above): `ida flash` wrote identity.json with json.dumps' default
    # ensure_ascii, so U+20000 became the escape pair \ud840\udc00, which MicroPython's json decodes into two
    # surrogates (CESU-8 bytes): the device's identifier was not the one flashed (and not UTF-8 at all).
    from tools.commands.flash.identity import Identity

    ident = "88.123.99/\U00020000-\U0001f600-\U00014607"  # U+14607: the text that showed it
    data = Identity(
        ident, bytes(16), ("coap://127.0.0.1:5683",), wifi=("caf\u00e9-\U0001f4f6", "pw")
    ).to_json()
    (tmp_path / "identity.json").write_bytes(data)
    out = run_mp(
        "import binascii\n"
        "from carrier import identity\n"
        "from fwfakes import FakeHal\n"
        f"i = identity.load(FakeHal({str(tmp_path) + '/'!r}))\n"
        "print(binascii.hexlify(i.id.encode()).decode(), binascii.hexlify(i.wifi[0].encode()).decode())\n"
    )
    assert out.split() == [ident.encode().hex(), "caf\u00e9-\U0001f4f6".encode().hex()]
