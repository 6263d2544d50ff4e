# Fuzzing the firmware's decoders of what arrives from the network (seeded, bounded; see fuzzlib.py):
# cbor.loads raises only CBORError, devicemsg.decode only WireError (and what it accepts re-encodes), rcache.answer
# and config.Config.apply never raise, idsyntax.parse raises only IdentifierError. Inputs: random bytes, mutations of
# every vector in tests/vectors/messages.json and cbor.json, and random maps over the protocol's keys
# (including float and bool keys equal to them). test_regression_* hold the exact inputs of findings.
from mptest import eq, ok, raises, load, note
import fuzzlib as F
from fwfakes import FakeHal, tmpdir, rmtree
from carrier import cbor, devicemsg, rcache, idsyntax
from carrier import config as fwconfig

NAMES = sorted(devicemsg.MESSAGES)


def _corpus():
    out = []
    for case in load("messages.json")["messages"]:
        out.append(bytes.fromhex(case["hex"]))
    for case in load("messages.json").get("invalid", ()):
        if "hex" in case:
            out.append(bytes.fromhex(case["hex"]))
    for case in load("cbor.json")["items"]:
        out.append(bytes.fromhex(case["hex"]))
    return out


CORPUS = _corpus()


def _inputs(n):
    """n fuzz inputs: a third random bytes, a third mutated corpus, a third random protocol maps."""
    for r in range(n):
        k = r % 3
        if k == 0:
            yield F.rbytes(F.below(40))
        elif k == 1:
            yield F.mutate(F.pick(CORPUS), CORPUS)
        else:
            if r % 2:
                m = F.message(F.pick(NAMES))
            else:
                m = {}
                for _ in range(F.below(8)):
                    m[F.key()] = F.value(1)
            try:
                yield cbor.dumps(m)
            except cbor.CBORError:
                yield cbor.dumps({})


def _fail(what, data, e):
    raise AssertionError(
        "%s raised %s: %s on input %s (seed %d)" % (what, type(e).__name__, e, data.hex(), F.SEED)
    )


def test_fuzz_cbor_and_proto_decode():
    F.seed("proto")
    n = accepted = 0
    for data in _inputs(F.rounds(800)):
        n += 1
        try:
            obj = cbor.loads(data)
        except cbor.CBORError:
            obj = None
        except Exception as e:
            _fail("cbor.loads", data, e)
        if obj is not None:
            try:
                again = cbor.loads(cbor.dumps(obj))
            except Exception as e:
                _fail("cbor.dumps(cbor.loads())", data, e)
            ok(type(again) is type(obj), "re-encoding keeps the type of " + data.hex())
        for name in NAMES:
            try:
                m = devicemsg.decode(name, data)
            except devicemsg.WireError:
                continue
            except Exception as e:
                _fail("devicemsg.decode(%r)" % name, data, e)
            accepted += 1
            req, opt = devicemsg.MESSAGES[name]
            for k in m:
                ok(
                    type(k) is not float or not (k in req or k in opt),
                    "float key used by %s: %s" % (name, data.hex()),
                )
            try:
                devicemsg.encode(name, m)
            except Exception as e:
                _fail("devicemsg.encode(%r, decoded)" % name, data, e)
    note(n, "inputs x", len(NAMES), "messages;", accepted, "accepted")


def test_fuzz_rcache_answer():
    F.seed("rcache")
    n = 0
    for data in _inputs(F.rounds(600)):
        n += 1
        try:
            r = rcache.answer("88.1/X", data)
        except Exception as e:
            _fail("rcache.answer", data, e)
        eq(len(r), 5)
        ok(type(r[0]) is int)
    note(n, "resolve answers")


def _config_apply(inputs):
    d = tmpdir("fz")
    try:
        h = FakeHal(d)
        c = fwconfig.load(h)
        n = 0
        for data in inputs:
            n += 1
            before = c.interval
            try:
                code, v, msg = fwconfig.apply(c, data)
            except Exception as e:
                _fail("Config.apply", data, e)
            ok(code in (devicemsg.OK, devicemsg.BAD_REQUEST), "code %r" % code)
            ok(type(v) is int and v >= 0, "cfgver %r" % v)
            ok(
                type(c.interval) is int and 10 <= c.interval <= 86400,
                "interval %r after %s" % (c.interval, data.hex()),
            )
            ok(code == devicemsg.OK or c.interval == before)
            fwconfig.ack_payload("88.1/X", code, v, msg)  # the ack it sends must encode
        # what was persisted loads again
        c2 = fwconfig.load(h)
        eq((c2.cfgver, c2.interval, c2.error), (c.cfgver, c.interval, None))
        return n
    finally:
        rmtree(d[:-1])


