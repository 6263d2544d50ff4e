# Structured log lines: "<L> <tag> key=value ...", e.g. "I app boot=3 safe=0". Each line goes to a sink
# (the console sets one; default print) and into a preallocated ring buffer that `log [n]` reads back.
# Callers format their message only when something happens (never per loop); the device key must never
# be passed here (identity exposes only a fingerprint).
from micropython import const

_RING = const(1024)  # about 15 lines of 60-70 characters: boot, the last warnings
_MAX_LINE = const(160)

_ring = bytearray(_RING)
_end = 0  # write position
_wrapped = False


def _print(line):
    print(line)


sink = _print  # callable(str): where lines go besides the ring (the console sets its own)


def _put(b):
    global _end, _wrapped
    n = len(b)
    if n > _MAX_LINE:
        n = _MAX_LINE
        while b[n] & 0xC0 == 0x80:  # cut at a UTF-8 character boundary
            n -= 1
    i = 0
    while i < n:
        room = _RING - _end
        k = n - i if n - i < room else room
        _ring[_end:_end + k] = b[i:i + k]
        _end += k
        i += k
        if _end == _RING:
            _end = 0
            _wrapped = True
    _ring[_end] = 10
    _end += 1
    if _end == _RING:
        _end = 0
        _wrapped = True


def log(level, tag, msg):
    line = level + " " + tag + " " + msg
    _put(line.encode())
    sink(line)


def i(tag, msg):
    log("I", tag, msg)


def w(tag, msg):
    log("W", tag, msg)


def e(tag, msg):
    log("E", tag, msg)


def tail(n):
    """The last n logged lines, oldest first (allocates: console use only)."""
    if _wrapped:
        data = bytes(_ring[_end:]) + bytes(_ring[:_end])
        data = data[data.find(b"\n") + 1:]  # first line may be cut by the wrap
    else:
        data = bytes(_ring[:_end])
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    out = []
    for b in lines[-n:] if n > 0 else ():
        out.append(str(b, "utf-8"))
    return out
