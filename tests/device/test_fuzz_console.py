# Fuzzing the serial console (carrier/console.py) of a running device (fwfakes.Rig: the real app on the fake
# HAL with a loopback CoAP gateway): random bytes, invalid UTF-8, control characters, very long lines, CR/LF
# mixes, and real commands with random arguments, in text and JSON mode. The app's step() never raises, in
# JSON mode every output line is one JSON object, the device keeps reporting, and afterwards `status` still
# answers. Seeded and bounded (fuzzlib.py); `reboot`, `provision` and the factory-reset YES are left out
# (they end the device under test on purpose).
import json
from mptest import eq, ok, note
import fuzzlib as F
from fwfakes import Rig
from carrier import log

COMMANDS = (
    "help",
    "id",
    "status",
    "resolve",
    "report",
    "net",
    "config",
    "config get",
    "config set",
    "log",
    "selftest",
    "factory-reset",
    "json on",
    "json off",
    "",
    "x",
    "RESOLVE",
    "c_help",
    "__init__",
    "run",
    "reply",
    "feed",
    "-",
    "--",
    "json",
    "net up",
    "net down",
)
WORDS = (
    "88.123.99/PUMP-0001",
    "88.1/missing-1",
    "0.NA/88.1",
    "interval",
    "transport",
    "coap",
    "mqtt",
    "id",
    "key",
    "meta",
    "10",
    "5",
    "86401",
    "-1",
    "99999999999999999999999",
    "0x10",
    "1e3",
    "URL",
    "on",
    "off",
    "coap://127.0.0.1:1",
    "mqtt://[::1]:1883",
    "\u00e9\u6c34",
    "\U0001f600",
    "a" * 120,
    "/",
    "%",
    "\\",
    '"',
    "{}",
    "null",
    "nan",
)


def _line():
    k = F.below(8)
    if k == 0:
        return F.rbytes(F.below(40))
    if k == 1:
        return F.rbytes(F.pick((127, 128, 129, 200, 600)))
    if k == 2:  # invalid UTF-8 inside a command
        return b"resolve 88.1/" + F.pick(
            (b"\xc0\xaf", b"\xed\xa0\x80", b"\xff", b"\xe2\x82", b"\xf4\x90\x80\x80")
        )
    words = [F.pick(COMMANDS)] + [F.pick(WORDS) for _ in range(F.below(4))]
    b = " ".join(words).encode()
    if k == 3:
        b = F.mutate(b)
    if k == 4:  # backspaces, tabs, CRs in the middle
        i = F.below(len(b) + 1)
        b = b[:i] + F.pick((b"\x08", b"\x7f\x7f", b"\t", b"\r", b"\x1b[A", b"\x00", b"\x03")) + b[i:]
    return b


def _ending():
    return F.pick((b"\n", b"\r\n", b"\r", b"\n\n", b"\r\r\n", b""))


def test_fuzz_console_lines():
    F.seed("console")
    r = Rig()
    sent = 0
    try:
        r.boot()
        ok(r.run(3000, lambda: r.app.reporter.acked), "first report")
        acked = r.app.reporter.acked
        for i in range(F.rounds(250)):
            data = _line() + _ending()
            if data.strip() in (b"YES", b"reboot") or data.startswith(b"provision") or b"reboot" in data:
                continue
            json_mode = r.app.console.json
            r.hal.output()
            r.hal.inp.extend(data)
            sent += len(data)
            try:
                for _ in range(20):
                    r.app.step(r.hal.now)
                    r.srv.serve()
                    r.hal.now += 10
                    if not r.hal.inp:
                        break
            except Exception as e:
                raise AssertionError(
                    "step raised %s: %s after console input %s (seed %d)"
                    % (type(e).__name__, e, data.hex(), F.SEED)
                )
            out = r.hal.output()
            if json_mode and r.app.console.json:
                for ln in out.split("\n"):
                    if ln:
                        try:
                            obj = json.loads(ln)
                        except ValueError:
                            raise AssertionError("not JSON in JSON mode: %r after %s" % (ln, data.hex()))
                        ok(type(obj) is dict, ln)
            if r.app.console._confirm and F.chance(2):
                r.con("no")  # answer the factory-reset question with anything but YES
            if F.chance(25):
                r.run(200)
        ok(r.app.ident is not None, "still provisioned")
        r.app.console.json = False
        ok(r.run(200000, lambda: r.app.reporter.acked > acked), "reports go on")
        r.con("")  # end a line left half typed
        out = r.con("status")
        ok("boot: 1" in out, out)
        note(
            sent,
            "bytes in",
            F.rounds(250),
            "lines; errors",
            r.app.console.errors,
            "lines",
            r.app.console.lines,
        )
    finally:
        log.sink = log._print
        r.close()
