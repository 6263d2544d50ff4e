# The report queue's file (queue.py has its format and the index it feeds): load() replays it at boot, every
# record read back and checked (CRC) into the Queue's index, a torn or corrupt record ending the replay (counted
# in corrupt) and the file rewritten with what came before it; flush() appends the RAM buffer in one write;
# compact() rewrites the file as HEAD + the live reports, atomically (temp file + rename). The file is written
# only offline, at a reboot or when the queue drains: Queue imports this module for that and drops it again
# (carrier.unload), so a device that stays online holds none of this code.
import os
import struct
import binascii
from array import array
from micropython import const

from carrier import hal

_REPORT = const(1)  # mirrors queue.REPORT
_ACK = const(2)     # mirrors queue.ACK
_DROP = const(3)    # mirrors queue.DROP
_HEAD = const(4)    # mirrors queue.HEAD
_HDR = const(11)    # mirrors queue._HDR
_REC = const(15)    # mirrors queue.REC
_MAX_PAYLOAD = const(480)  # mirrors queue.MAX_PAYLOAD


def load(q):
    hal.remove(q.path + ".tmp")  # a compaction cut short: the old file is still whole
    try:
        f = open(q.path, "rb")
    except OSError:
        return
    rv = memoryview(bytearray(_HDR + _MAX_PAYLOAD + 4))  # for boot only: the queue keeps no read buffer for it
    hv = rv[:_HDR]
    pos = 0
    torn = False
    with f:
        while True:
            k = f.readinto(hv)
            if not k:
                break
            if k != _HDR:
                torn = True
                break
            kind, n, boot, seq = struct.unpack("<BHII", hv)
            if not _REPORT <= kind <= _HEAD or n > _MAX_PAYLOAD or (kind != _REPORT and n):
                torn = True
                break
            body = rv[_HDR:_HDR + n + 4]
            if f.readinto(body) != n + 4 or \
                    binascii.crc32(body[:n], binascii.crc32(hv)) != struct.unpack_from("<I", rv, _HDR + n)[0]:
                torn = True
                break
            if kind == _REPORT:
                if q.count >= q.cap:
                    q._remove(0)
                    q.dropped += 1
                    q._dead += 1
                i = q.count
                q._boot[i] = boot
                q._seq[i] = seq
                q._off[i] = pos + _HDR
                q.count = i + 1
            elif kind == _HEAD:
                q.dropped = boot
            else:
                i = q._find(boot, seq)
                if i >= 0:
                    q._remove(i)
                    q._dead += 1
                q._dead += 1
                if kind == _DROP:
                    q.dropped += 1
            pos += _REC + n
    q._size = pos
    if torn:
        q.corrupt += 1
        compact(q)  # drop the bad tail so later appends follow valid records


def flush(q):
    """Write the buffered records to flash (one append), or compact when the file would grow too big."""
    if q._compact:  # an ack drained the queue and left no ACK record: rewrite now, or a reboot resends it
        q._compact = False
        compact(q)
        return
    if not q._blen:
        return
    if q._size + q._blen > q.max_file or q._size == 0:
        compact(q)
        return
    try:
        with open(q.path, "ab") as f:
            f.write(q._buf_view[:q._blen])
    except OSError:
        q.errors += 1
        return  # stays in RAM; the next flush tries again
    q.writes += 1
    base = q._size
    for j in range(q.count):
        o = q._off[j]
        if o < 0:
            q._off[j] = base - 1 - o + _HDR
    p = 0
    while p < q._blen:
        k = q._buf[p]
        if k == _ACK or k == _DROP:
            q._dead += 1
        p += _REC + struct.unpack_from("<H", q._buf, p + 1)[0]
    q._size += q._blen
    q._blen = 0
    q._breps = 0


def compact(q):
    """Rewrite the file as HEAD + the live reports (from the file and the RAM buffer), atomically."""
    tmp = q.path + ".tmp"
    hb = bytearray(_HDR)  # rare (drained, past max_file, a torn file at boot): made when needed
    cb = bytearray(4)
    offs = array("i", bytes(4 * q.count))
    try:
        with open(tmp, "wb") as f:
            struct.pack_into("<BHII", hb, 0, _HEAD, 0, q.dropped, 0)
            struct.pack_into("<I", cb, 0, binascii.crc32(hb))
            f.write(hb)
            f.write(cb)
            pos = _REC
            for i in range(q.count):
                mv = q.payload(i)
                n = len(mv)
                struct.pack_into("<BHII", hb, 0, _REPORT, n, q._boot[i], q._seq[i])
                struct.pack_into("<I", cb, 0, binascii.crc32(mv, binascii.crc32(hb)))
                f.write(hb)
                f.write(mv)
                f.write(cb)
                offs[i] = pos + _HDR
                pos += _REC + n
        os.rename(tmp, q.path)
    except OSError:
        q.errors += 1
        hal.remove(tmp)
        return
    q.writes += 1
    for i in range(q.count):
        q._off[i] = offs[i]
    q._size = pos
    q._dead = 0
    q._blen = 0
    q._breps = 0
