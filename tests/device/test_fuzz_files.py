# Fuzzing the device's own state files at boot: config.json (carrier/config.py) and identity.json
# (carrier/identity.py) with random bytes, mutated real files and JSON documents with every kind of value in every
# field. Config() never raises (a bad file is ignored and reported in .error), identity.load raises only
# IdentityError, and the whole app boots (console up, queue loaded) whatever the two files hold -- a file that
# made boot raise would reset the device forever, safe mode included. Seeded and bounded (fuzzlib.py).
import json
from mptest import eq, ok, note
import fuzzlib as F
from fwfakes import FakeHal, tmpdir, rmtree, Rig, log_reset
from carrier import config as fwconfig
from carrier import identity

JSON_VALUES = (
    0,
    1,
    -1,
    10,
    86400,
    86401,
    2**31,
    2**64,
    1.5,
    1e300,
    "1e400",
    True,
    False,
    None,
    "",
    "x",
    "30",
    [],
    [1],
    {},
    {"a": "b"},
    {"a": 1},
    "88.123.99/PUMP-0001",
    "coap://127.0.0.1:5683",
    "mqtt://[::1]:1883",
    "mqtts://h",
    "00112233445566778899aabbccddeeff",
    "zz",
    "\u00e9",
)
CFG_KEYS = ("cfgver", "interval", "meta", "x")
ID_KEYS = ("id", "transport", "coap", "mqtt", "ca", "key", "secure", "wifi", "x")
GOOD_ID = {
    "id": "88.123.99/PUMP-0001",
    "transport": "coap",
    "coap": "coap://127.0.0.1:5683",
    "key": "00112233445566778899aabbccddeeff",
}


def _doc(keys, base):
    d = dict(base) if F.chance(2) else {}
    for _ in range(F.below(4)):
        d[F.pick(keys)] = F.pick(JSON_VALUES)
    text = json.dumps(d)
    k = F.below(6)
    if k == 0:
        return F.rbytes(F.below(30))
    if k == 1:
        return F.mutate(text.encode())
    if k == 2:  # numbers JSON has but the device's floats and ints do not
        return text.replace("86400", F.pick(("1e400", "-1e400", "1" * 400, "NaN", "1e-400"))).encode()
    return text.encode()


def test_fuzz_config_json_at_boot():
    F.seed("files-config")
    d = tmpdir("fzf")
    n = 0
    try:
        for _ in range(F.rounds(400)):
            data = _doc(CFG_KEYS, {"cfgver": 3, "interval": 86400, "meta": {}})
            with open(d + "config.json", "wb") as f:
                f.write(data)
            try:
                c = fwconfig.load(FakeHal(d))
            except Exception as e:
                raise AssertionError(
                    "Config() raised %s: %s with config.json %s" % (type(e).__name__, e, data.hex())
                )
            ok(
                type(c.interval) is int
                and 10 <= c.interval <= 86400
                and type(c.cfgver) is int
                and c.cfgver >= 0,
                "%r %r from %s" % (c.cfgver, c.interval, data.hex()),
            )
            n += 1
    finally:
        rmtree(d[:-1])
    note(n, "config.json files")


def test_fuzz_identity_json_at_boot():
    F.seed("files-identity")
    d = tmpdir("fzi")
    n = 0
    try:
        for _ in range(F.rounds(400)):
            data = _doc(ID_KEYS, GOOD_ID)
            with open(d + "identity.json", "wb") as f:
                f.write(data)
            try:
                i = identity.load(FakeHal(d))
            except identity.IdentityError:
                continue
            except Exception as e:
                raise AssertionError(
                    "identity.load raised %s: %s with identity.json %s" % (type(e).__name__, e, data.hex())
                )
            ok(i is None or (type(i.id) is str and 16 <= len(i.key) <= 32), data.hex())
            n += 1
    finally:
        rmtree(d[:-1])
    note(n, "identity.json files loaded")


def test_fuzz_app_boots_whatever_the_files_hold():
    F.seed("files-boot")
    for _ in range(F.rounds(12)):
        r = Rig()
        try:
            with open(r.root + "identity.json") as f:
                good = json.loads(f.read())
            with open(r.root + "identity.json", "wb") as f:
                f.write(_doc(ID_KEYS, good))
            with open(r.root + "config.json", "wb") as f:
                f.write(_doc(CFG_KEYS, {"cfgver": 3, "interval": 60}))
            try:
                r.boot()
                r.run(500)
            except Exception as e:
                raise AssertionError(
                    "boot raised %s: %s with identity.json %r config.json %r"
                    % (
                        type(e).__name__,
                        e,
                        open(r.root + "identity.json").read(),
                        open(r.root + "config.json").read(),
                    )
                )
            ok("boot: 1" in r.con("status"))
        finally:
            log_reset()
            r.close()


# -- findings -------------------------------------------------------------------------------------------------
def test_regression_config_json_number_beyond_float():
    # fuzz finding: config.json {"cfgver": 1e400} (JSON allows it; MicroPython reads inf) raised OverflowError out
    # of Config() at every boot -- before safe mode could help: a reset loop.
    d = tmpdir("fzr")
    try:
        for text in (
            '{"meta": 1e+300, "cfgver": "30", "interval": -1e400}',  # the exact input the fuzzer found
            '{"cfgver": 1e400}',
            '{"cfgver": 1, "interval": 1e999}',
            '{"cfgver": -1e400}',
        ):
            with open(d + "config.json", "w") as f:
                f.write(text)
            c = fwconfig.load(FakeHal(d))
            eq((c.cfgver, c.interval), (0, fwconfig.DEFAULT_INTERVAL))
            ok(c.error and "ignored" in c.error, c.error)
    finally:
        rmtree(d[:-1])


def test_regression_identity_id_not_text():
    # fuzz finding: identity.json with an "id" that is a number, list or object raised TypeError/ValueError (not
    # IdentityError) out of identity.load at every boot: a reset loop instead of "not provisioned".
    d = tmpdir("fzr")
    try:
        for v in (1.5, [300], {"a": 1}, [1, 2], 7):
            doc = dict(GOOD_ID)
            doc["id"] = v
            with open(d + "identity.json", "w") as f:
                f.write(json.dumps(doc))
            try:
                identity.load(FakeHal(d))
            except identity.IdentityError:
                pass
            else:
                raise AssertionError("id %r accepted" % (v,))
    finally:
        rmtree(d[:-1])
