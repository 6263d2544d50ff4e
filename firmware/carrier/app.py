# The device: boot sequence, then one cooperative poll loop.
#
# Why a poll loop and not uasyncio: every component is already a non-blocking state machine driven by
# poll(now) (CoAP exchanges, the MQTT client, reporter, queue, console), so one loop that calls them in
# turn and then sleeps in select.poll() on the sockets and the console for at most IDLE_MS is all the
# scheduling the device needs. It costs no task objects, closures or event-loop heap, keeps the longest
# blocking call visible (that one poll(), bounded), makes the watchdog feed point obvious (once per
# iteration: a stuck component trips it), and lets tests drive step(now) with a fake clock.
#
# Boot: board + identity (none -> console-only provisioning mode), boot counter (persisted) and a crash
# streak in RTC memory (SAFE_AFTER quick crashes in a row -> safe mode: console only, no network; the
# button held at boot does the same), config, queue, network, transport (coap or mqtt), one resolve of
# the device's own identifier (logged), then reports + queue drain + remote config + console. Transport
# errors are caught at its boundary, counted and retried with backoff: the device keeps running.
import gc
import sys
import time
import select
from micropython import const

from carrier import hal, log, unload

if False:  # for mypy only (MicroPython drops the block): the types boot() gives App's attributes
    from typing import Any
    from carrier.config import Config
    from carrier.console import Console
    from carrier.identity import Identity
    from carrier.queue import Queue
    from carrier.reporter import Reporter

SAFE_AFTER = 3         # crashes within STABLE_MS of boot, in a row, before safe mode
STABLE_MS = 60000      # uptime after which a boot counts as good
_IDLE_MS = const(50)           # longest sleep of the loop
_WDT_MS = const(30000)
_RETRY_MIN = const(2000)       # transport restart backoff
_RETRY_MAX = const(120000)
_CFG_REFRESH_MS = const(600000)  # re-register the CoAP /cfg observation
# collect after this many bytes allocated, not only when the heap is full: what lives long (imports, the state
# boot builds, cache entries) then takes the lowest free blocks instead of landing above garbage, and the free
# heap stays in one piece for the largest allocation the device makes (a received datagram: 1152 bytes)
_GC_EVERY = const(4096)
RTC_MAGIC = b"IDA1"


