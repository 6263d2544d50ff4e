# Bounded queue of unacknowledged reports in flash: one append-only file of records
#     kind u8 | len u16 | boot u32 | seq u32 | payload[len] | crc32 u32 (over the 11-byte head + payload)
# kinds: REPORT (payload = the CBOR report), ACK and DROP (remove boot/seq; DROP also counts it as dropped),
# HEAD (first record of a file; boot field = the dropped counter). Little-endian.
# Flash wears out, so records are first collected in a preallocated RAM buffer and written together when
# BATCH reports are waiting, the oldest buffered record is FLUSH_MS old, or flush() is called (before a
# reboot or deep sleep). A report acknowledged while still in RAM never touches flash: a device that is
# online writes nothing. When the queue is full the oldest report goes (counted, persisted). At boot the
# file is replayed (qfile.py); a torn or corrupt record (CRC) ends the replay and the file is rewritten (compaction:
# temp file + rename) with the live reports only, as it is whenever it grows past max_file or drains.
import struct
import binascii
import time
from array import array
from micropython import const

from carrier import hal

REPORT = const(1)
ACK = const(2)
DROP = const(3)
HEAD = const(4)
_HDR = const(11)
REC = const(15)  # head + crc
MAX_PAYLOAD = const(480)
BUF = const(495)  # REC + MAX_PAYLOAD: one record of the largest report, or a batch of typical ones (~110 B)
_BATCH = const(4)
_FLUSH_MS = const(60000)


class Queue:
    def __init__(self, path, cap=64, batch=_BATCH, flush_ms=_FLUSH_MS, max_file=16384):
        self.path = path
        self.cap = cap
        self.batch = batch
        self.flush_ms = flush_ms
        self.max_file = max_file
        self._boot = array("I", bytes(4 * cap))
        self._seq = array("I", bytes(4 * cap))
        self._off = array("i", bytes(4 * cap))  # >= 0: payload offset in the file; < 0: -1 - offset in _buf
        self.count = 0
        self.dropped = 0
        self.corrupt = 0   # torn/corrupt records found at boot
        self.errors = 0    # flash write errors
        self.writes = 0    # flash writes (appends and compactions)
        self._buf = bytearray(BUF)
        self._buf_view = memoryview(self._buf)
        self._blen = 0
        self._breps = 0    # REPORT records in _buf
        self._bsince = 0   # ticks when _buf got its first record
        self._read_view = None  # a record read back from flash: allocated when the file first holds one
        self._size = 0     # bytes of valid records in the file
        self._dead = 0     # records in the file that no longer matter
        self._compact = False
        self._file("load")  # the file -> the index above

    # -- index
    def _find(self, boot, seq):
        for i in range(self.count):
            if self._seq[i] == seq and self._boot[i] == boot:
                return i
        return -1

    def _remove(self, i):
        for j in range(i, self.count - 1):
            self._boot[j] = self._boot[j + 1]
            self._seq[j] = self._seq[j + 1]
            self._off[j] = self._off[j + 1]
        self.count -= 1

    def key(self, i):
        return self._boot[i], self._seq[i]

    def payload(self, i):
        """The report's CBOR bytes as a memoryview, valid until the next queue call. Its length is the record's
        (len u16 in the head, little-endian): the index does not keep it."""
        off = self._off[i]
        if off < 0:
            p = -1 - off
            b = self._buf
            return self._buf_view[p + _HDR:p + _HDR + (b[p + 1] | b[p + 2] << 8)]
        r = self._read_view
        if r is None:  # the file first holds a report the device reads back: offline, or after a reboot
            r = self._read_view = memoryview(bytearray(_HDR + MAX_PAYLOAD))
        with open(self.path, "rb") as f:
            f.seek(off - _HDR)
            f.readinto(r[:_HDR])
            v = r[_HDR:_HDR + (r[1] | r[2] << 8)]
            f.readinto(v)
        return v

    # -- records in RAM
    def _append(self, kind, boot, seq, payload, now):
        n = len(payload) if payload else 0
        if self._blen + REC + n > BUF:
            self.flush()
        p = self._blen
        b = self._buf
        struct.pack_into("<BHII", b, p, kind, n, boot, seq)
        if n:
            b[p + _HDR:p + _HDR + n] = payload
        struct.pack_into("<I", b, p + _HDR + n, binascii.crc32(self._buf_view[p:p + _HDR + n]))
        if not self._blen:
            self._bsince = now
        self._blen = p + REC + n
        return p

    def _unbuffer(self, p):
        """Cut the record at _buf[p:] out of the buffer and fix the index offsets behind it."""
        n = REC + struct.unpack_from("<H", self._buf, p + 1)[0]
        end = self._blen
        self._buf_view[p:end - n] = self._buf_view[p + n:end]
        self._blen = end - n
        for j in range(self.count):
            o = self._off[j]
            if o < 0 and -1 - o > p:
                self._off[j] = o + n

    # -- API
    def put(self, boot, seq, payload, now=0):
        """Queue a report; False when it is too big to ever be queued."""
        n = len(payload)
        if n > MAX_PAYLOAD:
            return False
        while self.count >= self.cap:
            self._drop_oldest(now)
        p = self._append(REPORT, boot, seq, payload, now)
        i = self.count
        self._boot[i] = boot
        self._seq[i] = seq
        self._off[i] = -1 - p
        self.count = i + 1
        self._breps += 1
        if self._breps >= self.batch:
            self.flush()
        return True

    def _drop_oldest(self, now):
        boot, seq = self._boot[0], self._seq[0]
        off = self._off[0]
        self._remove(0)
        if off < 0:
            self._unbuffer(-1 - off)
            self._breps -= 1
        else:
            self._dead += 1
        self._append(DROP, boot, seq, None, now)  # persists the dropped counter
        # counted after the append: a full buffer makes it flush first, and a compaction there writes the
        # counter into the new HEAD, which must not already hold the drop this DROP record counts again
        self.dropped += 1

    def ack(self, boot, seq, now=0):
        """Remove an acknowledged report; False when it is not queued (already gone)."""
        i = self._find(boot, seq)
        if i < 0:
            return False
        off = self._off[i]
        self._remove(i)
        if off < 0:
            self._unbuffer(-1 - off)
            self._breps -= 1
        else:
            self._dead += 1
            if self.count == 0 and self._breps == 0:
                self._compact = True  # drained: next poll rewrites the file as just its HEAD
            else:
                self._append(ACK, boot, seq, None, now)
        return True

    def poll(self, now):
        if self._compact:
            self._compact = False
            self.compact()
        elif self._blen and time.ticks_diff(now, self._bsince) >= self.flush_ms:
            self.flush()

    def flush(self):
        """Write the buffered records to flash (one append, or a compaction: qfile.py)."""
        if self._compact or self._blen:
            self._file("flush")

    def compact(self):
        """Rewrite the file as HEAD + the live reports (from the file and the RAM buffer), atomically (qfile.py)."""
        self._file("compact")

    def _file(self, op):
        # the file is written only offline, at a reboot or when the queue drains: its code is loaded for that
        # and dropped again (carrier.unload), a device that stays online never holds it
        from carrier import qfile, unload
        try:
            getattr(qfile, op)(self)
        finally:
            unload("qfile")

    def clear(self):
        """Forget everything, counters included (factory reset)."""
        self.count = self._blen = self._breps = self._size = self._dead = 0
        self.dropped = 0
        hal.remove(self.path)
        hal.remove(self.path + ".tmp")

    # -- boot
