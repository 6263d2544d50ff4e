# HAL for MicroPython on ESP32 / ESP32-S3 / ESP32-C3: Wi-Fi station with reconnect and backoff, the
# hardware watchdog, NVS for secrets and counters, RTC memory for boot info, the status LED and button
# described by /board.json, deep sleep. The data directory is the root of the LittleFS vfs.
import sys
import time
import machine
import network
import esp32
from micropython import const

from carrier import hal as _h

NVS_NS = "ida"
_KV_MAX = const(96)  # largest NVS blob this firmware stores (key, counters)
_NET_RETRY_MS = const(5000)
_NET_RETRY_MAX_MS = const(120000)


class Hal:
    def __init__(self, root=None, uid=None, board=None):
        self.root = root or "/"
        from carrier.hal import boardfile
        self.board = boardfile.load(board or self.root + "board.json")
        self._wlan = network.WLAN(network.STA_IF)
        self._wifi = None  # (ssid, psk)
        self._want = False
        self._next = time.ticks_ms()
        self._retry = _NET_RETRY_MS
        self._wdt = None
        self._nvs = esp32.NVS(NVS_NS)
        self._kvbuf = bytearray(_KV_MAX)
        self._rtc = machine.RTC()
        self._led = None
        self._pixel = None
        self._led_on = 1
        led = self.board.led
        if led:
            kind, pin, active_high = led
            if kind == "ws2812":
                import neopixel
                self._pixel = neopixel.NeoPixel(machine.Pin(pin), 1)
            else:
                self._led = machine.Pin(pin, machine.Pin.OUT)
                self._led_on = 1 if active_high else 0
            self.led(False)
        self._btn = None
        self._btn_on = 0
        if self.board.button:
            pin, active_low = self.board.button
            if active_low:
                self._btn = machine.Pin(pin, machine.Pin.IN, machine.Pin.PULL_UP)
            else:
                self._btn = machine.Pin(pin, machine.Pin.IN)
            self._btn_on = 0 if active_low else 1
        self.con = sys.stdin
        self._cin = sys.stdin.buffer
        import select
        self._console_poll = select.poll()
        self._console_poll.register(sys.stdin, select.POLLIN)

    # time
    def ticks(self):
        return time.ticks_ms()

    def time(self):
        t = time.time()
        return t if t > 1700000000 else 0  # the RTC starts at the epoch until NTP sets it

    def sleep_ms(self, ms):
        time.sleep_ms(ms)

    def uid(self):
        return machine.unique_id()

    # Wi-Fi station: connect, and reconnect with exponential backoff while wanted
    def net_set(self, on, wifi=None):
        if wifi:
            self._wifi = wifi
        self._want = bool(on)
        if on:
            self._wlan.active(True)
            self._next = time.ticks_ms()
            self._retry = _NET_RETRY_MS
        else:
            try:
                self._wlan.disconnect()
            except OSError:
                pass

    def net_poll(self, now):
        if not self._want or not self._wifi or self._wlan.isconnected():
            return
        if time.ticks_diff(now, self._next) < 0:
            return
        if self._wlan.status() == network.STAT_CONNECTING:
            return
        try:
            self._wlan.connect(self._wifi[0], self._wifi[1])
        except OSError:
            pass
        self._next = time.ticks_add(now, self._retry)
        self._retry = min(self._retry * 2, _NET_RETRY_MAX_MS)

    def net_up(self):
        up = self._wlan.isconnected()
        if up:
            self._retry = _NET_RETRY_MS
        return up

    def rssi(self):
        try:
            return self._wlan.status("rssi") if self._wlan.isconnected() else 0
        except (OSError, ValueError):
            return 0

    # watchdog: cannot be stopped once started (only its timeout can change)
    def wdt_start(self, ms):
        if ms > 0:
            self._wdt = machine.WDT(timeout=ms)

    def wdt_feed(self):
        if self._wdt:
            self._wdt.feed()

    # board I/O
    def led(self, on):
        if self._pixel:
            self._pixel[0] = (0, 8, 0) if on else (0, 0, 0)
            self._pixel.write()
        elif self._led:
            self._led.value(self._led_on if on else 1 - self._led_on)

    def button(self):
        b = self._btn
        return b is not None and b.value() == self._btn_on

    # storage: NVS blobs (wear-levelled by ESP-IDF)
    def kv_get(self, name):
        try:
            n = self._nvs.get_blob(name, self._kvbuf)
        except OSError:
            return None
        return bytes(self._kvbuf[:n])

    def kv_set(self, name, data):
        self._nvs.set_blob(name, data)
        self._nvs.commit()

    def kv_del(self, name):
        try:
            self._nvs.erase_key(name)
            self._nvs.commit()
        except OSError:
            pass

    def rtc_get(self):
        return self._rtc.memory()

    def rtc_set(self, data):
        self._rtc.memory(data)

    # power
    def reset(self):
        machine.reset()

    def deepsleep(self, ms):
        machine.deepsleep(ms)

    # console (the REPL's stdin/stdout: UART or USB-Serial-JTAG)
    def con_read(self, mv1):
        for _obj, ev in self._console_poll.ipoll(0):
            if ev & 1 and self._cin.readinto(mv1):
                return 1
        return 0

    def con_write(self, s):
        sys.stdout.write(s)
