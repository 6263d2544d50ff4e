# Fuzzing the flash report queue (carrier/queue.py): whatever the queue file holds at boot (random bytes,
# mutated real images, well-checksummed records with odd kinds, lengths, keys and counters), Queue() loads
# without an exception, keeps at most `cap` reports whose payloads read back at their recorded lengths, and
# goes on working: after random put/ack/poll/flush/compact and a clean shutdown (flush), a reboot (a new
# Queue on the same file) sees exactly the reports and dropped counter of a simple model. Seeded, bounded.
import struct
import binascii
from mptest import eq, ok, note
import fuzzlib as F
from fwfakes import tmpdir, rmtree
from carrier import queue as q


def _with_dir(fn):
    d = tmpdir("fzq")
    try:
        fn(d + "q.dat")
    finally:
        rmtree(d[:-1])


def _record(kind, boot, seq, payload):
    head = struct.pack("<BHII", kind, len(payload), boot, seq)
    return head + payload + struct.pack("<I", binascii.crc32(payload, binascii.crc32(head)))


def _image(p):
    """A real queue file: HEAD, reports, acks and drops as the queue writes them."""
    Q = q.Queue(p, cap=4, batch=2)
    for s in range(1, 8):
        Q.put(1, s, b"report-%d" % s + b"." * s)
        if s % 3 == 0:
            Q.ack(1, s - 1)
    Q.flush()
    with open(p, "rb") as f:
        return f.read()


def _random_records():
    out = b""
    for _ in range(F.below(10)):
        kind = F.pick((q.REPORT, q.REPORT, q.REPORT, q.ACK, q.DROP, q.HEAD, 0, 5, 255))
        n = F.pick((0, 1, 10, q.MAX_PAYLOAD, q.MAX_PAYLOAD + 1))
        payload = F.rbytes(n) if kind == q.REPORT or F.chance(5) else b""
        boot = F.pick((0, 1, 2, 2**32 - 1))
        seq = F.pick((0, 1, 2, 3, 2**32 - 1))
        if len(payload) > 0xFFFF:
            payload = payload[:0xFFFF]
        out += _record(kind, boot, seq, payload)
    return out


def _check_loaded(Q, data):
    ok(0 <= Q.count <= Q.cap, "count %d" % Q.count)
    for i in range(Q.count):
        pl = bytes(Q.payload(i))
        ok(len(pl) <= q.MAX_PAYLOAD, "payload length of %s" % data.hex())
        eq(bytes(Q.payload(i)), pl, "read back the same")


def test_fuzz_boot_from_random_file():
    F.seed("queue-file")
    corpus = []
    _with_dir(lambda p: corpus.append(_image(p)))
    n = 0

    def t(p):
        nonlocal_n = 0
        for r in range(F.rounds(120)):
            k = r % 3
            if k == 0:
                data = F.rbytes(F.below(60))
            elif k == 1:
                data = F.mutate(corpus[0], corpus)
            else:
                data = _random_records() + (F.rbytes(F.below(8)) if F.chance(3) else b"")
            with open(p, "wb") as f:
                f.write(data)
            cap = F.pick((1, 3, 8, 64))
            try:
                Q = q.Queue(p, cap=cap, batch=F.pick((1, 2, 4)), max_file=F.pick((64, 600, 16384)))
                _check_loaded(Q, data)
                # it keeps working: new reports, acks of old ones, a clean shutdown, a reboot
                keys = [Q.key(i) for i in range(Q.count)]
                pays = [bytes(Q.payload(i)) for i in range(Q.count)]
                for s in range(F.below(5)):
                    if Q.count >= cap:
                        keys.pop(0)
                        pays.pop(0)
                    pl = b"new-%d" % s
                    ok(Q.put(9, 100 + s, pl))
                    keys.append((9, 100 + s))
                    pays.append(pl)
                if keys and F.chance(2):
                    i = F.below(len(keys))
                    ok(Q.ack(*keys[i]))
                    j = keys.index(keys[i])  # the first one with that key goes
                    keys.pop(j)
                    pays.pop(j)
                Q.poll(1000000)
                Q.flush()
                dropped = Q.dropped
                R = q.Queue(p, cap=cap)
            except Exception as e:
                raise AssertionError(
                    "%s: %s with queue file %s (seed %d)" % (type(e).__name__, e, data.hex(), F.SEED)
                )
            eq([R.key(i) for i in range(R.count)], keys, "reboot after " + data.hex())
            eq([bytes(R.payload(i)) for i in range(R.count)], pays)
            eq(R.dropped & 0xFFFFFFFF, dropped & 0xFFFFFFFF, "dropped counter (a u32 in the file)")
            eq(R.corrupt, 0, "a clean shutdown leaves a clean file")
            nonlocal_n += 1
        note(nonlocal_n, "queue files booted")

    _with_dir(t)


