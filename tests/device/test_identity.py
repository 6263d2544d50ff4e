# Identity: validation, secret key handling, atomic writes (including a power cut at every block write of
# a real LittleFS), and the HALs' file helpers.
import json
import os
from mptest import eq, ok, raises, note
from fwfakes import FakeHal, RamDev, lfs_mount, lfs_umount, tmpdir, rmtree
from carrier import identity, hal

KEY = "00112233445566778899aabbccddeeff"
GOOD = {"id": "88.123.99/pump-0001", "transport": "coap", "coap": "coap://127.0.0.1:5683", "key": KEY}


def _d(**kw):
    d = dict(GOOD)
    for k in kw:
        if kw[k] is None:
            d.pop(k, None)
        else:
            d[k] = kw[k]
    return d


def test_valid_identity_is_normalised():
    i = identity.parse(_d(id="88.123.99/pump-0001", mqtt="mqtt://broker"))
    eq(i.id, "88.123.99/pump-0001")
    i = identity.parse(_d(id="ab.c/x"))
    eq(i.id, "AB.C/x")
    eq(i.coap, ("127.0.0.1", 5683))
    eq(i.key, bytes.fromhex(KEY))
    eq(len(identity.fingerprint(i.key)), 8)
    ok(KEY not in identity.fingerprint(i.key))
    ok("key" not in identity.to_dict(i), "the file form never carries the key")


def test_urls():
    eq(identity.parse_url("coap://10.0.0.2", "coap"), ("10.0.0.2", 5683))
    eq(identity.parse_url("mqtt://h:1884/", "mqtt"), ("h", 1884))
    eq(identity.parse_url("coap://[::1]:5700", "coap"), ("::1", 5700))
    for bad in ("http://h", "coap://", "coap://h:0", "coap://h:x", "coap://h:70000", 5):
        raises(identity.IdentityError, identity.parse_url, bad, "coap")


def test_invalid_identities_have_reasons():
    cases = [
        (_d(id="nosep"), "NO_SEPARATOR"),
        (_d(id=None), "EMPTY"),
        (_d(transport="http"), "transport"),
        (_d(coap=None), "no coap"),
        (_d(transport="mqtt"), "no mqtt"),
        (_d(key="zz"), "hex"),
        (_d(key="0011"), "16-32"),
        (_d(key=None), "16-32"),
        ([1], "object"),
    ]
    for d, frag in cases:
        e = raises(identity.IdentityError, identity.parse, d)
        ok(frag in str(e), "%r: %s" % (frag, e))


def test_load_save_key_goes_to_secret_store():
    root = tmpdir("id")
    try:
        h = FakeHal(root)
        eq(identity.load(h), None, "unprovisioned")
        i = identity.parse(GOOD)
        identity.save(h, i)
        raw = open(root + "identity.json").read()
        ok(KEY not in raw, "key not in identity.json")
        eq(h.kv["key"], bytes.fromhex(KEY))
        j = identity.load(h)
        eq((j.id, j.key, j.coap), (i.id, i.key, i.coap))
        with open(root + "identity.json", "w") as f:
            f.write("{not json")
        raises(identity.IdentityError, identity.load, h)
        identity.erase(h)
        eq(identity.load(h), None)
        eq(h.kv.get("key"), None)
    finally:
        rmtree(root[:-1])


def test_stale_temp_file_is_ignored():
    root = tmpdir("id")
    try:
        h = FakeHal(root)
        identity.save(h, identity.parse(GOOD))
        with open(root + "identity.json.tmp", "w") as f:  # power cut while writing the next identity
            f.write('{"id": "88.1/half-writ')
        eq(identity.load(h).id, "88.123.99/pump-0001")
        identity.save(h, identity.parse(_d(id="88.1/next")))
        eq(identity.load(h).id, "88.1/next")
        ok("identity.json.tmp" not in os.listdir(root[:-1]))
    finally:
        rmtree(root[:-1])


def test_power_cut_at_every_write_on_littlefs():
    dev = RamDev()
    root = lfs_mount(dev, fresh=True)
    h = FakeHal(root)
    try:
        identity.save(h, identity.parse(_d(id="88.1/old")))
        dev.snaps = []
        identity.save(h, identity.parse(_d(id="88.1/new-identity-with-a-longer-name")))
        snaps = dev.snaps
        dev.snaps = None
    finally:
        lfs_umount()
    seen = set()
    for img in snaps:
        d2 = RamDev()
        d2.data[:] = img
        lfs_mount(d2, "/cut")
        try:
            h2 = FakeHal("/cut/")
            h2.kv = h.kv  # the secret store (NVS) is not part of the file system
            got = identity.load(h2)
            seen.add(got.id)
        finally:
            lfs_umount("/cut")
    ok(seen <= {"88.1/old", "88.1/new-identity-with-a-longer-name"}, repr(seen))
    ok("88.1/new-identity-with-a-longer-name" in seen)
    note(len(snaps), "power-cut images, each loads the old or the new identity")


def test_atomic_write_replaces_and_read_missing():
    root = tmpdir("id")
    try:
        p = root + "f"
        eq(hal.read(p), None)
        hal.write_atomic(p, b"1")
        hal.write_atomic(p, b"22")
        eq(hal.read(p), b"22")
        ok(hal.remove(p))
        ok(not hal.remove(p))
    finally:
        rmtree(root[:-1])


def test_unix_hal_net_switch_kv_rtc_board():
    from carrier.hal import unix

    root = tmpdir("hal")
    try:
        with open(root + "board.json", "w") as f:
            json.dump({"name": "unix", "status_led": None, "button": None, "console": {"kind": "stdio"}}, f)
        h = unix.Hal(root=root, uid="0a0b")
        eq(h.uid(), b"\x0a\x0b")
        eq(h.board.name, "unix")
        now = h.ticks()
        h.net_poll(now)
        ok(h.net_up())
        with open(root + "netdown", "w") as f:  # a test flips the switch from outside
            f.write("x")
        h.net_poll(now + 1000)
        ok(not h.net_up())
        h.net_set(True)
        h.net_poll(now + 2000)
        ok(h.net_up())
        h.kv_set("boot", b"\x01")
        eq(h.kv_get("boot"), b"\x01")
        h.kv_del("boot")
        eq(h.kv_get("boot"), None)
        h.rtc_set(b"abc")
        eq(h.rtc_get(), b"abc")
        raises(hal.Reset, h.reset)
        from carrier.hal import boardfile

        b = boardfile.load(root + "missing.json")
        eq((b.led, b.button, b.console), (None, None, "stdio"))
    finally:
        rmtree(root[:-1])
