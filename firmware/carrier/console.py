# Serial console on the UART / stdin for a plain terminal and for tools. Bytes are read without blocking
# (at most READ_MAX per loop) into one preallocated line buffer; backspace edits; a line that is too long,
# holds control bytes or is not UTF-8 gets an error reply and is discarded. Every reply is either text
# ("key: value" lines, "error: ...") or, after `json on`, exactly one JSON object per line:
#   {"ok": true, "cmd": "status", ...}   {"ok": false, "cmd": "x", "error": "..."}   {"log": "I app ..."}
# `resolve` answers later (when the gateway does), as its own line. The key is never shown: only its
# fingerprint. `factory-reset` asks for confirmation: the next line must be YES.
import json
from micropython import const

from carrier import log

MAXLINE = 128
_READ_MAX = const(64)
HELP = ("help", "id", "status", "resolve <id> [type]", "report", "net [up|down]", "config get [key]",
        "config set <key> <value>", "log [n]", "selftest", "reboot", "factory-reset", "json on|off",
        "provision <id> <coap://|mqtt://host:port> [key-hex]")


class Console:
    def __init__(self, app, write, echo=False):
        self.app = app
        self.write = write
        self.echo = echo
        self.json = False
        self._line = bytearray(MAXLINE)
        self._len = 0
        self._over = False
        self._bad = False
        self._after_cr = False
        self._one = bytearray(1)
        self._one_view = memoryview(self._one)
        self._confirm = False
        self.eof = False
        self.lines = self.errors = 0

    # -- input
    def poll(self, read):
        """Consume what is waiting on the console; read(mv1) -> 1 byte, 0 nothing, -1 closed."""
        for _ in range(_READ_MAX):
            r = read(self._one_view)
            if r <= 0:
                if r < 0:
                    self.eof = True
                return
            self.feed(self._one[0])

    def feed(self, c):
        if c == 10 or c == 13:
            if c == 10 and self._after_cr:  # the LF of a CRLF
                self._after_cr = False
                return
            self._after_cr = c == 13
            if self.echo and not self.json:
                self.write("\r\n")
            self._end_line()
            return
        self._after_cr = False
        if c == 8 or c == 127:
            if self._len:
                self._len -= 1
                if self.echo and not self.json:
                    self.write("\b \b")
            return
        if c == 9:
            c = 32
        if c < 32:
            self._bad = True
            return
        if self._len >= MAXLINE:
            self._over = True
            return
        self._line[self._len] = c
        self._len += 1
        if self.echo and not self.json and c < 128:
            self.write(chr(c))

    def _end_line(self):
        n, over, bad = self._len, self._over, self._bad
        self._len = 0
        self._over = self._bad = False
        if over:
            self.errors += 1
            self.reply("?", None, "line too long (max %d bytes)" % MAXLINE)
            return
        if bad:
            self.errors += 1
            self.reply("?", None, "bad input: control characters")
            return
        try:
            text = str(self._line[:n], "utf-8")
        except UnicodeError:
            self.errors += 1
            self.reply("?", None, "bad input: not UTF-8")
            return
        words = text.split()
        if self._confirm:
            self._confirm = False
            if words == ["YES"]:
                self.reply("factory-reset", {"erased": True})
                self.app.factory_reset()
            else:
                self.reply("factory-reset", None, "cancelled")
            return
        if not words:
            return
        self.lines += 1
        self.run(words)

    def run(self, words):
        cmd = words[0]
        fn = getattr(self, "c_" + cmd.replace("-", "_"), None)
        if fn is None:
            self.reply(cmd, None, "unknown command (try help)")
            return
        try:
            r = fn(words[1:])
        except UsageError as e:
            self.reply(cmd, None, str(e))
            return
        except Exception as e:  # a command must never take the device down
            log.e("con", "%s failed: %s %s" % (cmd, type(e).__name__, e))
            self.reply(cmd, None, "%s: %s" % (type(e).__name__, e))
            return
        if r is not None:
            self.reply(cmd, r)

    # -- output
    def reply(self, cmd, fields, error=None):
        """fields: a dict or a list of (key, value) pairs (kept in order)."""
        w = self.write
        items = fields.items() if type(fields) is dict else (fields or ())
        if self.json:
            w('{"ok": %s, "cmd": %s' % ("true" if error is None else "false", json.dumps(cmd)))
            if error is not None:
                w(', "error": ' + json.dumps(error))
            for k, v in items:
                w(", %s: %s" % (json.dumps(k), json.dumps(_jsonable(v))))
            w("}\n")
            return
        if error is not None:
            w("error: %s\n" % error)
        for k, v in items:
            if type(v) is list:
                w("%s:\n" % k)
                for x in v:
                    w("  %s\n" % (" ".join(str(y) for y in x) if type(x) is list else x))
            elif type(v) is dict:
                w("%s:\n" % k)
                for x in v:
                    w("  %s: %s\n" % (x, v[x]))
            else:
                w("%s: %s\n" % (k, v))

    def log_line(self, line):
        """The log sink: one JSON object per line in JSON mode."""
        if self.json:
            self.write(json.dumps({"log": line}) + "\n")
        else:
            self.write(line + "\n")

    # -- commands
    def c_help(self, a):
        return [("commands", list(HELP))]

    def c_json(self, a):
        if a not in (["on"], ["off"]):
            raise UsageError("usage: json on|off")
        self.json = a[0] == "on"
        return {"json": self.json}

    def c_id(self, a):
        return self.app.info_id()

    def c_status(self, a):
        return self.app.info_status()

    def c_resolve(self, a):
        if not 1 <= len(a) <= 2:
            raise UsageError("usage: resolve <id> [type]")
        err = self.app.resolve(a[0], self._resolved, a[1] if len(a) > 1 else None)
        if err:
            raise UsageError(err)
        return None  # answered by _resolved

    def _resolved(self, res):
        code, ident, values, src, msg = res
        d = [("id", ident), ("code", code), ("source", _SOURCES.get(src, src))]
        if values is not None:
            d.append(("values", values))
        self.reply("resolve", d, None if code == 1 else (msg or "code %d" % code))

    def c_report(self, a):
        return self.app.report_now()

    def c_net(self, a):
        if a and a[0] not in ("up", "down"):
            raise UsageError("usage: net [up|down]")
        if a:
            self.app.set_net(a[0] == "up")
        return self.app.info_net()

    def c_config(self, a):
        if a and a[0] == "get" and len(a) <= 2:
            return self.app.config_get(a[1] if len(a) == 2 else None)
        if len(a) == 3 and a[0] == "set":
            return self.app.config_set(a[1], a[2])
        raise UsageError("usage: config get [key] | config set <key> <value>")

    def c_log(self, a):
        try:
            n = int(a[0]) if a else 20
        except ValueError:
            raise UsageError("usage: log [n]")
        return {"lines": log.tail(n)}

    def c_selftest(self, a):
        return self.app.selftest()

    def c_reboot(self, a):
        self.app.request_reboot()
        return {"rebooting": True}

    def c_factory_reset(self, a):
        self._confirm = True
        if self.json:
            self.write('{"ok": true, "cmd": "factory-reset", "confirm": "type YES"}\n')
        else:
            self.write("erase identity, config and queued reports? type YES to confirm\n")
        return None

    def c_provision(self, a):
        if not 2 <= len(a) <= 3:
            raise UsageError("usage: provision <id> <coap://host:port|mqtt://host:port> [key-hex]")
        return self.app.provision(a[0], a[1], a[2] if len(a) == 3 else None)


class UsageError(ValueError):
    pass


_SOURCES = {-2: "device-revalidated", -1: "device-cache", 0: "zone", 1: "cache", 2: "upstream", 3: "stale"}


def _jsonable(v):
    t = type(v)
    if t is bytes or t is bytearray:
        return {"hex": v.hex()}
    if t is list or t is tuple:
        return [_jsonable(x) for x in v]
    if t is dict:
        d = {}
        for k in v:
            d[str(k)] = _jsonable(v[k])
        return d
    return v