class App:
    # set by boot() (startup.py); the annotations cost nothing on the device
    boot_n: int
    streak: int
    console: "Console"
    cfg: "Config"
    queue: "Queue"
    ident: "Identity | None"
    reporter: "Reporter | None"
    transport: "Any"

    def __init__(self, h, wdt_ms=_WDT_MS, interval=None, fault=None):
        self.hal = h
        # for boot: watchdog ms, report interval until configured, test hook ("boot" raises after the crash
        # streak is counted, "hang" stops feeding the watchdog)
        self.args = (wdt_ms, interval, fault)
        self.poller = select.poll()
        self.ident = None
        self.ident_error = None
        self.transport = None
        self.transport_on = False
        self.reporter = None
        self.safe = False
        self.errors = 0
        self.last_error = None
        self.pending = None  # identity saved from the console, applied at the next boot
        self._retry = 0
        self._backoff = _RETRY_MIN
        self._reboot = False
        self._first = False    # own identifier resolved after the transport came up
        self._cfg_at = 0
        self._cfg_acked = 0  # reporter acks seen by the config check
        self._cfg_asked = 0  # the newer cfgver a report ack named and we fetched for
        self.up_ms = 0
        self._last = 0
        self._con_reg = False
        self._stable = False
        self._led = None

    # ---- boot
    def boot(self):
        gc.threshold(_GC_EVERY)
        from carrier import startup  # boot-only code, dropped again once the device runs (carrier.unload)
        try:
            startup.boot(self)
        finally:
            unload("startup", "identity", "idsyntax", "config", "hal.boardfile")
            gc.collect()  # their code and boot's garbage: the heap the device runs in starts in one piece

    def _streak(self, add):
        """Crash streak in RTC memory: +1 at each boot, 0 once stable or on a clean reboot."""
        d = self.hal.rtc_get()
        s = d[4] if len(d) >= 5 and d[:4] == RTC_MAGIC else 0
        s = 0 if add is None else min(s + add, 255)
        self.hal.rtc_set(RTC_MAGIC + bytes((s,)))
        return s

    # ---- loop
    def run(self):
        self.boot()
        h = self.hal
        while True:
            self.step(h.ticks())
            if self._reboot:
                self.shutdown()
                h.reset()
            if self.console.eof and self._con_reg:
                self.poller.unregister(h.con)
                self._con_reg = False
            for _ in self.poller.ipoll(_IDLE_MS):
                break

    def step(self, now):
        """One loop iteration: never blocks."""
        h = self.hal
        h.wdt_feed()
        self.up_ms += time.ticks_diff(now, self._last)
        self._last = now
        if not self._stable and self.up_ms >= STABLE_MS:
            self._stable = True
            if not self.safe:
                self._streak(None)
        t = self.transport
        if t is not None:
            h.net_poll(now)
            self._transport(t, now, h.net_up())
        if self.reporter:
            self.reporter.poll(now, t if self.transport_on else None, self.up_ms // 1000)
        self.queue.poll(now)
        self.console.poll()
        if self.transport_on != self._led:  # status LED: lit while the transport runs (written on change only)
            self._led = self.transport_on
            h.led(self._led)

    def _transport(self, t, now, net):
        if not net:
            if self.transport_on:
                log.w("net", "down: reports queue in flash")
                self._stop()
            return
        try:
            if not self.transport_on:
                if time.ticks_diff(now, self._retry) < 0:
                    return
                t.start(now)
                self.transport_on = True
                self._first = False
                self._cfg_at = now
                t.get_config()
                log.i("net", "%s started" % t.name)
            t.poll(now)
            i = self.ident
            if not self._first and i is not None and t.ready():
                self._first = True
                t.resolve(i.id, self._first_resolved)
            if time.ticks_diff(now, self._cfg_at) >= _CFG_REFRESH_MS and t.get_config():
                self._cfg_at = now
            r = self.reporter
            if r is not None and r.acked != self._cfg_acked:
                # CoAP: no observation when the last fetch found no desired config (a 4.04 ends it); fetch and
                # observe again after each acknowledged report, so a config set later arrives within an interval
                self._cfg_acked = r.acked
                if t.name == "coap" and not t.observing():
                    t.get_config()
            h = t.cfg_hint
            if h > self.cfg.cfgver and h != self._cfg_asked and t.get_config():
                # a report ack names a newer desired config than ours: it was set while we were not observing
                # (e.g. the gateway restarted and forgot the observation); fetch it now, once per version
                self._cfg_asked = h
            self._backoff = _RETRY_MIN
        except (OSError, ValueError) as e:  # socket errors; CoapError, MQTTError, WireError, CBORError
            self.errors += 1
            self.last_error = "%s: %s" % (type(e).__name__, e)
            log.w("net", "%s error %s; retry in %d ms" % (t.name, self.last_error, self._backoff))
            self._stop()
            self._retry = time.ticks_add(now, self._backoff)
            self._backoff = min(self._backoff * 2, _RETRY_MAX)

    def _stop(self):
        self.transport_on = False
        t = self.transport
        if t is None:
            return
        try:
            t.stop()
        except (OSError, ValueError):
            pass

    def _first_resolved(self, res):
        code, ident, values, src, msg = res
        log.i("app", "resolve id=%s code=%d values=%d src=%s%s" % (
            ident, code, len(values) if values else 0, src, " msg=" + msg if msg else ""))

    def _on_config(self, payload):
        from carrier import config  # only for a config change: dropped again afterwards
        try:
            code, v, msg = config.apply(self.cfg, payload)
            log.i("cfg", "cfgver=%d code=%d interval=%d%s" % (v, code, self.cfg.interval, " msg=" + msg if msg else ""))
            t = self.transport
            i = self.ident
            if self.transport_on and t is not None and i is not None:
                t.cfg_ack(config.ack_payload(i.id, code, v, msg))
        finally:
            unload("config")

    def _cfg_changed(self):
        if self.reporter:
            self.reporter.set_interval(self.cfg.interval)

    def shutdown(self, clean=True):
        """Before a reset or deep sleep: persist the queue; a clean one also clears the crash streak."""
        try:
            self.queue.flush()
        except (OSError, AttributeError):
            pass
        if clean:
            self._streak(None)
        if self.transport_on:
            self._stop()

    def request_reboot(self):
        self._reboot = True

    def deepsleep(self, ms):
        self.shutdown()
        self.hal.deepsleep(ms)

    # ---- the console's `status` (the other commands and their services: commands.py)
    def info_status(self):
        gc.collect()
        free = gc.mem_free()  # before the reply is built: the heap the device holds, not its answer
        used = gc.mem_alloc()
        r = self.reporter
        t = self.transport
        return [("id", self.ident.id if self.ident else None), ("boot", self.boot_n), ("seq", r.seq if r else 0),
                ("uptime", self.up_ms // 1000), ("safe", self.safe),
                ("net", "up" if self.hal.net_up() else "down"), ("rssi", self.hal.rssi()),
                ("transport", t.name if t else None), ("transport_on", self.transport_on),
                ("queue", self.queue.count), ("dropped", self.queue.dropped), ("acked", r.acked if r else 0),
                ("last_ack", r.last_code if r else None), ("interval", self.cfg.interval),
                ("cfgver", self.cfg.cfgver), ("heap_free", free), ("heap_used", used),
                ("errors", self.errors + (t.errors if t else 0)), ("last_error", self.last_error)]


def main(root=None, uid=None, board=None, wdt_ms=_WDT_MS, interval=None, fault=None):
    """Run the device forever; a reset on the unix port restarts it in-process."""
    while True:
        h = hal.load(root, uid, board)
        a = App(h, wdt_ms, interval, fault)
        try:
            a.run()
        except hal.Reset:
            continue
        except KeyboardInterrupt:
            try:
                a.shutdown()
            except AttributeError:  # interrupted during boot
                pass
            raise
        except Exception as e:  # a bug: log it, persist what we have, reset (counts towards safe mode)
            log.e("app", "crash %s: %s" % (type(e).__name__, e))
            sys.print_exception(e)
            a.shutdown(False)
            h.sleep_ms(500)
            try:
                h.reset()
            except hal.Reset:
                continue
