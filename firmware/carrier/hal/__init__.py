# Hardware abstraction. Every port's Hal (hal/esp32.py, hal/unix.py) offers the same small interface:
#   root                      data directory ("/" on the device), with a trailing "/"
#   board                     Board (from board.json: name, chip, status LED, button, console, wifi)
#   ticks() / time()          ms ticks (time.ticks_* arithmetic) / wall-clock Unix s, 0 when unknown
#   sleep_ms(ms)  uid()       unique id bytes (machine.unique_id or configured)
#   net_up() net_set(on) net_poll(now) rssi()   network state; net_set(False) takes it down (unix switch)
#   wdt_start(ms) wdt_feed()  watchdog (hardware WDT; a software timer that kills the process on unix)
#   led(on) button()          status LED / user button (no-ops when the board has none)
#   kv_get(name) kv_set(name, bytes) kv_del(name)   small secrets/counters store (NVS or files)
#   rtc_get() rtc_set(bytes)  memory that survives a reset but not a power cut (boot info)
#   reset() deepsleep(ms)     never return on a device (unix: raise Reset so main.py reboots in-process)
#   con                       console stream (for select.poll); con_read(mv1) -> 0|1; con_write(str)
# File helpers shared by the ports live here: read(), write_atomic(), remove(). The ports read board.json with
# boardfile.load(): only their constructor needs it, and boot drops it again (carrier.unload).
import os
import sys


class Reset(Exception):
    """Raised by hal.reset() where the port cannot reset (unix): main.py restarts the app in-process."""


def read(path):
    """File contents as bytes, None when missing."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def remove(path):
    try:
        os.remove(path)
        return True
    except OSError:
        return False


def write_atomic(path, data):
    """Write path so that a power cut leaves either the old or the new contents: write path.tmp, then
    rename it over path (LittleFS and POSIX replace atomically). A stale .tmp is simply overwritten."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.rename(tmp, path)
    except OSError:  # FAT refuses to rename over an existing file
        remove(path)
        os.rename(tmp, path)


def load(root=None, uid=None, board=None):
    """The Hal of this port (None: its default, or on unix the IDA_* environment)."""
    if sys.platform == "esp32":
        from carrier.hal.esp32 import Hal
    else:
        from carrier.hal.unix import Hal
    return Hal(root, uid, board)
