# Seeded mutation fuzzing for the firmware tests under micropython (no hypothesis there).
# Every loop is bounded: `rounds(n)` is n times IDA_FUZZ_SCALE (default 1; a by-hand campaign sets e.g. 200),
# and the PRNG seed is IDA_FUZZ_SEED (default fixed, so `make test` is reproducible). A failure names the
# seed, the round and the exact input (hex), so it can be turned into a test_regression_* with that input.
import gc
import os
import random
from mptest import ok as _ok

SEED = int(os.getenv("IDA_FUZZ_SEED") or "20240601")
SCALE = max(1, int(os.getenv("IDA_FUZZ_SCALE") or "1"))

INTERESTING = (
    0x00,
    0x01,
    0x02,
    0x07,
    0x0A,
    0x0D,
    0x17,
    0x18,
    0x19,
    0x1A,
    0x1B,
    0x1F,
    0x20,
    0x2F,
    0x3F,
    0x40,
    0x5F,
    0x60,
    0x7F,
    0x80,
    0x9F,
    0xA0,
    0xBF,
    0xC0,
    0xC2,
    0xDF,
    0xE0,
    0xED,
    0xEF,
    0xF0,
    0xF4,
    0xF5,
    0xF8,
    0xF9,
    0xFA,
    0xFB,
    0xFE,
    0xFF,
)


def seed(tag):
    """Re-seed for one test (the tag keeps tests independent of each other's draws)."""
    h = SEED
    for c in tag:
        h = (h * 31 + ord(c)) & 0x3FFFFFFF
    random.seed(h)
    return h


def rounds(n):
    return n * SCALE


def below(n):
    """A random int in [0, n) (n >= 1)."""
    if n <= 1:
        return 0
    return random.getrandbits(30) % n


def chance(k):
    """True with probability 1/k."""
    return below(k) == 0


def pick(seq):
    return seq[below(len(seq))]


def rbytes(n):
    b = bytearray(n)
    for i in range(n):
        b[i] = pick(INTERESTING) if chance(4) else random.getrandbits(8)
    return bytes(b)


def mutate(data, others=(), n=0):
    """1..4 (or n) random edits of data: bit flips, interesting bytes, inserts, deletes, duplicated or
    spliced ranges, truncation. (MicroPython's bytearray cannot change length in place: bytes slicing.)"""
    b = bytes(data)
    for _ in range(n or 1 + below(4)):
        op = below(9)
        ln = len(b)
        if op == 0 and ln:
            i = below(ln)
            b = b[:i] + bytes((b[i] ^ (1 << below(8)),)) + b[i + 1 :]
        elif op == 1 and ln:
            i = below(ln)
            b = b[:i] + bytes((pick(INTERESTING),)) + b[i + 1 :]
        elif op == 2:
            i = below(ln + 1)
            b = b[:i] + rbytes(1 + below(8)) + b[i:]
        elif op == 3 and ln:
            i = below(ln)
            b = b[:i] + b[i + 1 + below(8) :]
        elif op == 4 and ln:
            i = below(ln)
            k = below(ln + 1)
            b = b[:k] + b[i : i + 1 + below(16)] + b[k:]
        elif op == 5 and ln:
            b = b[: below(ln + 1)]
        elif op == 6 and others:
            o = pick(others)
            if o:
                i = below(len(o))
                b = b[: below(ln + 1)] + o[i : i + 1 + below(32)]
        elif op == 7 and ln:
            i = below(ln)
            k = 1 + below(4)
            b = b[:i] + bytes((pick((0, 0xFF, 0x7F, 0x80)),)) * k + b[i + k :]
        elif op == 8 and ln >= 2:
            i = below(ln - 1)
            b = b[:i] + b[i + 1 : i + 2] + b[i : i + 1] + b[i + 2 :]
    return b


# -- random values for CBOR payloads ------------------------------------------------------------------------
INTS = (
    0,
    1,
    2,
    9,
    10,
    23,
    24,
    255,
    256,
    65535,
    65536,
    86400,
    86401,
    2**31 - 1,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**64 - 1,
    -1,
    -24,
    -25,
    -(2**63),
)
TEXTS = ("", "a", "88.123.99/PUMP-0001", "0.NA/x", "x" * 300, "\u00e9\u6c34", "URL", "a\x00b", "\u0085")


