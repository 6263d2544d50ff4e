# The flash report queue: batching (an online device writes nothing), drop-oldest with a persisted
# counter, acks, compaction, and recovery from a file truncated or corrupted at every offset.
import os
from mptest import eq, ok, note
from fwfakes import tmpdir, rmtree
from carrier import queue as q


def _payload(boot, seq):
    return b"report-%d-%d" % (boot, seq) + b"." * (seq % 7)


def _fill(Q, boot, seqs, now=0):
    for s in seqs:
        ok(Q.put(boot, s, _payload(boot, s), now))


def _keys(Q):
    return [Q.key(i) for i in range(Q.count)]


def _size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return -1


def _with_dir(fn):
    d = tmpdir("q")
    try:
        fn(d + "q.dat")
    finally:
        rmtree(d[:-1])


def test_online_device_never_writes_flash():
    def t(p):
        Q = q.Queue(p)
        for s in range(1, 50):
            Q.put(1, s, _payload(1, s), s * 1000)
            eq(bytes(Q.payload(0)), _payload(1, s))
            ok(Q.ack(1, s))
            Q.poll(s * 1000 + 500)
        eq((Q.count, Q.writes, _size(p)), (0, 0, -1))

    _with_dir(t)


def test_batched_writes():
    def t(p):
        Q = q.Queue(p, batch=4, flush_ms=60000)
        _fill(Q, 1, (1, 2, 3))
        eq(Q.writes, 0, "three reports stay in RAM")
        _fill(Q, 1, (4,))
        eq(Q.writes, 1, "the fourth flushes all four in one write")
        _fill(Q, 1, (5,), 1000)
        Q.poll(60999)
        eq(Q.writes, 1)
        Q.poll(61000)
        eq(Q.writes, 2, "T seconds after the first buffered record")
        eq([bytes(Q.payload(i)) for i in range(Q.count)], [_payload(1, s) for s in range(1, 6)])
        R = q.Queue(p)
        eq(_keys(R), [(1, s) for s in range(1, 6)])
        eq(bytes(R.payload(4)), _payload(1, 5))

    _with_dir(t)


def test_flush_before_reboot_and_reload():
    def t(p):
        Q = q.Queue(p)
        _fill(Q, 7, (1, 2))
        Q.flush()
        R = q.Queue(p)
        eq(_keys(R), [(7, 1), (7, 2)])

    _with_dir(t)


def test_drop_oldest_counted_and_persisted():
    def t(p):
        Q = q.Queue(p, cap=4, batch=2)
        _fill(Q, 1, range(1, 7))
        eq((Q.count, Q.dropped), (4, 2))
        eq(_keys(Q), [(1, 3), (1, 4), (1, 5), (1, 6)])
        Q.flush()
        R = q.Queue(p, cap=4)
        eq((_keys(R), R.dropped), (_keys(Q), 2))
        _fill(R, 2, (1,))
        R.flush()
        S = q.Queue(p, cap=4)
        eq((S.dropped, _keys(S)[0]), (3, (1, 4)))
        S.compact()
        eq(q.Queue(p, cap=4).dropped, 3, "compaction keeps the counter in HEAD")

    _with_dir(t)


def test_acks_remove_entries_from_ram_and_flash():
    def t(p):
        Q = q.Queue(p, batch=3)
        _fill(Q, 1, (1, 2, 3, 4, 5))
        ok(Q.ack(1, 2))  # on flash: an ACK record
        ok(Q.ack(1, 5))  # still in RAM: just removed
        ok(not Q.ack(1, 5))
        ok(not Q.ack(9, 9))
        eq(_keys(Q), [(1, 1), (1, 3), (1, 4)])
        eq(bytes(Q.payload(2)), _payload(1, 4))
        Q.flush()
        eq(_keys(q.Queue(p)), [(1, 1), (1, 3), (1, 4)])

    _with_dir(t)


def test_drained_queue_compacts_to_head():
    def t(p):
        Q = q.Queue(p, batch=2)
        _fill(Q, 1, range(1, 9))
        ok(_size(p) > 100)
        for s in range(1, 9):
            Q.ack(1, s)
        Q.poll(1)
        eq(_size(p), q.REC, "just the HEAD record")
        eq(q.Queue(p).count, 0)

    _with_dir(t)


