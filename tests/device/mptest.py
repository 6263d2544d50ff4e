# Tiny assertion helpers and vector loading for firmware tests running under micropython.
import json
import os

OUT = []
VECTORS = (os.getenv("IDA_VECTORS") or "tests/vectors").rstrip("/") + "/"


class Skip(Exception):
    pass


def note(*parts):
    """A line shown in the pytest report of this test (pytest -s or -rA)."""
    OUT.append(" ".join(str(p) for p in parts))


def eq(a, b, what=""):
    if not same(a, b):
        raise AssertionError("%s: %r != %r" % (what or "values differ", a, b))


def ok(cond, what="condition is false"):
    if not cond:
        raise AssertionError(what)


def raises(exc, fn, *args):
    try:
        fn(*args)
    except exc as e:
        return e
    raise AssertionError("%s not raised by %r%r" % (exc.__name__, fn, args))


def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and str(a) == str(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        for k in a:
            if k not in b or not same(a[k], b[k]):
                return False
        return True
    return a == b


def from_json(v):
    if isinstance(v, list):
        return [from_json(x) for x in v]
    if isinstance(v, dict):
        if len(v) == 1 and "$bytes" in v:
            return bytes.fromhex(v["$bytes"])
        if len(v) == 1 and "$map" in v:
            return {from_json(k): from_json(x) for k, x in v["$map"]}
        return {k: from_json(x) for k, x in v.items()}
    return v


def load(name):
    with open(VECTORS + name) as f:
        return json.load(f)
