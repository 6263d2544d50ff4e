# Heap figures of the firmware, measured in one micropython process on the firmware test rig (fwfakes.Rig: the
# real carrier.app on the fake HAL against the loopback CoAP gateway, plain CoAP). Not a test module: test_heap.py
# asserts on these, and any tool can print them under the interpreter it wants to measure (the 32-bit one, with
# the firmware frozen in or not, gives the chip's figures):
#   MICROPYPATH=firmware:tests/device micropython -X heapsize=64000 tests/device/heapfig.py [steps]
# prints one line "HEAPFIG {json}" with
#   code_bytes     heap taken by the modules a CoAP device keeps after boot (bytecode too, unless frozen)
#   state_bytes    heap the device's state holds after boot + its first acknowledged report
#   heap_bytes     gc.mem_alloc() of the whole process at that point
#   idle_step      bytes allocated per loop iteration with nothing to do (the goal: 0)
#   report_cycle   bytes allocated by one report: made, queued, sent, acknowledged, removed
# Every figure is gc.mem_alloc() after gc.collect() (heap_bytes, code_bytes, state_bytes) or a gc.mem_alloc()
# difference with the collector off (idle_step, report_cycle), so garbage is counted where it is made.
import gc
import json
import sys

import fwfakes


def alloc():
    gc.collect()
    gc.collect()
    return gc.mem_alloc()


def allocated(fn, n=1):
    """Bytes fn() allocates, averaged over n calls, with the collector off (nothing freed meanwhile)."""
    gc.collect()
    gc.disable()
    try:
        b = gc.mem_alloc()
        for _ in range(n):
            fn()
        return (gc.mem_alloc() - b) // n
    finally:
        gc.enable()


def imports():
    """Import what a CoAP device keeps after boot, and load then drop what only boot uses (startup drops it too):
    code_bytes is then the code a running device holds (with the names of the dropped modules, which a source
    compile leaves interned), and state_bytes its state."""
    from carrier import app, coap, console, queue, reporter, rcache, unload  # noqa: F401
    from carrier import startup, identity, idsyntax, config, qfile  # noqa: F401

    unload("startup", "identity", "idsyntax", "config", "qfile")


def booted(rig):
    """Boot the rig's device and run it until its first report is acknowledged; the App."""
    a = rig.boot()
    if not rig.run(5000, lambda: a.reporter.acked >= 1):
        raise RuntimeError("first report not acknowledged within 5 s of rig time")
    rig.app.step(rig.hal.now)
    return a


def idle_step(rig, n=200):
    """Bytes one loop iteration allocates when nothing is due (the app's step, the gateway silent)."""
    app = rig.app
    h = rig.hal

    def step():
        app.step(h.now)
        h.now += 10

    step()  # settle: whatever the last step scheduled is done
    return allocated(step, n)


def report_cycle(rig):
    """Bytes the device allocates for one report, from make() to the removal of its acknowledged entry (what the
    in-test gateway allocates to answer it is not counted)."""
    app = rig.app
    r = app.reporter
    h = rig.hal
    want = r.acked + 1
    gc.collect()
    gc.disable()
    try:
        b = gc.mem_alloc()
        r.make(app.up_ms // 1000)
        n = gc.mem_alloc() - b
        for _ in range(100):
            b = gc.mem_alloc()
            app.step(h.now)
            n += gc.mem_alloc() - b
            rig.srv.serve()
            if r.acked >= want:
                return n
            h.now += 10
    finally:
        gc.enable()
    raise RuntimeError("report not acknowledged")


def figures(steps=200):
    """All the figures of the header, for a plain CoAP device on the rig."""
    out = {}
    m0 = alloc()
    imports()
    m1 = alloc()
    rig = fwfakes.Rig()
    m2 = alloc()
    try:
        booted(rig)
        m3 = alloc()
        out["code_bytes"] = m1 - m0
        out["state_bytes"] = m3 - m2
        out["heap_bytes"] = m3
        out["idle_step"] = idle_step(rig, steps)
        out["report_cycle"] = report_cycle(rig)
    finally:
        fwfakes.log_reset()
        rig.close()
    return out


if __name__ == "__main__":
    print("HEAPFIG " + json.dumps(figures(int(sys.argv[1]) if len(sys.argv) > 1 else 200)))
