# Serial console on the UART / stdin for a plain terminal and for tools. Bytes are read without blocking
# (at most READ_MAX per loop) into one preallocated line buffer; backspace edits; a line that is too long,
# holds control bytes or is not UTF-8 gets an error reply and is discarded. Every reply is either text
# ("key: value" lines, "error: ...") or, after `json on`, exactly one JSON object per line:
#   {"ok": true, "cmd": "status", ...}   {"ok": false, "cmd": "x", "error": "..."}   {"log": "I app ..."}
# This module is the part a device always holds: line input, replies, the log sink, and the two commands tools
# poll (`status`, `json`). Every other command is in commands.py, imported when one first arrives.
# `factory-reset` asks for confirmation: the next line must be YES.
import json
from micropython import const

from carrier import log

MAXLINE = 128
_READ_MAX = const(64)


class UsageError(ValueError):
    pass


class Console:
    def __init__(self, app, write, read=None, echo=False):
        self.app = app
        self.write = write
        self.read = read  # read(mv1) -> 1 byte, 0 nothing, -1 closed
        self.echo = echo
        self.json = False
        self._line = bytearray(MAXLINE)
        self._one = memoryview(bytearray(1))  # read(mv1) puts a byte here
        self._len = 0
        self._over = self._bad = self._after_cr = self._confirm = self.eof = False
        self.lines = self.errors = 0

    # -- input
    def poll(self):
        """Consume what is waiting on the console."""
        read = self.read
        for _ in range(_READ_MAX):
            r = read(self._one)
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
                from carrier import commands
                commands.factory_reset(self.app)
            else:
                self.reply("factory-reset", None, "cancelled")
            return
        if not words:
            return
        self.lines += 1
        self.run(words)

    def run(self, words):
        cmd = words[0]
        a = words[1:]
        try:
            if cmd == "status":
                r = self.app.info_status()
            elif cmd == "json":
                if a != ["on"] and a != ["off"]:
                    raise UsageError("usage: json on|off")
                self.json = a[0] == "on"
                r = {"json": self.json}
            else:
                from carrier import commands  # the command table: loaded by the first other command
                r = commands.run(self, cmd, a)
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
