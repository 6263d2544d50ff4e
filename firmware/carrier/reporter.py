# Self-report: every `interval` seconds a `report` (docs/protocol.md) goes into the flash queue, and the
# queue is drained oldest first, one report in flight, whenever a transport is ready. An acknowledgement
# (code 1, also for a duplicate) removes the report; no answer or a 5.xx/4.29 backs off exponentially and
# retries the same report; a permanent rejection (other 4.xx) removes it so it cannot block the queue.
# (boot, seq) names every report: boot is persisted and incremented at each boot, seq restarts at 1.
import gc
import time
from micropython import const

from carrier import devicemsg, log

RETRY_MIN = 2000     # ms
_RETRY_MAX = const(300000)


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
        self.made = self.acked = self.failed = self.rejected = 0
        self.last_code = None

    def start(self, now, delay_ms=0):
        self.now = now
        self._retry = now
        self._next = time.ticks_add(now, delay_ms)

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
        m = {devicemsg.K_ID: self.id, devicemsg.K_BOOT: self.boot, devicemsg.K_SEQ: self.seq, devicemsg.K_UPTIME: uptime_s,
             devicemsg.K_HEAP: gc.mem_free(), devicemsg.K_RSSI: self.hal.rssi(), devicemsg.K_QUEUE: self.queue.count,
             devicemsg.K_BOARD: self.board, devicemsg.K_FW: self.fw_version, devicemsg.K_DROPPED: self.queue.dropped}
        t = self.hal.time()
        if t:
            m[devicemsg.K_TIME] = t
        if self.sensors:
            try:
                s = self.sensors()
                if s:
                    m[devicemsg.K_SENSORS] = s
            except Exception as e:  # a sensor fault must not stop reporting
                log.w("rpt", "sensors failed: %s" % e)
        try:
            payload = devicemsg.encode("report", m)
        except devicemsg.WireError as e:  # a bad sensor value: report without sensors
            log.w("rpt", "report dropped sensors: %s" % e)
            m.pop(devicemsg.K_SENSORS, None)
            payload = devicemsg.encode("report", m)
        self.queue.put(self.boot, self.seq, payload, self.now)
        self.made += 1
        return self.seq

    def poll(self, now, t, uptime_s):
        """Make a report when due; hand the oldest queued one to transport t (None when offline)."""
        self.now = now
        if self._next is not None and time.ticks_diff(now, self._next) >= 0:
            self.make(uptime_s)
            self._next = time.ticks_add(now, self.interval * 1000)
        if t is None or self.inflight is not None or not self.queue.count:
            return
        if time.ticks_diff(now, self._retry) < 0 or not t.ready():
            return
        boot, seq = self.queue.key(0)
        if t.report(self.queue.payload(0), boot, seq, self.done):
            if self.queue.count and self.queue.key(0) == (boot, seq):  # not already answered synchronously
                self.inflight = (boot, seq)

    def done(self, code, boot, seq):
        """Transport callback: the gateway's report_ack code, or devicemsg.NO_RESPONSE."""
        if self.inflight == (boot, seq):
            self.inflight = None
        self.last_code = code
        if code == devicemsg.OK:
            if self.queue.ack(boot, seq, self.now):
                self.acked += 1
            self._backoff = RETRY_MIN
            self._retry = self.now
        elif code == devicemsg.NO_RESPONSE or code == devicemsg.RATE_LIMITED or code == devicemsg.UNAUTHORIZED or code >= 500:
            # kept and retried with backoff: 4.01 means the gateway does not (yet) hold this device's key
            self.failed += 1
            self._retry = time.ticks_add(self.now, self._backoff)
            self._backoff = min(self._backoff * 2, _RETRY_MAX)
        else:
            self.rejected += 1
            log.w("rpt", "report boot=%d seq=%d rejected code=%d" % (boot, seq, code))
            self.queue.ack(boot, seq, self.now)