def test_fuzz_config_apply():
    F.seed("config")
    cfgs = [cbor.dumps({20: v, 21: i}) for v, i in ((1, 30), (2, 10), (3, 86400))] + [
        cbor.dumps({20: 4, 22: {"URL": "https://x"}})
    ]

    def gen(n):
        for r in range(n):
            k = r % 3
            if k == 0:
                yield F.mutate(F.pick(cfgs), CORPUS)
            elif k == 1:
                m = {20: F.pick((1, 5, 2**32, 2**64 - 1)) + r}
                for _ in range(F.below(4)):
                    m[F.pick((21, 22, 21.0, 22.0, 20.0, True, 9))] = F.value(1)
                try:
                    yield cbor.dumps(m)
                except cbor.CBORError:
                    pass
            else:
                yield F.rbytes(F.below(24))

    note(_config_apply(gen(F.rounds(900))), "config payloads")


def test_fuzz_ident_parse():
    F.seed("ident")
    base = [b"88.123.99/PUMP-0001", b"0.NA/88.1", b"a/b/c", "88/\u00e9\u6c34".encode(), b"x" * 255]
    n = 0
    for r in range(F.rounds(1500)):
        k = r % 3
        data = F.rbytes(F.below(20)) if k == 0 else F.mutate(F.pick(base), base)
        for inp in (data,) if k == 2 else (data, _as_str(data)):
            if inp is None:
                continue
            n += 1
            try:
                out = idsyntax.parse(inp)
            except idsyntax.IdentifierError as e:
                ok(e.reason in REASONS, e.reason)
                continue
            except Exception as e:
                _fail("idsyntax.parse", data, e)
            eq(idsyntax.parse(out), out, "normalising is idempotent for " + data.hex())
    note(n, "identifiers")


REASONS = (
    idsyntax.EMPTY,
    idsyntax.TOO_LONG,
    idsyntax.NOT_UTF8,
    idsyntax.CONTROL_CHAR,
    idsyntax.NO_SEPARATOR,
    idsyntax.EMPTY_PREFIX,
    idsyntax.EMPTY_SEGMENT,
    idsyntax.BAD_PREFIX_CHAR,
    idsyntax.EMPTY_SUFFIX,
)


def _as_str(b):
    try:
        return str(b, "utf-8")
    except UnicodeError:
        return None


# -- findings -----------------------------------------------------------------------------------------------
def test_regression_float_key_equal_to_known_key():
    # fuzz finding: a map key 21.0 (CBOR half float f94d40) equals 21, so devicemsg.check indexed its type table
    # with a float: TypeError (not WireError) out of Config.apply, MQTT ack handling and CoAP report acks,
    # past the transport's (OSError, ValueError) handler into the app's crash-and-reset path.
    payload = bytes.fromhex("a214181bf94d4040")  # {20: 27, 21.0: b""}
    e = raises(devicemsg.WireError, devicemsg.decode, "config", payload)
    ok("not an integer" in str(e), str(e))
    data = bytes.fromhex(
        "a411f616f5f94200f666302e4e412f78a40b62c285f44101f5a13748313233343536373818ffa218194a0d343d0b1e2fdff77f51f94a00f97c00"
    )
    raises(devicemsg.WireError, devicemsg.decode, "error", data)
    raises(devicemsg.WireError, devicemsg.decode, "report_ack", cbor.dumps({10.0: 1, 11: 1, 3: 1}))
    d = tmpdir("fz")
    try:
        c = fwconfig.load(FakeHal(d))
        code, v, msg = fwconfig.apply(c, payload)
        eq((code, v, c.interval), (devicemsg.BAD_REQUEST, 27, fwconfig.DEFAULT_INTERVAL))
    finally:
        rmtree(d[:-1])
    # a float key the message does not use is ignored, as the gateway ignores it
    eq(
        devicemsg.decode("report_ack", cbor.dumps({10: 1, 11: 2, 3: 1, 15.0: 0})),
        {10: 1, 11: 2, 3: 1, 15.0: 0},
    )
