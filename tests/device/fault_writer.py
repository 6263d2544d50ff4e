# Fault driver for tests/integration/test_faults.py (a device killed in the middle of a flash write). MicroPython, with
# MICROPYPATH=firmware; not a test module itself (no test_ prefix).
#
#   micropython fault_writer.py write <data dir> <device id> <coap url>
#       counts a boot (the firmware's kv "boot" counter, written atomically), then loops for ever doing what the
#       firmware does to its flash, only much faster: reports into the queue (carrier.queue.Queue, real report
#       CBOR), acknowledgements of the oldest, flushes, compactions (a small max_file forces them), and
#       identity.json rewrites (carrier.identity.save, alternating two keys). Each write is announced on stdout
#       *before* it happens ("W boot seq", "I n"), so whatever a SIGKILL interrupts was announced.
#   micropython fault_writer.py check <data dir> <device id>
#       what the firmware finds at boot, as one JSON line: the queue's keys in order, corrupt/dropped counters,
#       whether every payload is the report that was put, the identity's key index, the boot counter.
import sys
import json
import struct
import time
import os

from carrier import hal, identity, devicemsg
from carrier.queue import Queue

KEYS = ("00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100")


def report(ident, boot, seq):
    k = devicemsg.NAMES.index
    m = {
        k("id"): ident,
        k("boot"): boot,
        k("seq"): seq,
        k("uptime"): seq,
        k("heap"): 1000 + seq,
        k("rssi"): -50,
        k("queue"): 0,
        k("board"): "unix",
        k("fw"): "fault-" + "x" * (seq % 97),
    }
    return devicemsg.encode("report", m)


def ident_doc(ident, url, n):
    return {"id": ident, "transport": "coap", "coap": url, "key": KEYS[n]}


def write(root, ident, url):
    h = hal.load(root=root)
    b = h.kv_get("boot")
    boot = (struct.unpack("<I", b)[0] if b and len(b) == 4 else 0) + 1
    print("B", boot)
    h.kv_set("boot", struct.pack("<I", boot))
    q = Queue(h.root + "q.dat", cap=24, batch=2, flush_ms=0, max_file=3072)
    print("L", q.count, q.corrupt)
    seq = 0
    i = 0
    while True:
        i += 1
        seq += 1
        print("W", boot, seq)
        q.put(boot, seq, report(ident, boot, seq), time.ticks_ms())
        if i % 3 == 0 and q.count:
            k = q.key(0)
            print("A", k[0], k[1])
            q.ack(k[0], k[1], time.ticks_ms())
        if i % 5 == 0:
            q.flush()
        q.poll(time.ticks_ms())
        if i % 4 == 0:
            n = (i // 4) % 2
            print("I", n)
            identity.save(h, identity.parse(ident_doc(ident, url, n)))


def check(root, ident):
    h = hal.load(root=root)
    out = {}
    try:
        i = identity.load(h)
        out["identity"] = KEYS.index(i.key.hex()) if i is not None and i.id == ident else "wrong"
    except Exception as e:
        out["identity"] = "error: " + str(e)
    b = h.kv_get("boot")
    out["boot"] = struct.unpack("<I", b)[0] if b and len(b) == 4 else None
    q = Queue(h.root + "q.dat", cap=24)
    keys = []
    ok = True
    for n in range(q.count):
        bo, se = q.key(n)
        keys.append([bo, se])
        if bytes(q.payload(n)) != report(ident, bo, se):
            ok = False
    out["keys"] = keys
    out["payload_ok"] = ok
    out["corrupt"] = q.corrupt
    out["dropped"] = q.dropped
    try:
        out["file"] = os.stat(h.root + "q.dat")[6]
    except OSError:
        out["file"] = None
    print(json.dumps(out))


if sys.argv[1] == "write":
    write(sys.argv[2], sys.argv[3], sys.argv[4])
else:
    check(sys.argv[2], sys.argv[3])
