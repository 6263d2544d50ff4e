# MQTT 3.1.1 packets for the device, no I/O (umqtt.simple's way: write into a preallocated buffer, patch in
# place): connect()/publish()/subscribe()/puback()/empty() write a packet into a buffer at pos and return the end;
# Reader is an incremental parser over one preallocated buffer with a maximum packet size (bigger packets are
# skipped and counted, never buffered). The client that sends and reads them is mqtt.py.
from micropython import const

CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
SUBSCRIBE = const(8)
SUBACK = const(9)
PINGREQ = const(12)
PINGRESP = const(13)
DISCONNECT = const(14)


class MQTTError(ValueError):
    """The peer broke the protocol, refused us (code = CONNACK return code) or went silent."""

    def __init__(self, msg, code=0):
        super().__init__(msg)
        self.code = code


def varlen(buf, pos, n):
    while True:
        b = n & 0x7F
        n >>= 7
        buf[pos] = b | (0x80 if n else 0)
        pos += 1
        if not n:
            return pos


def _vl_size(n):
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def _str(buf, pos, s):
    n = len(s)
    buf[pos] = n >> 8
    buf[pos + 1] = n & 255
    buf[pos + 2:pos + 2 + n] = s
    return pos + 2 + n


def connect(buf, cid, keepalive, clean=True, will=None, user=None, pwd=None):
    """CONNECT into buf; will = (topic, message, qos, retain). Returns the length."""
    rem = 10 + 2 + len(cid)
    flags = 2 if clean else 0
    if will:
        rem += 4 + len(will[0]) + len(will[1])
        flags |= 4 | (will[2] << 3) | (0x20 if will[3] else 0)
    if user is not None:
        rem += 2 + len(user)
        flags |= 0x80
        if pwd is not None:
            rem += 2 + len(pwd)
            flags |= 0x40
    if 1 + _vl_size(rem) + rem > len(buf):
        raise MQTTError("CONNECT larger than the buffer")
    buf[0] = CONNECT << 4
    pos = varlen(buf, 1, rem)
    pos = _str(buf, pos, b"MQTT")
    buf[pos] = 4  # protocol level 3.1.1
    buf[pos + 1] = flags
    buf[pos + 2] = keepalive >> 8
    buf[pos + 3] = keepalive & 255
    pos = _str(buf, pos + 4, cid)
    if will:
        pos = _str(buf, pos, will[0])
        pos = _str(buf, pos, will[1])
    if user is not None:
        pos = _str(buf, pos, user)
        if pwd is not None:
            pos = _str(buf, pos, pwd)
    return pos


def publish_size(topic, payload, qos):
    rem = 2 + len(topic) + (2 if qos else 0) + len(payload)
    return 1 + _vl_size(rem) + rem


def publish(buf, topic, payload, qos=0, retain=False, dup=False, pid=0, pos=0):
    """PUBLISH into buf at pos; returns the end position."""
    rem = 2 + len(topic) + (2 if qos else 0) + len(payload)
    buf[pos] = (PUBLISH << 4) | (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
    pos = varlen(buf, pos + 1, rem)
    pos = _str(buf, pos, topic)
    if qos:
        buf[pos] = pid >> 8
        buf[pos + 1] = pid & 255
        pos += 2
    n = len(payload)
    buf[pos:pos + n] = payload
    return pos + n


def subscribe(buf, pid, topics, pos=0):
    """SUBSCRIBE to [(topic, qos), ...]; returns the end position."""
    rem = 2
    for t, _q in topics:
        rem += 3 + len(t)
    buf[pos] = (SUBSCRIBE << 4) | 2
    pos = varlen(buf, pos + 1, rem)
    buf[pos] = pid >> 8
    buf[pos + 1] = pid & 255
    pos += 2
    for t, q in topics:
        pos = _str(buf, pos, t)
        buf[pos] = q
        pos += 1
    return pos


def puback(buf, pid, pos=0):
    buf[pos] = PUBACK << 4
    buf[pos + 1] = 2
    buf[pos + 2] = pid >> 8
    buf[pos + 3] = pid & 255
    return pos + 4


def empty(buf, ptype, pos=0):
    """A packet with no variable header or payload (PINGREQ, DISCONNECT); returns the end."""
    buf[pos] = ptype << 4
    buf[pos + 1] = 0
    return pos + 2


class Reader:
    """Incremental packet parser. Fill space() then call added(k); while next() is true the packet is
    buf[0] (type and flags) and buf[pos:pos+len] (after the fixed header); then consume(). MQTTError when the
    remaining length is malformed."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.filled = 0   # bytes in buf
        self.skip = 0     # bytes still to discard of an oversized packet
        self.dropped = 0  # oversized packets skipped
        self.pos = self.len = 0

    def reset(self):
        self.filled = self.skip = 0

    def space(self):
        return self.view[self.filled:]

    def added(self, k):
        self.filled += k
        if self.skip:
            d = min(self.skip, self.filled)
            self.skip -= d
            self._drop(d)

    def _drop(self, d):
        n = self.filled - d
        if n:
            self.view[:n] = self.view[d:self.filled]
        self.filled = n

    def next(self):
        if self.skip or self.filled < 2:
            return False
        b = self.buf
        rem = 0
        mul = 1
        i = 1
        while True:
            if i >= self.filled:
                return False
            c = b[i]
            rem += (c & 0x7F) * mul
            i += 1
            if not c & 0x80:
                break
            mul <<= 7
            if i > 4:
                raise MQTTError("malformed remaining length")
        total = i + rem
        if total > len(b):
            self.dropped += 1
            self.skip = total
            d = min(total, self.filled)
            self.skip -= d
            self._drop(d)
            return False
        if self.filled < total:
            return False
        self.pos = i
        self.len = rem
        return True

    def consume(self):
        self._drop(self.pos + self.len)
