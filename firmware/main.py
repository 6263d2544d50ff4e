# Entry point of the active identifier carrier. On an ESP32 MicroPython runs this file at boot; on the
# host, `micropython firmware/main.py` runs the same firmware as a simulated device (unix board):
#
#   IDA_DATA=/tmp/dev1 micropython firmware/main.py
#
# Environment (unix port only; the ESP32 uses / and machine.unique_id()):
#   IDA_DATA      data directory = the device's flash (identity.json, config.json, q.dat, kv/, rtc.bin,
#                 board.json); default ./ida-data
#   IDA_BOARD     board file (default <IDA_DATA>/board.json, else built-in unix defaults)
#   IDA_UID       unique id as hex (default 020000000001)
#   IDA_WDT_MS    watchdog timeout in ms, 0 = off (default 30000; a software watchdog kills the process)
#   IDA_INTERVAL  report interval in s until the gateway configures one (default 60; 10-86400)
#   IDA_FAULT     test hooks: "boot" crashes every boot after the crash counter (exercises safe mode),
#                 "hang" stops the loop after the watchdog started (exercises the watchdog)
# The console is stdin/stdout: type `help`, or `json on` for one JSON object per line. Without an
# identity the device starts in provisioning mode: `provision <id> coap://host:port`.
# A <IDA_DATA>/netdown file (or `net down`) simulates a network outage.
from carrier import app  # micropython puts this file's directory first on sys.path


def _env():
    import os
    get = getattr(os, "getenv", None)
    if get is None:
        return {}
    kw = {"root": get("IDA_DATA"), "uid": get("IDA_UID"), "board": get("IDA_BOARD"), "fault": get("IDA_FAULT")}
    w = get("IDA_WDT_MS")
    if w:
        kw["wdt_ms"] = int(w)
    i = get("IDA_INTERVAL")
    if i:
        kw["interval"] = int(i)
    return kw


app.main(**_env())
