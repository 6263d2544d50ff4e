# Boot-time replay of the report queue's file (queue.py has its format): every record is read back and checked
# (CRC) into the Queue's index; a torn or corrupt record ends the replay, counted in corrupt, and the file is
# rewritten with what came before it. Only Queue() imports this module, at boot; startup drops it again
# (app._unload), so a running device holds none of this code.
import struct
import binascii
from micropython import const

from carrier import hal

_REPORT = const(1)  # mirrors queue.REPORT
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
                q._len[i] = n
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
        q.compact()  # drop the bad tail so later appends follow valid records
