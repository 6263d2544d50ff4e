# CoAP (RFC 7252) messages of the device, no I/O; the client that sends them is coap.py, and oscore.py reads
# and writes its options with the same functions.
#  * writing: header(), opt(), uint_opt() and path_opts() put a message together in a preallocated buffer and
#    return the next position; the device's requests are templates: resolve_request() (GET /r/<prefix>/<suffix
#    segs>[?type=]), config_request() (GET /d/<id segs>/cfg, observed) and post_request() (POST /d/<id segs>/<leaf>
#    with a CBOR payload);
#  * reading: decode() fills a reused Msg from a memoryview; option() reads one option header into the
#    caller's [delta, length] pair (no tuple per option).
# Anything malformed or too large for its buffer raises CoapError: the caller drops and counts it.
from micropython import const

CON = const(0)
NON = const(1)
ACK = const(2)
RST = const(3)
GET = const(1)
POST = const(2)
VALID = const(67)    # 2.03
CHANGED = const(68)  # 2.04
CONTENT = const(69)  # 2.05

O_ETAG = const(4)
O_OBSERVE = const(6)
O_URI_PATH = const(11)
O_CF = const(12)
O_MAX_AGE = const(14)
_O_URI_QUERY = const(15)
O_BLOCK2 = const(23)
O_SIZE2 = const(28)
CF_CBOR = const(60)
RX_MAX = const(1152)  # RFC 7252 4.6 upper bound of a message

_KNOWN_CRIT = (1, 3, 5, 7, 11, 15, 17, 23, 27, 35, 39)  # critical options of RFC 7252/7959


class CoapError(ValueError):
    pass


class Msg:
    """Header and the options the device uses of the last decode(); the payload is buf[payload_at:n]."""

    def __init__(self):
        self.type = self.code = self.mid = self.token = self.tkl = 0
        self.etag = None
        self.max_age = -1  # -1: no Max-Age option (which means 60 s, RFC 7252 5.10.5)
        self.observe = self.block2 = self.content_format = -1
        self.crit = 0  # number of an unrecognised critical option, 0 if none
        self.payload_at = 0


def dotted(code):
    return "%d.%02d" % (code >> 5, code & 31)


# ---- writing ---------------------------------------------------------------------------------------------
def header(buf, mtype, code, mid, token, tkl=2):
    buf[0] = 0x40 | (mtype << 4) | tkl
    buf[1] = code
    buf[2] = mid >> 8
    buf[3] = mid & 255
    for i in range(tkl):
        buf[4 + i] = (token >> (8 * (tkl - 1 - i))) & 255
    return 4 + tkl


def _ohdr(buf, pos, delta, n):
    """Option header for a value of n bytes; CoapError when the value would not fit in buf."""
    if pos + 5 + n > len(buf):
        raise CoapError("message larger than its buffer")
    at = pos
    pos += 1
    b = 0
    for i in range(2):
        v = n if i else delta
        if v >= 269:
            buf[pos] = (v - 269) >> 8
            buf[pos + 1] = (v - 269) & 255
            pos += 2
            v = 14
        elif v >= 13:
            buf[pos] = v - 13
            pos += 1
            v = 13
        b = (b << 4) | v
    buf[at] = b
    return pos


def opt(buf, pos, delta, data, start=0, n=-1):
    """Append an option (delta from the previous option number) whose value is data[start:start+n] (the rest of
    data when n < 0); returns the end."""
    if n < 0:
        n = len(data) - start
    pos = _ohdr(buf, pos, delta, n)
    for i in range(n):
        buf[pos + i] = data[start + i]
    return pos + n


def uint_opt(buf, pos, delta, v):
    n = 0
    x = v
    while x:
        n += 1
        x >>= 8
    pos = _ohdr(buf, pos, delta, n)
    for i in range(n):
        buf[pos + i] = (v >> (8 * (n - 1 - i))) & 255
    return pos + n


def path_opts(buf, pos, last, data):
    """Uri-Path options for the '/'-separated segments of data (bytes) after option number last; returns the
    end (the last option written is then O_URI_PATH)."""
    start = 0
    end = len(data)
    while True:
        i = data.find(b"/", start)
        if i < 0:
            i = end
        pos = opt(buf, pos, O_URI_PATH - last, data, start, i - start)
        last = O_URI_PATH
        if i == end:
            return pos
        start = i + 1


def resolve_request(buf, mid, token, idb, etag=None, qtype=None, block=-1):
    """CON GET /r/<prefix>/<suffix segs>[?type=qtype] into buf; returns the length."""
    pos = header(buf, CON, GET, mid, token)
    last = 0
    if etag:
        pos = opt(buf, pos, O_ETAG, etag)
        last = O_ETAG
    pos = path_opts(buf, pos, last, b"r")
    pos = path_opts(buf, pos, O_URI_PATH, idb)
    last = O_URI_PATH
    if qtype:
        n = len(qtype)
        pos = _ohdr(buf, pos, _O_URI_QUERY - last, 5 + n)
        buf[pos:pos + 5] = b"type="
        buf[pos + 5:pos + 5 + n] = qtype
        pos += 5 + n
        last = _O_URI_QUERY
    if block >= 0:
        pos = uint_opt(buf, pos, O_BLOCK2 - last, block)
    return pos


