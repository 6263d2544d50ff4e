# Remote management: validation, apply, persistence (atomic), acknowledgement payloads, cfgver ordering.
from mptest import eq, ok, raises
from fwfakes import FakeHal, tmpdir, rmtree
from carrier import cbor, devicemsg
from carrier import config
from carrier.config import ack_payload, check_meta


def _with(fn):
    d = tmpdir("cfg")
    try:
        fn(FakeHal(d))
    finally:
        rmtree(d[:-1])


def test_apply_persist_and_reload():
    def t(h):
        c = config.load(h)
        changes = []
        c.on_change = lambda: changes.append(c.interval)
        eq((c.cfgver, c.interval, c.meta), (0, 60, {}))
        eq(config.apply(c, cbor.dumps({20: 3, 21: 30, 22: {"URL": "https://x/"}})), (1, 3, None))
        eq(changes, [30])
        c2 = config.load(h)
        eq((c2.cfgver, c2.interval, c2.meta), (3, 30, {"URL": "https://x/"}))
        eq(config.apply(c, cbor.dumps({20: 4})), (1, 4, None), "only cfgver: keeps interval and meta")
        eq((c.interval, c.meta), (30, {"URL": "https://x/"}))

    _with(t)


def test_not_newer_is_acknowledged_but_ignored():
    def t(h):
        c = config.load(h)
        config.apply(c, cbor.dumps({20: 5, 21: 100}))
        code, v, msg = config.apply(c, cbor.dumps({20: 5, 21: 20}))
        eq((code, v, c.interval), (1, 5, 100))
        ok("not newer" in msg)
        eq(config.apply(c, cbor.dumps({20: 2, 21: 20}))[:2], (1, 2))
        eq(c.interval, 100)

    _with(t)


def test_rejections():
    def t(h):
        c = config.load(h)
        cases = [
            (cbor.dumps({20: 1, 21: 9}), 1, "interval"),
            (cbor.dumps({20: 1, 21: 86401}), 1, "interval"),
            (cbor.dumps({20: 1, 21: "60"}), 1, "interval"),
            (cbor.dumps({21: 60}), 0, "cfgver"),
            (cbor.dumps({20: -1}), 0, "cfgver"),
            (cbor.dumps([20, 1]), 0, "map"),
            (b"\xff\x00", 0, ""),
            (b"", 0, ""),
            (cbor.dumps({20: 1, 22: {"a": 1}}), 1, "meta"),
            (cbor.dumps({20: 1, 22: {("k%d" % i): "v" for i in range(17)}}), 1, "entries"),
            (cbor.dumps({20: 1, 22: {"k": "v" * 600}}), 1, "bytes"),
        ]
        for payload, v, frag in cases:
            code, got_v, msg = config.apply(c, payload)
            eq((code, got_v), (400, v), repr(payload))
            ok(frag in msg, "%r in %r" % (frag, msg))
        eq((c.cfgver, c.interval, c.rejected), (0, 60, len(cases)))

    _with(t)


def test_ack_payloads_match_the_protocol():
    eq(devicemsg.decode("config_ack", ack_payload("88.1/x", 1, 3)), {2: "88.1/x", 20: 3, 3: 1})
    eq(
        devicemsg.decode("config_ack", ack_payload("88.1/x", 400, 3, "bad interval")),
        {2: "88.1/x", 20: 3, 3: 400, 9: "bad interval"},
    )


def test_local_interval_and_broken_file():
    def t(h):
        c = config.load(h)
        config.set_interval(c, 15)
        raises(ValueError, config.set_interval, c, 5)
        eq(config.load(h).interval, 15)
        with open(h.root + "config.json", "w") as f:
            f.write('{"cfgver": 2, "interval": 3}')
        c = config.load(h)
        eq((c.cfgver, c.interval), (0, 60))
        ok("ignored" in c.error)
        with open(h.root + "config.json", "w") as f:
            f.write("{garbage")
        ok(config.load(h).error)

    _with(t)


def test_check_meta():
    eq(check_meta({}), None)
    ok(check_meta([]))
    ok(check_meta({1: "x"}))
