# The reporter on its own: report contents, scheduling (interval changes), one report in flight, backoff
# after no answer, drop on a permanent rejection, the sensor hook (faulty sensors do not stop reports).
from mptest import eq, ok
from fwfakes import FakeHal, tmpdir, rmtree
from carrier import devicemsg, log
from carrier.queue import Queue
from carrier.reporter import Reporter, RETRY_MIN


class T:
    """A transport double: records report() calls, answers when told to."""

    def __init__(self):
        self.sent = []
        self.cb = None
        self.ok = True

    def ready(self):
        return self.ok

    def report(self, payload, boot, seq, cb):
        self.sent.append((boot, seq, bytes(payload)))
        self.cb = cb
        return True


def _with(fn):
    d = tmpdir("rep")
    try:
        h = FakeHal(d)
        q = Queue(d + "q.dat")
        r = Reporter(h, "88.1/dev", q, 7, 60, "unix", "0.1.0")
        fn(h, q, r)
    finally:
        rmtree(d[:-1])


def test_report_fields():
    def t(h, q, r):
        h.wall = 1_750_000_000
        r.start(h.now)
        r.poll(h.now, None, 12)
        eq(q.count, 1)
        m = devicemsg.decode("report", q.payload(0))
        eq(
            (m[2], m[10], m[11], m[12], m[14], m[15], m[16], m[17], m[19], m[25]),
            ("88.1/dev", 7, 1, 12, -61, 0, "unix", "0.1.0", 0, 1_750_000_000),
        )
        ok(m[13] > 0)
        h.wall = 0
        r.make(13)
        ok(25 not in devicemsg.decode("report", q.payload(1)), "no time when the clock is unknown")

    _with(t)


def test_interval_change_before_the_first_report_keeps_it_immediate():
    def t(h, q, r):
        r.start(h.now)
        r.set_interval(45)  # remote config applied before the first poll
        r.poll(h.now, None, 0)
        eq(r.seq, 1)
        r.poll(h.now + 44999, None, 44)
        eq(r.seq, 1)
        r.poll(h.now + 45000, None, 45)
        eq(r.seq, 2)
        r.set_interval(3600)  # longer: the already scheduled report still comes
        r.poll(h.now + 90000, None, 90)
        eq(r.seq, 3)
        r.set_interval(10)  # shorter: brought forward
        r.poll(h.now + 100000, None, 100)
        eq(r.seq, 4)

    _with(t)


def test_one_in_flight_backoff_and_drain():
    def t(h, q, r):
        tr = T()
        r.start(h.now)
        r.poll(h.now, tr, 0)
        r.make(0)
        r.make(0)
        eq([s[1] for s in tr.sent], [1], "one report in flight")
        tr.cb(devicemsg.NO_RESPONSE, 7, 1)
        r.poll(h.now + RETRY_MIN - 1, tr, 1)
        eq(len(tr.sent), 1, "backs off")
        r.poll(h.now + RETRY_MIN, tr, 2)
        eq([s[1] for s in tr.sent], [1, 1], "retries the oldest")
        tr.cb(devicemsg.UPSTREAM_UNAVAILABLE, 7, 1)
        r.poll(h.now + 3 * RETRY_MIN - 1, tr, 3)
        eq(len(tr.sent), 2, "doubled backoff")
        r.poll(h.now + 3 * RETRY_MIN, tr, 3)
        tr.cb(devicemsg.OK, 7, 1)
        r.poll(h.now + 3 * RETRY_MIN, tr, 3)
        tr.cb(devicemsg.OK, 7, 2)
        r.poll(h.now + 3 * RETRY_MIN, tr, 3)
        tr.cb(devicemsg.OK, 7, 3)
        eq((q.count, r.acked, r.failed), (0, 3, 2))
        eq([s[1] for s in tr.sent], [1, 1, 1, 2, 3])

    _with(t)


def test_permanent_rejection_drops_the_report():
    def t(h, q, r):
        tr = T()
        r.start(h.now)
        r.poll(h.now, tr, 0)
        tr.cb(devicemsg.FORBIDDEN, 7, 1)
        eq((q.count, r.rejected), (0, 1))
        ok("rejected code=403" in log.tail(1)[0])
        r.make(0)
        r.poll(h.now, tr, 0)
        tr.cb(devicemsg.BAD_REQUEST, 7, 2, 30)  # 4.00: a Max-Age with it changes nothing, dropped
        eq((q.count, r.rejected, r.deferred, r.failed), (0, 2, 0, 0))
        r.poll(h.now + 59999, tr, 59)
        eq([s[1] for s in tr.sent], [1, 2], "neither is sent again")

    _with(t)


def test_sensor_hook_and_faulty_sensors():
    def t(h, q, r):
        r.sensors = lambda: {"temp": 21.5, "door": True, "label": "A"}
        r.make(0)
        eq(devicemsg.decode("report", q.payload(0))[18], {"temp": 21.5, "door": True, "label": "A"})
        r.sensors = lambda: {"bad": [1, 2]}
        r.make(0)
        ok(18 not in devicemsg.decode("report", q.payload(1)), "invalid sensor values are left out")

        def boom():
            raise OSError(5)

        r.sensors = boom
        r.make(0)
        eq(q.count, 3, "a failing sensor does not stop the report")

    _with(t)


def test_come_back_later_waits_exactly_max_age_without_backoff():
    def t(h, q, r):
        tr = T()
        r.start(h.now)
        r.poll(h.now, tr, 0)
        tr.cb(devicemsg.NO_RESPONSE, 7, 1)  # a failure first: the backoff is now doubled
        r.poll(h.now + RETRY_MIN, tr, 2)
        eq(len(tr.sent), 2)
        tr.cb(devicemsg.UPSTREAM_UNAVAILABLE, 7, 1, 30)  # 5.03 + Max-Age 30: overloaded
        r.poll(h.now + RETRY_MIN + 29999, tr, 31)
        eq(len(tr.sent), 2, "waits what the gateway asked, not its own backoff")
        r.poll(h.now + RETRY_MIN + 30000, tr, 32)
        eq(len(tr.sent), 3, "then sends the same report again")
        eq(tr.sent[-1][:2], (7, 1))
        tr.cb(devicemsg.RATE_LIMITED, 7, 1, 0)  # 4.29 + Max-Age 0: at once
        r.poll(h.now + RETRY_MIN + 30000, tr, 32)
        eq(len(tr.sent), 4)
        eq((q.count, r.failed, r.deferred, r.rejected), (1, 1, 2, 0), "kept; deferred is not a failure")
        tr.cb(devicemsg.UPSTREAM_UNAVAILABLE, 7, 1)  # 5.03 without a time: the device's own backoff (4 s now)
        r.poll(h.now + RETRY_MIN + 30000 + 2 * RETRY_MIN - 1, tr, 33)
        eq(len(tr.sent), 4, "doubled backoff kept from before the 5.03s")
        r.poll(h.now + RETRY_MIN + 30000 + 2 * RETRY_MIN, tr, 33)
        eq((len(tr.sent), r.failed), (5, 2))
        tr.cb(devicemsg.OK, 7, 1)
        eq((q.count, r.acked), (0, 1))

    _with(t)
