# A device for tests/integration/test_oscore_interop.py (not a test module), run by the real micropython (MICROPYPATH=firmware):
#   micropython tests/device/oscore_device.py <data dir> <identity JSON> <action> [<action>...]
# It talks to the gateway with carrier.oscore.Client (identity "secure": true) or carrier.coap.Client, and
# prints one JSON line per action result, so the test can read them as they come:
#   resolve[=ID]       resolve ID (default: own id)            -> {"a": "resolve", "code": .., "values": ..}
#   report[=CLAIM]     POST a report claiming id CLAIM          -> {"a": "report", "code": ..}
#   path=ID            address /d/ID/... from now on (impersonation attempt)
#   cfg                GET /d/<id>/cfg (observe), then config_ack -> {"a": "cfg", "config": {..}} ...
#   notify             wait for one more config notification    -> {"a": "notify", "config": {..}}
#   measure            wire bytes and heap of plain vs OSCORE   -> {"a": "measure", ...}
import sys
import gc
import json
import time

from carrier import cbor, coap, identity, oscore
from carrier.hal.unix import Hal

WAIT_MS = 20000


def out(d):
    print(json.dumps(d))


def run(c, done, ms=WAIT_MS):
    t0 = time.ticks_ms()
    while not done() and time.ticks_diff(time.ticks_ms(), t0) < ms:
        c.poll(time.ticks_ms())
        time.sleep_ms(2)
    return done()


def make(ident, h):
    if ident.secure:
        return oscore.Client(ident, None, None, store=h)
    return coap.Client(ident)


def main():
    root, ident_json = sys.argv[1], sys.argv[2]
    h = Hal(root=root)
    ident = identity.parse(json.loads(ident_json))
    c = make(ident, h)
    c.start(time.ticks_ms())
    configs = []
    c.on_config = lambda pl: configs.append(cbor.loads(pl))
    seq = 0
    for action in sys.argv[3:]:
        name, _, arg = action.partition("=")
        res = []
        if name == "resolve":
            c.resolve(arg or ident.id, res.append)
            run(c, lambda: res)
            r = res[0] if res else (-9, None, None, 0, "timeout")
            out({"a": "resolve", "code": r[0], "id": r[1], "values": r[2], "msg": r[4]})
        elif name == "report":
            seq += 1
            pl = cbor.dumps(
                {2: arg or ident.id, 10: 1, 11: seq, 12: 5, 13: 100000, 14: 0, 15: 0, 16: "unix", 17: "test"}
            )
            c.report(pl, 1, seq, lambda code, b, s, *wait: res.append(code))
            run(c, lambda: res)
            out({"a": "report", "code": res[0] if res else -9})
        elif name == "path":
            c.idb = arg.encode()
        elif name == "cfg":
            c.get_config()
            run(c, lambda: configs)
            out({"a": "cfg", "config": configs[0] if configs else None, "observing": c._obs >= 0})
            if configs:
                ack = cbor.dumps({2: ident.id, 20: configs[0][20], 3: 1})
                c.cfg_ack(ack)
                idle = lambda: not any(ex.state for ex in c.exchanges)  # noqa: E731
                run(c, idle, 5000)
                out({"a": "cfg_ack", "done": idle()})
        elif name == "notify":
            n = len(configs)
            run(c, lambda: len(configs) > n)
            out({"a": "notify", "config": configs[-1] if len(configs) > n else None})
        elif name == "measure":
            measure(ident, h)
    out(
        {
            "a": "end",
            "errors": c.errors,
            "auth_fail": getattr(c, "auth_fail", 0),
            "seq": c.ctx.seq if ident.secure else -1,
        }
    )
    c.stop()


def measure(ident, h):
    """Wire bytes of one resolve request (own id) and heap of a client, plain vs OSCORE."""
    d = {"a": "measure"}
    for secure in (False, True):
        ident.secure = secure
        gc.collect()
        before = gc.mem_alloc()
        c = make(ident, h)
        gc.collect()
        heap = gc.mem_alloc() - before
        c.sock = None  # not started: build only
        ex = c.exchanges[0]
        ex.kind = 1
        ex.arg = ident.id
        ex.block = 0
        ex.etag = None
        ex.token = 0x1234
        c._build_get(ex)
        n = ex.length
        if secure:
            n = c._seal(ex, True)  # the protected request's length
        d["secure" if secure else "plain"] = {"request_bytes": n, "client_heap": heap}
    ident.secure = True
    out(d)


main()
