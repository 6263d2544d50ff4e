# The device as a whole, on a fake HAL (settable clock, network switch, console) against a loopback CoAP
# gateway served from the test: provisioning mode, boot counter and seq, crash streak and safe mode, first
# report and resolve, offline queueing and drain, remote config, and the key never reaching any output.
from mptest import eq, ok, raises, note
from carrier import app as A, log, devicemsg, identity

from fwfakes import Rig, KEY, ID


def _with(fn, **kw):
    r = Rig(**kw)
    try:
        fn(r)
    finally:
        log.sink = log._print
        r.close()


def test_provisioning_mode_and_provision():
    def t(r):
        a = r.boot()
        eq((a.ident, a.transport, a.reporter), (None, None, None))
        out = r.con("status")
        ok("id: None" in out, out)
        out = r.con("provision 88.1/new coap://127.0.0.1:%d" % r.srv.port)
        ok("rebooting: True" in out, out)
        ok(a._reboot)
        a = r.boot()
        eq(a.ident.id, "88.1/new")
        ok(a.transport is not None)
        ok(len(a.ident.key) == 16)
        out = r.con("provision 88.1/other coap://h")
        ok("already provisioned" in out, out)

    _with(t, provision=False)


def test_invalid_identity_is_reported_not_fatal():
    def t(r):
        with open(r.root + "identity.json", "w") as f:
            f.write('{"id": "no-separator", "coap": "coap://h", "key": "%s"}' % KEY)
        a = r.boot()
        eq(a.ident, None)
        ok("NO_SEPARATOR" in a.ident_error)
        ok("NO_SEPARATOR" in r.con("id"))

    _with(t, provision=False)


def test_boot_counter_and_seq_restart():
    def t(r):
        a = r.boot()
        eq(a.boot_n, 1)
        ok(r.run(5000, lambda: a.reporter.acked))
        a.shutdown()
        a = r.boot()
        eq(a.boot_n, 2)
        ok(r.run(5000, lambda: a.reporter.acked))
        eq([(m[10], m[11]) for m in r.srv.reports], [(1, 1), (2, 1)])

    _with(t)


def test_safe_mode_after_three_quick_crashes():
    def t(r):
        for i in range(A.SAFE_AFTER):
            raises(RuntimeError, lambda: r.boot(fault="boot"))
        a = r.boot(fault="boot")  # the fourth boot does not reach the faulty code
        ok(a.safe)
        eq((a.transport, a.reporter), (None, None))
        ok("safe: True" in r.con("status"))
        ok("no transport" in r.con("resolve 88.1/x"))
        a.shutdown()  # a clean reboot (console `reboot`) clears the streak
        a = r.boot()
        ok(not a.safe)
        eq(a.streak, 1)
        r.run(A.STABLE_MS + 100)
        eq(r.hal.rtc[4], 0, "a stable boot clears the streak")

    _with(t)


def test_first_report_resolve_and_config():
    def t(r):
        r.srv.cfg = {20: 7, 21: 30, 22: {"URL": "https://example.org/pump"}}
        a = r.boot()
        ok(r.run(5000, lambda: r.srv.reports and r.srv.cfg_acks and a.reporter.acked), "report + config")
        rep = devicemsg.check("report", r.srv.reports[0])
        eq((rep[2], rep[10], rep[11], rep[16], rep[17], rep[15]), (ID, 1, 1, "unix", "0.1.0", 0))
        ok(rep[13] > 0, "free heap")
        eq(r.srv.resolves[0], ID, "resolves its own identifier once")
        eq(r.srv.cfg_acks, [{2: ID, 20: 7, 3: 1}])
        eq((a.cfg.interval, a.reporter.interval, a.queue.count, a.queue.writes), (30, 30, 0, 0))
        ok("resolve id=" + ID + " code=1 values=1" in "\n".join(log.tail(20)))
        # the interval from the gateway paces the next reports
        ok(r.run(31000, lambda: len(r.srv.reports) >= 2))
        eq(r.srv.reports[1][11], 2)

    _with(t)


def test_a_newer_config_named_by_a_report_ack_is_fetched_once():
    def t(r):
        r.srv.cfg = {20: 7, 21: 30}
        a = r.boot()
        ok(r.run(5000, lambda: r.srv.cfg_acks and a.reporter.acked), "first config")
        ok(a.transport.observing(), "observing /cfg")
        # set while the gateway had forgotten the observation (a restart): no notification will come
        r.srv.cfg, r.srv.desired = {20: 8, 21: 40}, 8
        gets = r.srv.cfg_gets
        ok(r.run(35000, lambda: len(r.srv.cfg_acks) >= 2), "fetched after the next report ack")
        eq(r.srv.cfg_acks[1], {2: ID, 20: 8, 3: 1})
        eq((a.cfg.cfgver, a.cfg.interval), (8, 40))
        eq(r.srv.cfg_gets, gets + 1)
        n = len(r.srv.reports)
        ok(r.run(90000, lambda: len(r.srv.reports) >= n + 2), "two more reports, each acked naming cfgver 8")
        eq(r.srv.cfg_gets, gets + 1, "once per version, not after every ack")

    _with(t)


