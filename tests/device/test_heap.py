# Heap of a booted device that has made (and had acknowledged) its first report, against the loopback
# CoAP gateway, measured with gc.mem_alloc() after gc.collect(); plus the bytes of one resolve request.
# This module imports nothing from the firmware at the top, so the code cost can be measured too.
# Figures are for this 64-bit unix build (GC blocks of 32 bytes, 8-byte pointers; code loaded as bytecode
# into the heap); tests/integration/test_firmware_device.py measures the real device process, also with the code in a
# ROMFS image (executed in place, as frozen code would be on the ESP32).
import gc
from mptest import note, ok
import fwfakes

TARGET = 32 * 1024


def _alloc():
    gc.collect()
    gc.collect()
    return gc.mem_alloc()


def test_heap_after_boot_and_first_report():
    m0 = _alloc()
    from carrier import app, coap  # noqa: F401  everything a CoAP device loads

    m1 = _alloc()
    r = fwfakes.Rig()
    m2 = _alloc()
    try:
        a = r.boot()
        ok(r.run(5000, lambda: a.reporter.acked == 1), "first report acknowledged")
        r.app.step(r.hal.now)
        m3 = _alloc()
    finally:
        fwfakes.log_reset()
        r.close()
    state = m3 - m2
    code = m1 - m0
    note(
        "heap after boot + first report: application state %d B (target %d B), firmware code loaded as "
        "bytecode %d B, process total %d B" % (state, TARGET, code, m3)
    )
    ok(state <= TARGET, "application state over %d B: %d" % (TARGET, state))


def test_resolve_request_bytes():
    from carrier import coapmsg

    buf = bytearray(64)
    n = coapmsg.resolve_request(buf, 1, 2, b"88.123.99/PUMP-0001-ABCD")
    note("CoAP resolve request for a 24-character identifier: %d bytes (target <= 48)" % n)
    ok(n <= 48)
