# HAL for the MicroPython unix port: the host plays the chip. A data directory is the flash file system,
# sockets are the host's (loopback in tests), the unique id is configured, the network can be switched off
# with a flag file <data>/netdown (or `net down` on the console) so offline behaviour is testable, and the
# watchdog is a thread that kills the process (like a chip reset) when the main loop stops feeding it.
# Configuration (arguments win over the environment): IDA_DATA data dir (default ./ida-data),
# IDA_BOARD board file (default <data>/board.json), IDA_UID unique id as hex.
import os
import sys
import time
import select
from micropython import const

from carrier import hal as _h

_NET_CHECK_MS = const(500)

# one watchdog per process, like the hardware one: it survives an in-process reboot
_wdt_ms = 0
_fed = time.ticks_ms()
_wdt_thread = False


def _wdt_loop():
    while True:
        time.sleep_ms(100)
        if _wdt_ms and time.ticks_diff(time.ticks_ms(), _fed) > _wdt_ms:
            # $PPID of the shell is this process; SIGKILL is the closest thing to a hardware reset
            os.system("echo 'E hal watchdog expired' >&2; kill -9 $PPID")


def _mkdirs(path):
    p = ""
    for part in path.rstrip("/").split("/"):
        p = p + part + "/"
        if part and part != ".":
            try:
                os.mkdir(p)
            except OSError:
                pass


class Hal:
    def __init__(self, root=None, uid=None, board=None):
        root = root or os.getenv("IDA_DATA") or "ida-data"
        if not root.endswith("/"):
            root += "/"
        _mkdirs(root)
        _mkdirs(root + "kv")
        self.root = root
        from carrier.hal import boardfile
        self.board = boardfile.load(board or os.getenv("IDA_BOARD") or root + "board.json")
        if self.board.name == sys.platform:
            self.board.name = "unix"
        u = uid or os.getenv("IDA_UID")
        self._uid = bytes.fromhex(u) if u else b"\x02\x00\x00\x00\x00\x01"
        self._flag = root + "netdown"
        self._net = True
        self._checked = time.ticks_add(time.ticks_ms(), -_NET_CHECK_MS)
        self._led = False
        self.con = sys.stdin
        self._cin = sys.stdin.buffer
        self._console_poll = select.poll()
        self._console_poll.register(sys.stdin, select.POLLIN)
        self._eof = False

    # time
    def ticks(self):
        return time.ticks_ms()

    def time(self):
        return int(time.time())

    def sleep_ms(self, ms):
        time.sleep_ms(ms)

    def uid(self):
        return self._uid

    # network: always "connected" unless the netdown flag file exists
    def net_poll(self, now):
        if time.ticks_diff(now, self._checked) >= _NET_CHECK_MS:
            self._checked = now
            try:
                os.stat(self._flag)
                self._net = False
            except OSError:
                self._net = True

    def net_up(self):
        return self._net

    def net_set(self, on, wifi=None):
        if on:
            _h.remove(self._flag)
        else:
            with open(self._flag, "w") as f:
                f.write("down\n")
        self._net = bool(on)

    def rssi(self):
        return 0

    # watchdog
    def wdt_start(self, ms):
        global _wdt_ms, _fed, _wdt_thread
        if ms <= 0:
            return
        _fed = time.ticks_ms()
        _wdt_ms = ms
        if not _wdt_thread:
            try:
                import _thread
                _thread.start_new_thread(_wdt_loop, ())
                _wdt_thread = True
            except (ImportError, OSError):
                pass

    def wdt_feed(self):
        global _fed
        _fed = time.ticks_ms()

    # board I/O
    def led(self, on):
        self._led = bool(on)

    def button(self):
        return False

    # storage
    def kv_get(self, name):
        return _h.read(self.root + "kv/" + name)

    def kv_set(self, name, data):
        _h.write_atomic(self.root + "kv/" + name, data)

    def kv_del(self, name):
        _h.remove(self.root + "kv/" + name)

    def rtc_get(self):
        return _h.read(self.root + "rtc.bin") or b""

    def rtc_set(self, data):
        _h.write_atomic(self.root + "rtc.bin", data)

    # power
    def reset(self):
        raise _h.Reset()

    def deepsleep(self, ms):
        time.sleep_ms(ms)
        raise _h.Reset()

    # console
    def con_read(self, mv1):
        """Read at most one byte without blocking: 1, 0 (nothing waiting) or -1 (input closed)."""
        if self._eof:
            return -1
        for _obj, ev in self._console_poll.ipoll(0):
            if ev & select.POLLIN:
                if self._cin.readinto(mv1):
                    return 1
            self._eof = True  # POLLHUP or a read of 0 bytes: stdin is closed
            self._console_poll.unregister(self.con)
            return -1
        return 0

    def con_write(self, s):
        sys.stdout.write(s)