def _device_path(buf, pos, last, idb, leaf):
    pos = path_opts(buf, pos, last, b"d")
    pos = path_opts(buf, pos, O_URI_PATH, idb)
    return path_opts(buf, pos, O_URI_PATH, leaf)


def config_request(buf, mid, token, idb, block=0):
    """CON GET /d/<id segs>/cfg into buf: Observe: 0 on the first block, Block2 (SZX 6) asking for the others;
    returns the length."""
    pos = header(buf, CON, GET, mid, token)
    if block:
        return uint_opt(buf, _device_path(buf, pos, 0, idb, b"cfg"), O_BLOCK2 - O_URI_PATH, (block << 4) | 6)
    return _device_path(buf, uint_opt(buf, pos, O_OBSERVE, 0), O_OBSERVE, idb, b"cfg")


def post_request(buf, mid, token, idb, leaf, payload):
    """CON POST /d/<id segs>/<leaf> with Content-Format CBOR and payload into buf; returns the length."""
    pos = header(buf, CON, POST, mid, token)
    pos = uint_opt(buf, _device_path(buf, pos, 0, idb, leaf), O_CF - O_URI_PATH, CF_CBOR)
    n = len(payload)
    if pos + 1 + n > len(buf):
        raise CoapError("payload larger than its buffer")
    buf[pos] = 0xFF
    buf[pos + 1:pos + 1 + n] = payload
    return pos + 1 + n


# ---- reading ---------------------------------------------------------------------------------------------
def uint(mv, pos, n):
    v = 0
    for i in range(n):
        v = (v << 8) | mv[pos + i]
    return v


def option(mv, pos, n, hd):
    """Read the option header at mv[pos] (not the 0xFF payload marker) of the message mv[:n] into
    hd = [delta, value length]; returns where the value starts. CoapError when it is truncated, uses the
    reserved nibble 15 or runs past n."""
    b = mv[pos]
    pos += 1
    for i in range(2):
        v = (b >> 4) & 15
        b <<= 4
        if v == 13:
            if pos >= n:
                raise CoapError("truncated option")
            v = mv[pos] + 13
            pos += 1
        elif v == 14:
            if pos + 1 >= n:
                raise CoapError("truncated option")
            v = ((mv[pos] << 8) | mv[pos + 1]) + 269
            pos += 2
        elif v == 15:
            raise CoapError("reserved option nibble 15")
        hd[i] = v
    if pos + hd[1] > n:
        raise CoapError("option longer than the message")
    return pos


_hd = [0, 0]  # decode()'s option header


def decode(mv, n, m):
    """Parse mv[:n] into the Msg m; CoapError when malformed."""
    if n < 4:
        raise CoapError("shorter than a header")
    b0 = mv[0]
    if b0 >> 6 != 1:
        raise CoapError("version is not 1")
    tkl = b0 & 15
    if tkl > 8:
        raise CoapError("token length > 8")
    m.type = (b0 >> 4) & 3
    m.code = mv[1]
    m.mid = (mv[2] << 8) | mv[3]
    pos = 4 + tkl
    if pos > n:
        raise CoapError("truncated token")
    if m.code == 0 and n != 4:
        raise CoapError("empty message with content")
    m.tkl = tkl
    m.token = uint(mv, 4, tkl)
    m.etag = None
    m.max_age = -1
    m.observe = m.block2 = m.content_format = -1
    m.crit = 0
    m.payload_at = n
    hd = _hd
    num = 0
    while pos < n:
        if mv[pos] == 0xFF:
            pos += 1
            if pos == n:
                raise CoapError("payload marker without payload")
            m.payload_at = pos
            break
        pos = option(mv, pos, n, hd)
        num += hd[0]
        ln = hd[1]
        if num == O_ETAG:
            if not 1 <= ln <= 8:
                raise CoapError("bad ETag length")
            m.etag = bytes(mv[pos:pos + ln])
        elif num == O_MAX_AGE or num == O_OBSERVE or num == O_BLOCK2 or num == O_CF or num == O_SIZE2:
            if ln > 4:
                raise CoapError("uint option longer than 4 bytes")
            v = uint(mv, pos, ln)
            if num == O_MAX_AGE:
                m.max_age = v
            elif num == O_OBSERVE:
                m.observe = v
            elif num == O_BLOCK2:
                m.block2 = v
            elif num == O_CF:
                m.content_format = v
        elif num & 1 and not m.crit and num not in _KNOWN_CRIT:
            m.crit = num
        pos += ln
    return m