def test_compaction_when_file_grows():
    def t(p):
        Q = q.Queue(p, batch=1, max_file=600)
        for s in range(1, 60):
            Q.put(1, s, _payload(1, s))
            if s > 3:
                Q.ack(1, s - 3)
            ok(_size(p) <= 600 + q.BUF, "bounded file")
        Q.flush()
        eq(_keys(q.Queue(p)), _keys(Q))
        note("file size after 59 reports with acks:", _size(p))

    _with_dir(t)


def test_oversized_payload_is_refused():
    def t(p):
        Q = q.Queue(p)
        ok(not Q.put(1, 1, b"x" * (q.MAX_PAYLOAD + 1)))
        ok(Q.put(1, 2, b"x" * q.MAX_PAYLOAD))
        Q.flush()
        eq(len(q.Queue(p).payload(0)), q.MAX_PAYLOAD)

    _with_dir(t)


def _image(p):
    Q = q.Queue(p, batch=100)
    _fill(Q, 3, range(1, 6))
    Q.flush()  # creates the file: HEAD + 5 reports
    Q.ack(3, 2)
    Q.flush()  # appends ACK(3, 2)
    Q.ack(3, 4)
    Q.flush()  # appends ACK(3, 4)
    with open(p, "rb") as f:
        data = f.read()
    # record boundaries: HEAD, 5 reports, ACK(3,2) [first flush], ACK(3,4)
    ends = []
    pos = 0
    while pos < len(data):
        pos += q.REC + (data[pos + 1] | (data[pos + 2] << 8))
        ends.append(pos)
    return data, ends


def _expected(ends, cut):
    """Live keys when only the records ending at or before `cut` survive."""
    whole = sum(1 for e in ends if e <= cut)
    live = [(3, s) for s in range(1, 6)][: max(0, whole - 1)]
    if whole >= 7:
        live.remove((3, 2))
    if whole >= 8:
        live.remove((3, 4))
    return live


def test_truncated_at_every_offset():
    def t(p):
        data, ends = _image(p)
        eq(len(ends), 8)
        for cut in range(len(data) + 1):
            with open(p, "wb") as f:
                f.write(data[:cut])
            Q = q.Queue(p)
            eq(_keys(Q), _expected(ends, cut), "cut at %d" % cut)
            eq(Q.corrupt, 0 if cut in ends or cut == 0 else 1)
            for i in range(Q.count):
                eq(bytes(Q.payload(i)), _payload(*Q.key(i)))
            # the recovered file takes new records and reloads consistently
            Q.put(4, 1, _payload(4, 1))
            Q.flush()
            eq(_keys(q.Queue(p)), _expected(ends, cut) + [(4, 1)], "append after recovery, cut %d" % cut)
        note("truncated at all", len(data) + 1, "offsets")

    _with_dir(t)


def test_corrupted_byte_at_every_offset():
    def t(p):
        data, ends = _image(p)
        for i in range(len(data)):
            bad = bytearray(data)
            bad[i] ^= 0x5A
            with open(p, "wb") as f:
                f.write(bad)
            Q = q.Queue(p)
            rec_start = max([0] + [e for e in ends if e <= i])
            eq(_keys(Q), _expected(ends, rec_start), "byte %d" % i)
            eq(Q.corrupt, 1)
            for j in range(Q.count):
                eq(bytes(Q.payload(j)), _payload(*Q.key(j)))
        note("corrupted each of", len(data), "bytes: every record before the bad one survives")

    _with_dir(t)


def test_stale_compaction_temp_is_ignored():
    def t(p):
        Q = q.Queue(p)
        _fill(Q, 1, (1, 2))
        Q.flush()
        with open(p + ".tmp", "wb") as f:
            f.write(b"\x04\x00garbage")
        R = q.Queue(p)
        eq(_keys(R), [(1, 1), (1, 2)])
        ok(_size(p + ".tmp") < 0)

    _with_dir(t)
