# CBOR (RFC 8949) for exactly what docs/protocol.md needs: ints, floats, bool, null, text, bytes,
# arrays, maps; definite lengths only, no tags. Encoding is deterministic like cbor2's canonical mode
# (shortest ints, shortest lossless float, map keys in length-first order) so both runtimes agree
# byte for byte. The encoder appends to one bytearray; the decoder reads a memoryview without copies.
import struct
from micropython import const

_MAX_DEPTH = const(16)


class CBORError(ValueError):
    pass


def _head(out, major, n):
    m = major << 5
    if n < 24:
        out.append(m | n)
    elif n < 0x100:
        out.append(m | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(m | 25)
        out.append(n >> 8)
        out.append(n & 255)
    elif n < 0x100000000:
        out.append(m | 26)
        out.extend(struct.pack(">I", n))
    elif n < 0x10000000000000000:
        out.append(m | 27)
        out.extend(struct.pack(">Q", n))
    else:
        raise CBORError("integer too large for CBOR")


def _float(out, x):
    if x != x:
        out.extend(b"\xf9\x7e\x00")  # canonical NaN
        return
    for code, fmt in ((0xF9, ">e"), (0xFA, ">f")):
        try:
            b = struct.pack(fmt, x)
        except (OverflowError, ValueError):
            continue
        if struct.unpack(fmt, b)[0] == x:
            out.append(code)
            out.extend(b)
            return
    out.append(0xFB)
    out.extend(struct.pack(">d", x))


def encode(out, obj, depth=0):
    """Append the encoding of obj to the bytearray out."""
    if depth > _MAX_DEPTH:
        raise CBORError("nesting too deep")
    t = type(obj)
    if t is bool:
        out.append(0xF5 if obj else 0xF4)
    elif t is int:
        if obj >= 0:
            _head(out, 0, obj)
        else:
            _head(out, 1, -1 - obj)
    elif t is str:
        b = obj.encode()
        _head(out, 3, len(b))
        out.extend(b)
    elif t is bytes or t is bytearray or t is memoryview:
        _head(out, 2, len(obj))
        out.extend(obj)
    elif t is float:
        _float(out, obj)
    elif obj is None:
        out.append(0xF6)
    elif t is list or t is tuple:
        _head(out, 4, len(obj))
        for x in obj:
            encode(out, x, depth + 1)
    elif t is dict:
        _head(out, 5, len(obj))
        small = True
        for k in obj:
            if type(k) is not int or not 0 <= k < 24:
                small = False
                break
        if small:
            for k in range(24):  # ascending, without a sorted copy of the keys
                if k in obj:
                    out.append(k)
                    encode(out, obj[k], depth + 1)
        else:
            pairs = []
            for k in obj:
                kb = bytearray()
                encode(kb, k, depth + 1)
                pairs.append((len(kb), bytes(kb), k))
            pairs.sort()
            for _, kb, k in pairs:
                out.extend(kb)
                encode(out, obj[k], depth + 1)
    else:
        raise CBORError("cannot encode %s" % t.__name__)


def dumps(obj):
    out = bytearray()
    encode(out, obj)
    return bytes(out)


def _need(n, pos, end):
    if pos + n > end:
        raise CBORError("truncated CBOR at byte %d" % pos)


def _decode(mv, pos, end, depth):
    if depth > _MAX_DEPTH:
        raise CBORError("nesting too deep")
    _need(1, pos, end)
    ib = mv[pos]
    pos += 1
    major = ib >> 5
    ai = ib & 31
    if major == 7:
        if ai == 20:
            return False, pos
        if ai == 21:
            return True, pos
        if ai == 22:
            return None, pos
        if ai == 25:
            _need(2, pos, end)
            return struct.unpack(">e", mv[pos:pos + 2])[0], pos + 2
        if ai == 26:
            _need(4, pos, end)
            return struct.unpack(">f", mv[pos:pos + 4])[0], pos + 4
        if ai == 27:
            _need(8, pos, end)
            return struct.unpack(">d", mv[pos:pos + 8])[0], pos + 8
        if ai == 31:
            raise CBORError("break outside an indefinite-length item")
        raise CBORError("unsupported simple value %d" % ai)
    if ai < 24:
        n = ai
    elif ai == 24:
        _need(1, pos, end)
        n = mv[pos]
        pos += 1
    elif ai == 25:
        _need(2, pos, end)
        n = (mv[pos] << 8) | mv[pos + 1]
        pos += 2
    elif ai == 26:
        _need(4, pos, end)
        n = struct.unpack(">I", mv[pos:pos + 4])[0]
        pos += 4
    elif ai == 27:
        _need(8, pos, end)
        n = struct.unpack(">Q", mv[pos:pos + 8])[0]
        pos += 8
    elif ai == 31:
        raise CBORError("indefinite-length items are not used by this protocol")
    else:
        raise CBORError("reserved additional information %d" % ai)
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major == 2 or major == 3:
        _need(n, pos, end)
        b = bytes(mv[pos:pos + n])
        if major == 3:
            try:
                b = str(b, "utf-8")
            except UnicodeError:
                raise CBORError("text string is not UTF-8")
        return b, pos + n
    if major == 4:
        if n > end - pos:
            raise CBORError("array longer than the payload")
        arr = []
        for _ in range(n):
            x, pos = _decode(mv, pos, end, depth + 1)
            arr.append(x)
        return arr, pos
    if major == 5:
        if 2 * n > end - pos:
            raise CBORError("map longer than the payload")
        d = {}
        for _ in range(n):
            k, pos = _decode(mv, pos, end, depth + 1)
            if type(k) is list or type(k) is dict:
                raise CBORError("map key must be a scalar")
            v, pos = _decode(mv, pos, end, depth + 1)
            d[k] = v
        return d, pos
    raise CBORError("CBOR tags are not used by this protocol")


def loads(data):
    """Decode exactly one CBOR item; CBORError for anything malformed, truncated or trailing."""
    mv = memoryview(data)
    end = len(mv)
    if end == 0:
        raise CBORError("empty payload")
    obj, pos = _decode(mv, 0, end, 0)
    if pos != end:
        raise CBORError("%d trailing bytes after the CBOR item" % (end - pos))
    return obj
