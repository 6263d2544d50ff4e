# The firmware's identifier parser, CBOR codec and message checks against the shared vectors
# (the CPython side: tests/unit/proto/test_device_vectors.py).
from mptest import eq, ok, raises, load, from_json, note
from carrier import cbor, idsyntax, devicemsg


def test_identifiers_valid():
    v = load("identifiers.json")
    for case in v["valid"]:
        eq(idsyntax.parse(case["input"]), case["normalised"], case["input"])
        eq(idsyntax.parse(case["input"].encode()), case["normalised"], case["input"])
        p, s = idsyntax.split(idsyntax.parse(case["input"]))
        eq((p, s), (case["prefix"], case["suffix"]))
    note(len(v["valid"]), "valid identifiers agree")


def test_identifiers_invalid():
    v = load("identifiers.json")
    for case in v["invalid"]:
        inp = bytes.fromhex(case["input_hex"]) if "input_hex" in case else case["input"]
        e = raises(idsyntax.IdentifierError, idsyntax.parse, inp)
        eq(e.reason, case["reason"], repr(inp))
    note(len(v["invalid"]), "invalid identifiers agree")


def test_cbor_items():
    v = load("cbor.json")
    for case in v["items"]:
        value = from_json(case["value"])
        eq(cbor.dumps(value).hex(), case["hex"], "encode")
        eq(cbor.loads(bytes.fromhex(case["hex"])), value, "decode " + case["hex"])


def test_cbor_decode_only():
    for case in load("cbor.json")["decode"]:
        eq(cbor.loads(bytes.fromhex(case["hex"])), from_json(case["value"]), case["hex"])


def test_cbor_rejects():
    for case in load("cbor.json")["reject"]:
        raises(cbor.CBORError, cbor.loads, bytes.fromhex(case["hex"]))


def _keyed(fields):
    return {devicemsg.NAMES.index(k): v for k, v in fields.items()}


def test_messages():
    v = load("messages.json")
    for case in v["messages"]:
        m = _keyed(from_json(case["fields"]))
        eq(devicemsg.encode(case["message"], m).hex(), case["hex"], case["description"])
        eq(devicemsg.decode(case["message"], bytes.fromhex(case["hex"])), m, case["description"])
    names = set(c["message"] for c in v["messages"])
    eq(sorted(names), sorted(devicemsg.MESSAGES), "every message type has a vector")


def test_invalid_messages():
    for case in load("messages.json")["invalid"]:
        raises(devicemsg.WireError, devicemsg.decode, case["message"], bytes.fromhex(case["hex"]))


def test_topic_key():
    from carrier.mqttdevice import topic_key  # the MQTT transport's (a CoAP device never loads it)

    eq(topic_key("88.123.99/PUMP-0001"), "88.123.99%2FPUMP-0001")
    eq(topic_key("a/+#$%"), "a%2F%2B%23%24%25")
    ok(len(devicemsg.NAMES) == 26)
