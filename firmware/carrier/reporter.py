# Self-report: every `interval` seconds a `report` (docs/protocol.md) goes into the flash queue, and the
# queue is drained oldest first, one report in flight, whenever a transport is ready. An acknowledgement
# (code 1, also for a duplicate) removes the report; no answer, 4.01, or a 5.xx/4.29 without a time backs off
# exponentially and retries the same report; a 5.03 or 4.29 that says when to come back (CoAP Max-Age: the
# gateway is overloaded or rate-limits us) keeps the report and waits exactly that long, counted as deferred,
# not as a failure; a permanent rejection (any other 4.xx) removes it so it cannot block the queue.
# (boot, seq) names every report: boot is persisted and incremented at each boot, seq restarts at 1.
import gc
import time
from micropython import const

from carrier import devicemsg, log

RETRY_MIN = 2000     # ms
_RETRY_MAX = const(300000)
_WAIT_MAX = const(86400)  # s: the longest wait a gateway may ask for (keeps ticks arithmetic in range)
# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_K_ID = const(2)            # mirrors devicemsg._K_ID
_K_BOOT = const(10)         # mirrors devicemsg._K_BOOT
_K_SEQ = const(11)          # mirrors devicemsg._K_SEQ
_K_UPTIME = const(12)       # mirrors devicemsg._K_UPTIME
_K_HEAP = const(13)         # mirrors devicemsg._K_HEAP
_K_RSSI = const(14)         # mirrors devicemsg._K_RSSI
_K_QUEUE = const(15)        # mirrors devicemsg._K_QUEUE
_K_BOARD = const(16)        # mirrors devicemsg._K_BOARD
_K_FW = const(17)           # mirrors devicemsg._K_FW
_K_SENSORS = const(18)      # mirrors devicemsg._K_SENSORS
_K_DROPPED = const(19)      # mirrors devicemsg._K_DROPPED
_K_TIME = const(25)         # mirrors devicemsg._K_TIME
_OK = const(1)              # mirrors devicemsg.OK
_UNAUTHORIZED = const(401)  # mirrors devicemsg.UNAUTHORIZED
_RATE_LIMITED = const(429)  # mirrors devicemsg.RATE_LIMITED
_UNAVAILABLE = const(503)   # mirrors devicemsg.UPSTREAM_UNAVAILABLE


class Reporter:
    def __init__(self, h, ident, q, boot, interval, board, fw):
        self.hal = h
        self.id = ident
        self.queue = q
        self.boot = boot
        self.interval = interval
        self.board = board
        self.fw_version = fw
        self.seq = 0
        self.sensors = None   # hook: () -> {name: int|float|str|bool} or None
        self.inflight = None  # (boot, seq) sent, waiting for its ack
        self.now = time.ticks_ms()
        self._next = None     # ticks of the next report; None until start()
        self._retry = self.now  # ticks before which nothing is sent
        self._backoff = RETRY_MIN
        self.acked = self.failed = self.rejected = self.deferred = 0
        self.last_code = None
        self.done = self._done  # the transport's callback, bound once (a bound method is an allocation)

    def start(self, now):
        """The first report is due at once."""
        self.now = now
        self._retry = self._next = now

    def set_interval(self, s):
        """A shorter interval brings the next report forward; a longer one applies after it."""
        if self._next is not None:
            t = time.ticks_add(self.now, s * 1000)
            if time.ticks_diff(t, self._next) < 0:
                self._next = t
        self.interval = s

    def make(self, uptime_s):
        """Build the next report and queue it; returns its seq."""
        self.seq += 1
        q = self.queue
        m = {_K_ID: self.id, _K_BOOT: self.boot, _K_SEQ: self.seq, _K_UPTIME: uptime_s, _K_HEAP: gc.mem_free(),
             _K_RSSI: self.hal.rssi(), _K_QUEUE: q.count, _K_BOARD: self.board, _K_FW: self.fw_version,
             _K_DROPPED: q.dropped}
        t = self.hal.time()
        if t:
            m[_K_TIME] = t
        if self.sensors:
            try:
                s = self.sensors()
                if s:
                    m[_K_SENSORS] = s
            except Exception as e:  # a sensor fault must not stop reporting
                log.w("rpt", "sensors failed: %s" % e)
        try:
            payload = devicemsg.encode("report", m)
        except devicemsg.WireError as e:  # a bad sensor value: report without sensors
            log.w("rpt", "report dropped sensors: %s" % e)
            m.pop(_K_SENSORS, None)
            payload = devicemsg.encode("report", m)
        q.put(self.boot, self.seq, payload, self.now)
        return self.seq

    def poll(self, now, t, uptime_s):
        """Make a report when due; hand the oldest queued one to transport t (None when offline)."""
        self.now = now
        if self._next is not None and time.ticks_diff(now, self._next) >= 0:
            self.make(uptime_s)
            self._next = time.ticks_add(now, self.interval * 1000)
        q = self.queue
        if t is None or self.inflight is not None or not q.count:
            return
        if time.ticks_diff(now, self._retry) < 0 or not t.ready():
            return
        boot, seq = q.key(0)
        if t.report(q.payload(0), boot, seq, self.done):
            if q.count and q.key(0) == (boot, seq):  # not already answered synchronously
                self.inflight = (boot, seq)

    def _done(self, code, boot, seq, wait_s=-1):
        """Transport callback: the gateway's report_ack code, or devicemsg.NO_RESPONSE; wait_s >= 0 when the
        gateway said how many seconds to wait before sending again (CoAP Max-Age on a 5.03 or 4.29)."""
        if self.inflight == (boot, seq):
            self.inflight = None
        self.last_code = code
        now = self.now
        if code == _OK:
            if self.queue.ack(boot, seq, now):
                self.acked += 1
            self._backoff = RETRY_MIN
            self._retry = now
        elif wait_s >= 0 and (code == _UNAVAILABLE or code == _RATE_LIMITED):
            # come back later: the report stays queued; neither a failure nor a reason to back off further
            self.deferred += 1
            self._retry = time.ticks_add(now, min(wait_s, _WAIT_MAX) * 1000)
        elif code < 0 or code == _RATE_LIMITED or code == _UNAUTHORIZED or code >= 500:
            # kept and retried with backoff: 4.01 means the gateway does not (yet) hold this device's key
            self.failed += 1
            self._retry = time.ticks_add(now, self._backoff)
            self._backoff = min(self._backoff * 2, _RETRY_MAX)
        else:
            self.rejected += 1
            log.w("rpt", "report boot=%d seq=%d rejected code=%d" % (boot, seq, code))
            self.queue.ack(boot, seq, now)
