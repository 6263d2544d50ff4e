# The console's command table (docs/firmware.md#console), imported by console.py when the first command other
# than `status` or `json` arrives: a device nobody types at never loads it. run(con, cmd, args) finds c_<cmd>
# here; each returns the reply fields (a dict or (key, value) pairs), None when it answers later or itself, or
# raises UsageError / ValueError with the error text. The services behind the commands (identity changes,
# provisioning, factory reset, self test) live here too, so the loop's module, app.py, holds only the device.
# The key is never shown: only its fingerprint.
import gc
import os

from carrier import VERSION, hal, idsyntax, identity, log
from carrier.console import UsageError

HELP = ("help", "id", "status", "resolve <id> [type]", "report", "net [up|down]", "config get [key]",
        "config set <key> <value>", "log [n]", "selftest", "reboot", "factory-reset", "json on|off",
        "provision <id> <coap://|mqtt://host:port> [key-hex]")
_SOURCES = {-2: "device-revalidated", -1: "device-cache", 0: "zone", 1: "cache", 2: "upstream", 3: "stale"}


def run(con, cmd, a):
    fn = globals().get("c_" + cmd.replace("-", "_"))
    if fn is None:
        raise UsageError("unknown command (try help)")
    return fn(con, a)


def c_help(con, a):
    return [("commands", list(HELP))]


def c_id(con, a):
    app = con.app
    i = app.ident
    d = [("id", i.id if i else None)]
    if i:
        d += [("transport", i.transport), ("key", identity.fingerprint(i.key))]
    else:
        d.append(("error", app.ident_error or "not provisioned"))
    return d + [("uid", app.hal.uid().hex()), ("board", app.hal.board.name), ("fw", VERSION)]


def c_resolve(con, a):
    if not 1 <= len(a) <= 2:
        raise UsageError("usage: resolve <id> [type]")
    app = con.app
    try:
        target = idsyntax.parse(a[0])
    except idsyntax.IdentifierError as e:
        raise UsageError("bad identifier: " + e.reason)
    t = app.transport
    if t is None:
        raise UsageError("no transport (safe mode or not provisioned)")
    if not app.transport_on:
        raise UsageError("offline")

    def resolved(res):
        code, ident, values, src, msg = res
        d = [("id", ident), ("code", code), ("source", _SOURCES.get(src, src))]
        if values is not None:
            d.append(("values", values))
        con.reply("resolve", d, None if code == 1 else (msg or "code %d" % code))

    if not t.resolve(target, resolved, a[1] if len(a) > 1 else None):
        raise UsageError("busy: try again")
    return None  # answered by resolved()


def c_report(con, a):
    r = con.app.reporter
    if not r:
        raise ValueError("no reporter (safe mode or not provisioned)")
    seq = r.make(con.app.up_ms // 1000)
    return [("seq", seq), ("queue", con.app.queue.count)]


def c_net(con, a):
    if a and a[0] not in ("up", "down"):
        raise UsageError("usage: net [up|down]")
    app = con.app
    h = app.hal
    if a:
        h.net_set(a[0] == "up", app.ident.wifi if app.ident else None)
    return [("net", "up" if h.net_up() else "down"), ("rssi", h.rssi()), ("transport_on", app.transport_on)]


def c_config(con, a):
    app = con.app
    n = len(a)
    if n and n <= 2 and a[0] == "get":
        i = app.ident
        d = []
        if i:
            d = [("id", i.id), ("transport", i.transport), ("coap", i.urls.get("coap")),
                 ("mqtt", i.urls.get("mqtt")), ("key", identity.fingerprint(i.key))]
        d += [("interval", app.cfg.interval), ("cfgver", app.cfg.cfgver), ("meta", app.cfg.meta),
              ("board", app.hal.board.name), ("fw", VERSION)]
        if n == 1:
            return d
        for kv in d:
            if kv[0] == a[1]:
                return [kv]
        raise ValueError("unknown key: " + a[1])
    if n != 3 or a[0] != "set":
        raise UsageError("usage: config get [key] | config set <key> <value>")
    key, value = a[1], a[2]
    if key == "interval":
        try:
            s = int(value)
        except ValueError:
            raise ValueError("interval must be a number of seconds")
        from carrier import config
        config.set_interval(app.cfg, s)
        return {"interval": s}
    if key not in ("transport", "coap", "mqtt"):
        raise ValueError("settable keys: interval, transport, coap, mqtt")
    if app.ident is None:
        raise ValueError("not provisioned")
    base = app.pending or app.ident
    d = identity.to_dict(base)
    d[key] = value
    new = identity.parse(d, base.key)
    identity.save(app.hal, new)
    app.pending = new  # applied at the next boot
    return [(key, value), ("note", "saved; reboot to apply")]


def c_log(con, a):
    try:
        n = int(a[0]) if a else 20
    except ValueError:
        raise UsageError("usage: log [n]")
    return {"lines": log.tail(n)}


def c_selftest(con, a):
    from carrier import devicemsg
    app = con.app
    c = {}
    try:
        m = {2: "0.NA/TEST", 24: True}  # a `status` message: id, online
        c["cbor"] = devicemsg.decode("status", devicemsg.encode("status", m)) == m
    except ValueError:
        c["cbor"] = False
    p = app.hal.root + "selftest.tmp"
    try:
        hal.write_atomic(p, b"selftest")
        c["fs"] = hal.read(p) == b"selftest"
        hal.remove(p)
    except OSError:
        c["fs"] = False
    c["identity"] = app.ident is not None
    c["queue"] = app.queue.errors == 0
    gc.collect()
    c["heap"] = gc.mem_free() > 16384
    c["net"] = bool(app.hal.net_up())
    c["transport"] = app.transport_on
    c["safe_mode"] = not app.safe
    ok = True
    for k in c:
        ok = ok and c[k]
    return [("pass", ok), ("checks", c)]


def c_reboot(con, a):
    con.app.request_reboot()
    return {"rebooting": True}


def c_factory_reset(con, a):
    con._confirm = True  # the next line must be YES (console.py)
    if con.json:
        con.write('{"ok": true, "cmd": "factory-reset", "confirm": "type YES"}\n')
    else:
        con.write("erase identity, config and queued reports? type YES to confirm\n")
    return None


def factory_reset(app):
    log.w("app", "factory reset")
    identity.erase(app.hal)
    hal.remove(app.hal.root + "config.json")
    app.queue.clear()
    if app.transport_on:
        app._stop()
    app.transport = None
    app._streak(None)
    app.request_reboot()


def c_provision(con, a):
    if not 2 <= len(a) <= 3:
        raise UsageError("usage: provision <id> <coap://host:port|mqtt://host:port> [key-hex]")
    app = con.app
    text, url = a[0], a[1]
    keyhex = a[2] if len(a) == 3 else None
    if app.ident is not None:
        raise ValueError("already provisioned (factory-reset first)")
    scheme = url.split(":", 1)[0]
    if scheme not in identity.TRANSPORTS:
        raise ValueError("gateway URL must start with coap:// or mqtt://")
    d = {"id": text, "transport": scheme, scheme: url}
    if keyhex is not None:
        d["key"] = keyhex
    new = identity.parse(d, None if keyhex is not None else os.urandom(16))
    identity.save(app.hal, new)
    fp = identity.fingerprint(new.key)
    log.i("app", "provisioned id=%s key=%s" % (new.id, fp))
    app.request_reboot()
    return [("id", new.id), ("key", fp), ("rebooting", True)]