def test_fuzz_operations_against_model():
    F.seed("queue-ops")

    def t(p):
        ops = 0
        for r in range(F.rounds(10)):
            cap = F.pick((1, 2, 5, 16))
            kw = {
                "cap": cap,
                "batch": F.pick((1, 3, 4)),
                "flush_ms": 50,
                "max_file": F.pick((100, 700, 16384)),
            }
            with open(p, "wb"):
                pass
            Q = q.Queue(p, **kw)
            model = []
            dropped = 0
            now = 0
            log = ["Queue(%r)" % (kw,)]
            for _ in range(60):
                op = F.below(10)
                now += F.pick((1, 10, 60))
                if op < 5:
                    key = (F.below(3), F.below(40))
                    pl = F.rbytes(F.pick((0, 1, 20, 200, q.MAX_PAYLOAD)))
                    ok(Q.put(key[0], key[1], pl, now))
                    log.append("put%r" % ((key[0], key[1], len(pl), now),))
                    if len(model) >= cap:
                        model.pop(0)
                        dropped += 1
                    model.append((key, pl))
                elif op < 8 and model:
                    key = F.pick(model)[0]
                    ok(Q.ack(key[0], key[1], now))
                    log.append("ack%r" % ((key[0], key[1], now),))
                    for i in range(len(model)):
                        if model[i][0] == key:
                            model.pop(i)
                            break
                elif op == 8:
                    Q.poll(now)
                    log.append("poll(%d)" % now)
                else:  # clean reboot
                    log.append("reboot")
                    Q.flush()
                    Q = q.Queue(p, **kw)
                    eq(Q.corrupt, 0)
                ops += 1
                eq([Q.key(i) for i in range(Q.count)], [m[0] for m in model], " ".join(log))
                eq([bytes(Q.payload(i)) for i in range(Q.count)], [m[1] for m in model])
                eq(Q.dropped, dropped)
                ok(not Q.ack(77, 77, now), "ack of a report never queued")
        note(ops, "operations")

    _with_dir(t)


# -- findings -----------------------------------------------------------------------------------------------
def test_regression_ack_that_drains_queue_survives_shutdown():
    # fuzz finding: an ack that empties the queue of file-resident reports writes no ACK record, it only
    # marks the file for compaction at the next poll(); a clean shutdown (flush()) before that poll kept the
    # file as it was, so the acknowledged report came back after the reboot and was sent again.
    # Exact sequence: Queue(cap=1, batch=3, max_file=100) put(0,30,200 B) put(1,4,0 B) put(1,12,200 B)
    # reboot ack(1,12) reboot -> [(1, 12)] instead of [].
    def t(p):
        kw = {"cap": 1, "batch": 3, "flush_ms": 50, "max_file": 100}
        Q = q.Queue(p, **kw)
        Q.put(0, 30, b"a" * 200, 1)
        Q.put(1, 4, b"", 61)
        Q.put(1, 12, b"b" * 200, 62)
        Q.flush()
        Q = q.Queue(p, **kw)
        eq([Q.key(0)], [(1, 12)])
        ok(Q.ack(1, 12, 123))
        Q.flush()
        eq(q.Queue(p, **kw).count, 0, "the ack is kept")
        # the second sequence: puts flushed by the batch between the draining ack and the shutdown
        kw = {"cap": 16, "batch": 4, "flush_ms": 50, "max_file": 700}
        Q = q.Queue(p, **kw)
        for s in (35, 24, 28):
            Q.put(2, s, b"x" * 20, 11)
        Q.flush()
        for s in (35, 24, 28):
            Q.ack(2, s, 50)
        for s in (13, 14, 2, 28):
            Q.put(1, s, b"y", 190)
        Q.flush()
        R = q.Queue(p, **kw)
        eq([R.key(i) for i in range(R.count)], [(1, 13), (1, 14), (1, 2), (1, 28)])

    _with_dir(t)


def test_regression_drop_that_fills_the_buffer_counts_once():
    # fuzz finding (with the RAM buffer sized to one largest record): dropping the oldest report appends a DROP
    # record; when that append found the buffer full it flushed first, the flush compacted the file, and the new
    # HEAD already held the incremented dropped counter, which the DROP record then counted again at the reboot.
    def t(p):
        Q = q.Queue(p, cap=2, batch=100, max_file=600)
        Q.put(1, 1, b"a" * q.MAX_PAYLOAD)
        Q.flush()
        Q.put(1, 2, b"b" * (q.BUF - q.REC - 10))
        Q.put(1, 3, b"c" * 5)  # the queue is full: (1, 1) goes, its DROP record does not fit the buffer
        eq(Q.dropped, 1)
        Q.flush()
        R = q.Queue(p, cap=2)
        eq(([R.key(i) for i in range(R.count)], R.dropped), ([(1, 2), (1, 3)], 1))

    _with_dir(t)