def test_offline_reports_queue_then_drain_in_order():
    def t(r):
        a = r.boot(interval=10)
        ok(r.run(3000, lambda: a.reporter.acked == 1))
        r.hal.net = False
        r.run(65000)
        ok(a.queue.count >= 6, "queued while offline: %d" % a.queue.count)
        ok(a.queue.writes >= 1, "batched to flash")
        eq(len(r.srv.reports), 1)
        r.hal.net = True
        ok(r.run(20000, lambda: a.queue.count == 0), "drained")
        seqs = [m[11] for m in r.srv.reports]
        eq(seqs, list(range(1, len(seqs) + 1)), "every report once, in order")
        ok(r.srv.reports[-1][15] >= 0)
        note("offline: %d reports queued, %d flash writes" % (len(seqs) - 1, a.queue.writes))

    _with(t)


def test_gateway_down_then_back():
    def t(r):
        a = r.boot(interval=10)
        r.srv.down = True
        r.run(40000)
        ok(a.queue.count >= 3)
        eq(r.srv.reports, [])
        r.srv.down = False
        ok(r.run(200000, lambda: a.queue.count == 0), "drained after the gateway returned")
        seqs = [m[11] for m in r.srv.reports]
        eq(sorted(set(seqs)), list(range(1, max(seqs) + 1)))

    _with(t)


def test_reports_survive_a_reboot_while_offline():
    def t(r):
        a = r.boot(interval=10)
        r.hal.net = False
        r.run(25000)
        n = a.queue.count
        ok(n >= 2)
        a.shutdown()  # flush before reset
        r.hal.net = True
        a = r.boot(interval=10)
        eq(a.queue.count, n, "the queued reports are back")
        ok(r.run(10000, lambda: a.queue.count == 0))
        eq(sorted((m[10], m[11]) for m in r.srv.reports)[:n], [(1, s) for s in range(1, n + 1)])

    _with(t)


def test_key_never_in_logs_or_console():
    def t(r):
        a = r.boot()
        r.run(2000, lambda: a.reporter.acked)
        out = ""
        for line in (
            "id",
            "status",
            "config get",
            "config get key",
            "json on",
            "id",
            "status",
            "log 100",
            "selftest",
        ):
            out += r.con(line)
        ok(KEY not in out and KEY.upper() not in out, "console output")
        ok(KEY not in "\n".join(log.tail(200)), "log ring")
        ok(identity.fingerprint(a.ident.key) in out)

    _with(t)


def test_overloaded_gateway_503_max_age_is_waited_out():
    # issue 14: a gateway past what it can commit answers a report 5.03 with Max-Age = when to come back; the
    # device keeps the report, sends nothing before then (no backoff of its own, no retransmission storm), and
    # counts it as deferred, not as a failure of the network
    def t(r):
        a = r.boot()
        ok(r.run(3000, lambda: a.reporter.acked == 1))
        rep, t0 = a.reporter, r.hal.now
        r.srv.overload = 7
        seq = rep.make(0)
        ok(r.run(1000, lambda: r.srv.posts == 2), "the report went out")
        ok(not r.run(6900, lambda: r.srv.posts > 2), "nothing sent within the 7 s the gateway asked for")
        eq((rep.deferred, rep.failed, rep.last_code, a.queue.count), (1, 0, 503, 1))
        ok(r.run(200, lambda: rep.deferred == 2), "sent again once the 7 s are over, and deferred again")
        eq((r.srv.posts, rep.failed), (3, 0), "a second 5.03: still no failure")
        r.srv.overload = None
        ok(r.run(7100, lambda: rep.acked == 2), "stored once the gateway has room")
        eq(r.srv.posts, 4, "one POST per Max-Age, none in between")
        eq((r.srv.reports[-1][10], r.srv.reports[-1][11]), (1, seq))
        eq((a.queue.count, a.transport.retrans, a.transport.errors, a.errors), (0, 0, 0, 0))
        ok(r.hal.now - t0 >= 14000)

    _with(t)


def test_permanent_refusal_400_drops_the_report():
    def t(r):
        a = r.boot()
        ok(r.run(3000, lambda: a.reporter.acked == 1))
        r.srv.refuse = 128  # 4.00: the gateway can never store this report
        a.reporter.make(0)
        ok(r.run(1000, lambda: a.reporter.rejected == 1))
        eq((a.queue.count, a.reporter.failed, a.reporter.deferred, a.reporter.last_code), (0, 0, 0, 400))
        n = r.srv.posts
        r.run(10000)
        eq(r.srv.posts, n, "dropped: never sent again")
        ok("rejected code=400" in "\n".join(log.tail(5)))

    _with(t)