def value(depth=0):
    """A random value the firmware's CBOR encoder can write."""
    k = below(12 if depth < 3 else 8)
    if k == 0:
        return pick(INTS)
    if k == 1:
        return random.getrandbits(below(32) + 1) - (random.getrandbits(8) if chance(3) else 0)
    if k == 2:
        return pick((0.0, -0.0, 1.5, 10.0, 1e300, float("inf"), float("nan"), 3.0, 20.0))
    if k == 3:
        return pick(TEXTS)
    if k == 4:
        return rbytes(below(12))
    if k == 5:
        return chance(2)
    if k == 6:
        return None
    if k == 7:
        return pick((b"\x01", b"\x01\x02", b"12345678", b"123456789"))
    if k < 10:
        return [value(depth + 1) for _ in range(below(5))]
    d = {}
    for _ in range(below(5)):
        d[key()] = value(depth + 1)
    return d


def key():
    """A map key: mostly the protocol's small ints, sometimes floats or bools equal to them, or text."""
    k = below(10)
    if k < 6:
        return 1 + below(26)
    if k == 6:
        return float(1 + below(25))
    if k == 7:
        return chance(2)
    if k == 8:
        return pick(TEXTS[:4])
    return pick(INTS)


def _typed(t):
    """A valid value for a type letter of carrier.devicemsg._TYPES."""
    if t == "b":
        return rbytes(1 + below(8))
    if t == "s":
        return pick(TEXTS)
    if t == "u":
        return pick(INTS[:18])
    if t == "i":
        return pick(INTS)
    if t == "B":
        return chance(2)
    if t == "I":
        return pick((10, 60, 86400))
    if t == "R":
        return below(4)
    if t == "V":
        return [
            [pick(INTS[:18]), pick(TEXTS), pick((pick(TEXTS), rbytes(below(6)))), pick(INTS[:18])]
            for _ in range(below(3))
        ]
    if t == "S":
        return [pick(TEXTS) for _ in range(below(3))]
    if t == "U":
        return [pick(INTS[:18]) for _ in range(below(3))]
    if t == "M":
        return {pick(TEXTS[:4]): pick((1, -1, 1.5, "x", True)) for _ in range(below(3))}
    if t == "T":
        return {pick(TEXTS[:4]): pick(TEXTS) for _ in range(below(3))}
    return None


def message(name):
    """A protocol message `name` as an int-keyed map: mostly valid, then 0-3 perturbations (a key dropped,
    a value of another type, a key replaced by an equal float or bool, an unknown key added)."""
    from carrier import devicemsg

    req, opt = devicemsg.MESSAGES[name]
    m = {}
    for k in req:
        m[k] = _typed(devicemsg._TYPES[k])
    for k in opt:
        if chance(2):
            m[k] = _typed(devicemsg._TYPES[k])
    for _ in range(below(4)):
        keys = list(m)
        op = below(5)
        if op == 0 and keys:
            del m[pick(keys)]
        elif op == 1 and keys:
            m[pick(keys)] = value(1)
        elif op == 2 and keys:
            k = pick(keys)
            v = m.pop(k)
            m[float(k) if type(k) is int and chance(2) else k] = v
        elif op == 3:
            m[key()] = value(1)
        elif op == 4 and keys:
            k = pick(keys)
            m[k] = _typed(pick("bsuiBIRVSUMT"))
    return m


# -- the client fuzzers' rig (test_fuzz_coap.py, test_fuzz_mqtt.py) -------------------------------------------
def heap():
    gc.collect()
    return gc.mem_alloc()


class ClientRig:
    """What the CoAP and MQTT client fuzz rigs share: a real config.Config record that every desired config handed
    on is applied to, callbacks that check their results, and a bound on what is kept of them (a long campaign
    must not fill the heap itself)."""

    def __init__(self, tag):
        from fwfakes import FakeHal, tmpdir
        from carrier import config

        self.dir = tmpdir(tag)
        self.cfg = config.load(FakeHal(self.dir))
        self.results = []  # the latest results
        self.nresults = 0
        self.configs = 0

    def close(self):
        from fwfakes import rmtree

        rmtree(self.dir[:-1])

    def on_config(self, payload):
        from carrier import config, devicemsg

        self.configs += 1
        code, v, msg = config.apply(self.cfg, payload)
        _ok(code in (devicemsg.OK, devicemsg.BAD_REQUEST) and type(v) is int)

    def keep(self, res):
        self.nresults += 1
        self.results.append(res)
        if len(self.results) > 64:
            del self.results[:32]

    def resolved(self, res):
        _ok(type(res) is tuple and len(res) == 5 and type(res[0]) is int, "resolve result %r" % (res,))
        self.keep(res)

    def check_heap(self, base, what):
        """The heap has not grown by 16 KiB or more since ``base`` (:func:`heap`), results dropped."""
        self.results = []
        grown = heap() - base
        _ok(grown < 16384, "the %s's heap grew by %d bytes" % (what, grown))
