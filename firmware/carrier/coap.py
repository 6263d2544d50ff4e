# CoAP (RFC 7252) client of the device, in two layers:
#  * codec, no I/O: header()/opt()/uint_opt() write a message into a preallocated buffer; decode() fills a
#    reused Msg from a memoryview (CoapError for anything malformed: the caller drops and counts it);
#  * Client: confirmable exchanges driven by poll(now) on a non-blocking UDP socket (never blocks):
#    ACK_TIMEOUT 2 s x random 1-1.5, MAX_RETRANSMIT 4 with doubling, 2-byte tokens and Message-IDs,
#    de-duplication of the gateway's CON/NON messages by MID (a duplicate CON is re-ACKed, not delivered
#    twice), empty ACK then separate response, Block2 reassembly for large answers, Observe on /cfg.
# Device resources (docs/protocol.md): GET /r/<prefix>/<suffix segs> resolves (through rcache),
# POST /d/<id segs>/rpt reports, GET (observe) and POST /d/<id segs>/cfg fetch and acknowledge config.
# Results go to callbacks; the transport interface it shares with mqtt.Transport is
#   start(now) stop() poll(now) ready() resolve(id, cb) report(payload, boot, seq, cb) get_config()
#   cfg_ack(payload) on_config(payload) errors.
import os
import time
import socket
from errno import EAGAIN, ECONNREFUSED
from micropython import const

from carrier import cbor, devicemsg, rcache

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
O_URI_QUERY = const(15)
O_BLOCK2 = const(23)
O_SIZE2 = const(28)
CF_CBOR = const(60)

ACK_TIMEOUT = const(2000)      # ms
ACK_RANDOM = const(1000)       # ms: ACK_TIMEOUT * (ACK_RANDOM_FACTOR - 1)
MAX_RETRANSMIT = const(4)
SEPARATE_WAIT = const(60000)   # ms to wait for a separate response after an empty ACK
SLOTS = const(4)
RX_MAX = const(1152)           # RFC 7252 4.6 upper bound of a message
BODY_MAX = const(2048)         # largest Block2-reassembled answer
DEDUP = const(8)

_FREE = const(0)
_WAIT_ACK = const(1)
_WAIT_RESP = const(2)
_K_RESOLVE = const(1)
_K_REPORT = const(2)
_K_CFG = const(3)
_K_CFGACK = const(4)

_KNOWN_CRIT = (1, 3, 5, 7, 11, 15, 17, 23, 27, 35, 39)  # critical options of RFC 7252/7959

# CoAP response code -> protocol code (docs/protocol.md#codes), when the payload carries none
_CODES = {67: devicemsg.NOT_MODIFIED, 128: devicemsg.BAD_REQUEST, 131: devicemsg.FORBIDDEN, 132: devicemsg.NOT_FOUND,
          141: devicemsg.TOO_LARGE, 157: devicemsg.RATE_LIMITED, 163: devicemsg.UPSTREAM_UNAVAILABLE,
          164: devicemsg.UPSTREAM_TIMEOUT}


class CoapError(ValueError):
    pass


class Msg:
    """Decoded header and the options the device uses; payload is buf[pl:n]."""

    def __init__(self):
        self.t = self.code = self.mid = self.tok = self.tkl = 0
        self.etag = None
        self.max_age = 60
        self.obs = self.block2 = self.cf = -1
        self.crit = 0  # number of an unrecognised critical option, 0 if none
        self.pl = self.n = 0


def dotted(code):
    return "%d.%02d" % (code >> 5, code & 31)


# ---- encoder -------------------------------------------------------------------------------------------
def header(buf, t, code, mid, tok, tkl=2):
    buf[0] = 0x40 | (t << 4) | tkl
    buf[1] = code
    buf[2] = mid >> 8
    buf[3] = mid & 255
    for i in range(tkl):
        buf[4 + i] = (tok >> (8 * (tkl - 1 - i))) & 255
    return 4 + tkl


def _nib(v):
    return v if v < 13 else (13 if v < 269 else 14)


def _ohdr(buf, pos, delta, n):
    """Option header for a value of n bytes; CoapError when the value would not fit in buf."""
    if pos + 5 + n > len(buf):
        raise CoapError("message larger than its buffer")
    dn = _nib(delta)
    ln = _nib(n)
    buf[pos] = (dn << 4) | ln
    pos += 1
    for v, nib in ((delta, dn), (n, ln)):
        if nib == 13:
            buf[pos] = v - 13
            pos += 1
        elif nib == 14:
            buf[pos] = (v - 269) >> 8
            buf[pos + 1] = (v - 269) & 255
            pos += 2
    return pos


def opt(buf, pos, delta, data, start=0, end=-1):
    """Append an option (delta from the previous option number) whose value is data[start:end]."""
    if end < 0:
        end = len(data)
    n = end - start
    pos = _ohdr(buf, pos, delta, n)
    if n:
        buf[pos:pos + n] = memoryview(data)[start:end]
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
    """Uri-Path options for the '/'-separated segments of data (bytes); returns (pos, last option no.)."""
    start = 0
    end = len(data)
    while True:
        i = data.find(b"/", start)
        if i < 0:
            i = end
        pos = opt(buf, pos, O_URI_PATH - last, data, start, i)
        last = O_URI_PATH
        if i == end:
            return pos, last
        start = i + 1


def resolve_request(buf, mid, tok, idb, etag=None, qtype=None, block=-1):
    """CON GET /r/<prefix>/<suffix segs>[?type=qtype] into buf; returns the length."""
    pos = header(buf, CON, GET, mid, tok)
    last = 0
    if etag:
        pos = opt(buf, pos, O_ETAG, etag)
        last = O_ETAG
    pos, last = path_opts(buf, pos, last, b"r")
    pos, last = path_opts(buf, pos, last, idb)
    if qtype:
        n = len(qtype)
        pos = _ohdr(buf, pos, O_URI_QUERY - last, 5 + n)
        buf[pos:pos + 5] = b"type="
        buf[pos + 5:pos + 5 + n] = qtype
        pos += 5 + n
        last = O_URI_QUERY
    if block >= 0:
        pos = uint_opt(buf, pos, O_BLOCK2 - last, block)
    return pos


# ---- decoder -------------------------------------------------------------------------------------------
def _ext(mv, pos, n, v):
    if v < 13:
        return v, pos
    if v == 13:
        if pos >= n:
            raise CoapError("truncated option")
        return mv[pos] + 13, pos + 1
    if v == 14:
        if pos + 1 >= n:
            raise CoapError("truncated option")
        return ((mv[pos] << 8) | mv[pos + 1]) + 269, pos + 2
    raise CoapError("reserved option nibble 15")


def _uint(mv, pos, ln):
    v = 0
    for i in range(ln):
        v = (v << 8) | mv[pos + i]
    return v


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
    m.t = (b0 >> 4) & 3
    m.code = mv[1]
    m.mid = (mv[2] << 8) | mv[3]
    pos = 4 + tkl
    if pos > n:
        raise CoapError("truncated token")
    if m.code == 0 and n != 4:
        raise CoapError("empty message with content")
    m.tkl = tkl
    m.tok = _uint(mv, 4, tkl)
    m.etag = None
    m.max_age = 60
    m.obs = m.block2 = m.cf = -1
    m.crit = 0
    m.pl = n
    m.n = n
    num = 0
    while pos < n:
        b = mv[pos]
        pos += 1
        if b == 0xFF:
            if pos == n:
                raise CoapError("payload marker without payload")
            m.pl = pos
            break
        d, pos = _ext(mv, pos, n, b >> 4)
        ln, pos = _ext(mv, pos, n, b & 15)
        num += d
        if pos + ln > n:
            raise CoapError("option longer than the message")
        if num == O_ETAG:
            if not 1 <= ln <= 8:
                raise CoapError("bad ETag length")
            m.etag = bytes(mv[pos:pos + ln])
        elif num == O_MAX_AGE or num == O_OBSERVE or num == O_BLOCK2 or num == O_CF or num == O_SIZE2:
            if ln > 4:
                raise CoapError("uint option longer than 4 bytes")
            v = _uint(mv, pos, ln)
            if num == O_MAX_AGE:
                m.max_age = v
            elif num == O_OBSERVE:
                m.obs = v
            elif num == O_BLOCK2:
                m.block2 = v
            elif num == O_CF:
                m.cf = v
        elif num & 1 and not m.crit and num not in _KNOWN_CRIT:
            m.crit = num
        pos += ln
    return m


# ---- client --------------------------------------------------------------------------------------------
def _rand(n):
    b = os.urandom(2)
    return ((b[0] << 8) | b[1]) % n


class _Ex:
    """One confirmable exchange (request -> response), with its own transmit buffer."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.n = 0
        self.st = _FREE
        self.mid = self.tok = self.tries = self.tmo = self.due = self.kind = 0
        self.block = 0
        self.cb = None
        self.arg = None
        self.etag = None


class Client:
    name = "coap"

    def __init__(self, ident, poller=None, cache=None):
        self.host, self.port = ident.coap
        self.idb = ident.idb
        self.poller = poller
        self.sock = None
        self.cache = cache if cache is not None else rcache.Cache()
        size = max(256, 128 + 2 * len(self.idb))
        self._ex = [_Ex(size) for _ in range(SLOTS)]
        self._rxv = memoryview(b"")  # the datagram being handled
        self._body = bytearray(0)  # Block2 reassembly buffer, allocated on first use
        self._blen = 0
        self._m = Msg()
        self._mid = _rand(0x10000)
        self._tok = _rand(0x10000)
        self._seen = [-1] * DEDUP  # MIDs of recent CON/NON messages from the gateway
        self._si = 0
        self._ack = bytearray(4)
        self._obs = -1  # token of the /cfg observation
        self.on_config = None
        self.cfg_hint = 0  # the desired cfgver the last report ack named (0: none)
        self.now = time.ticks_ms()  # ticks of the last start()/poll(): requests are timed from it
        self.errors = 0   # socket errors, malformed datagrams, unanswered exchanges
        self.retrans = 0
        self.dups = 0

    # -- lifecycle
    def start(self, now):
        self.now = now
        ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_DGRAM)[0]
        s = socket.socket(ai[0], socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(ai[-1])
        self.sock = s
        if self.poller:
            self.poller.register(s, 1)

    def stop(self):
        s = self.sock
        if s is None:
            return
        self.sock = None
        if self.poller:
            try:
                self.poller.unregister(s)
            except (OSError, KeyError, ValueError):
                pass
        s.close()
        self._obs = -1
        for ex in self._ex:
            if ex.st:
                self._finish(ex, devicemsg.NO_RESPONSE, None)

    def ready(self):
        return self._slot() is not None

    def busy(self):
        n = 0
        for ex in self._ex:
            if ex.st:
                n += 1
        return n

    def observing(self):
        """True while the gateway has confirmed our observation of /cfg."""
        return self._obs >= 0

    # -- requests
    def _slot(self):
        if self.sock is None:
            return None
        for ex in self._ex:
            if ex.st == _FREE:
                return ex
        return None

    def _next_mid(self):
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _next_tok(self):
        self._tok = (self._tok + 1) & 0xFFFF
        if self._tok == self._obs:
            self._tok = (self._tok + 1) & 0xFFFF
        return self._tok

    def _send(self, ex, now, new=True):
        if new:
            ex.tries = 0
            ex.tmo = ACK_TIMEOUT + _rand(ACK_RANDOM + 1)
            ex.st = _WAIT_ACK
        ex.due = time.ticks_add(now, ex.tmo)
        s = self.sock
        if s is None:
            return
        try:
            s.send(memoryview(ex.buf)[:ex.n])
        except OSError:
            self.errors += 1  # lost like a datagram: the retransmission timer covers it

    def _build_get(self, ex):
        b = ex.buf
        mid = self._next_mid()
        ex.mid = mid
        if ex.kind == _K_RESOLVE:
            q = ex.arg.find("?type=")
            idb = (ex.arg if q < 0 else ex.arg[:q]).encode()
            qt = None if q < 0 else ex.arg[q + 6:].encode()
            ex.n = resolve_request(b, mid, ex.tok, idb, ex.etag, qt, self._b2(ex))
            return
        # _K_CFG: GET /d/<id>/cfg, Observe: 0 on the first block
        pos = header(b, CON, GET, mid, ex.tok)
        last = 0
        if ex.block == 0:
            pos = uint_opt(b, pos, O_OBSERVE, 0)
            last = O_OBSERVE
        pos, last = path_opts(b, pos, last, b"d")
        pos, last = path_opts(b, pos, last, self.idb)
        pos, last = path_opts(b, pos, last, b"cfg")
        if ex.block:
            pos = uint_opt(b, pos, O_BLOCK2 - last, self._b2(ex))
        ex.n = pos

    @staticmethod
    def _b2(ex):
        return (ex.block << 4) | 6 if ex.block else -1  # SZX 6 = 1024-byte blocks

    def resolve(self, target, cb, qtype=None):
        """Resolve target (a normalised identifier); cb((code, id, values, src, msg)) later.
        src is the gateway's source (0-3) or -1 when served from the device's own cache."""
        key = target if qtype is None else target + "?type=" + qtype
        now = self.now
        e = self.cache.get(key)
        if e and self.cache.fresh(e, now):
            self.cache.hits += 1
            cb(rcache.answer(target, e[3], -1))
            return True
        ex = self._slot()
        if ex is None:
            return False
        ex.kind = _K_RESOLVE
        ex.arg = key
        ex.cb = cb
        ex.block = 0
        ex.etag = e[1] if e else None
        ex.tok = self._next_tok()
        try:
            self._build_get(ex)
        except CoapError:
            cb((devicemsg.TOO_LARGE, target, None, 0, "identifier too long for a request"))
            return True
        self._send(ex, now)
        return True

    def _post(self, kind, seg, payload, cb, arg):
        ex = self._slot()
        if ex is None:
            return False
        ex.kind = kind
        ex.cb = cb
        ex.arg = arg
        ex.block = 0
        ex.tok = self._next_tok()
        ex.mid = self._next_mid()
        b = ex.buf
        try:
            pos = header(b, CON, POST, ex.mid, ex.tok)
            pos, last = path_opts(b, pos, 0, b"d")
            pos, last = path_opts(b, pos, last, self.idb)
            pos, last = path_opts(b, pos, last, seg)
            pos = uint_opt(b, pos, O_CF - last, CF_CBOR)
            n = len(payload)
            if pos + 1 + n > len(b):
                raise CoapError("payload larger than the transmit buffer")
        except CoapError:
            ex.cb = ex.arg = None
            if cb:
                cb(devicemsg.TOO_LARGE, arg[0], arg[1])
            return True
        b[pos] = 0xFF
        b[pos + 1:pos + 1 + n] = payload
        ex.n = pos + 1 + n
        self._send(ex, self.now)
        return True

    def report(self, payload, boot, seq, cb):
        """POST a CBOR report; cb(code, boot, seq) with the report_ack code or a failure code."""
        return self._post(_K_REPORT, b"rpt", payload, cb, (boot, seq))

    def cfg_ack(self, payload):
        return self._post(_K_CFGACK, b"cfg", payload, None, None)

    def get_config(self):
        """GET /d/<id>/cfg registering an observation; answers and notifications go to on_config."""
        for ex in self._ex:
            if ex.st and ex.kind == _K_CFG:
                return True
        ex = self._slot()
        if ex is None:
            return False
        ex.kind = _K_CFG
        ex.cb = None
        ex.arg = None
        ex.block = 0
        ex.etag = None
        ex.tok = self._next_tok()
        self._build_get(ex)
        self._send(ex, self.now)
        return True

    # -- I/O
    def poll(self, now):
        self.now = now
        s = self.sock
        if s is None:
            return
        for _ in range(8):  # bounded work per call
            try:
                # recv, not readinto: a stream read would join several datagrams into one buffer
                d = s.recv(RX_MAX)
            except OSError as e:
                if e.args and e.args[0] == ECONNREFUSED:
                    # ICMP port unreachable: nothing listens there now; fail fast rather than
                    # retransmitting for 93 s (the reporter backs off and retries)
                    self.errors += 1
                    for ex in self._ex:
                        if ex.st == _WAIT_ACK:
                            self._finish(ex, devicemsg.NO_RESPONSE, None)
                elif not e.args or e.args[0] != EAGAIN:
                    self.errors += 1
                break
            if not d:
                break
            self.datagram(d, now)
            if self.sock is None:
                return
        for ex in self._ex:
            if ex.st and time.ticks_diff(now, ex.due) >= 0:
                if ex.st == _WAIT_ACK and ex.tries < MAX_RETRANSMIT:
                    ex.tries += 1
                    ex.tmo *= 2
                    self.retrans += 1
                    self._send(ex, now, False)
                else:
                    self.errors += 1
                    self._finish(ex, devicemsg.NO_RESPONSE, None)

    def _empty(self, t, mid):
        a = self._ack
        a[0] = 0x40 | (t << 4)
        a[1] = 0
        a[2] = mid >> 8
        a[3] = mid & 255
        s = self.sock
        if s is None:
            return
        try:
            s.send(a)
        except OSError:
            self.errors += 1

    def datagram(self, data, now):
        """Handle one received datagram."""
        m = self._m
        self._rxv = memoryview(data)
        try:
            decode(self._rxv, len(data), m)
        except CoapError:
            self.errors += 1
            return
        if m.t == ACK or m.t == RST:
            for ex in self._ex:
                if ex.st == _WAIT_ACK and ex.mid == m.mid:
                    break
            else:
                self.dups += 1  # late or duplicate ACK: its exchange is over
                return
            if m.t == RST:
                self.errors += 1
                self._finish(ex, devicemsg.NO_RESPONSE, None)
            elif m.code == 0:
                ex.st = _WAIT_RESP
                ex.due = time.ticks_add(now, SEPARATE_WAIT)
            elif m.tkl == 2 and m.tok == ex.tok:
                self._response(ex, now)
            else:
                self.errors += 1
            return
        if m.code < 64:  # a request: the device serves nothing
            if m.t == CON:
                self._empty(RST, m.mid)
            return
        ex = None
        if m.tkl == 2:
            for x in self._ex:
                if x.st and x.tok == m.tok:
                    ex = x
                    break
        seen = self._seen
        for v in seen:
            if v & 0xFFFF == m.mid and v >= 0:  # duplicate: answer as before, deliver nothing
                self.dups += 1
                if m.t == CON:
                    self._empty(v >> 16, m.mid)
                return
        known = ex is not None or (m.tkl == 2 and m.tok == self._obs)
        t = ACK if known else RST
        if m.t == CON:
            self._empty(t, m.mid)
        seen[self._si] = m.mid | (t << 16)
        self._si = (self._si + 1) % DEDUP
        if ex is not None:
            self._response(ex, now)
        elif known and m.code == CONTENT and self.on_config:
            self.on_config(bytes(self._rxv[m.pl:m.n]))

    def _response(self, ex, now):
        m = self._m
        pl = self._rxv[m.pl:m.n]
        if m.crit:
            self._finish(ex, devicemsg.INTERNAL, None)
            return
        if m.block2 >= 0 and m.code == CONTENT and ex.kind in (_K_RESOLVE, _K_CFG):
            num = m.block2 >> 4
            if num != ex.block or (num and m.etag != ex.etag):
                self._finish(ex, devicemsg.INTERNAL, None)
                return
            if num == 0:
                ex.etag = m.etag
                self._blen = 0
                if not len(self._body):
                    self._body = bytearray(BODY_MAX)
            k = len(pl)
            if self._blen + k > BODY_MAX:
                self._finish(ex, devicemsg.TOO_LARGE, None)
                return
            self._body[self._blen:self._blen + k] = pl
            self._blen += k
            if m.block2 & 8:  # more blocks: ask for the next one
                ex.block = num + 1
                keep = ex.etag
                ex.etag = None  # the ETag option is for revalidation, not for block requests
                self._build_get(ex)
                ex.etag = keep
                self._send(ex, now)
                return
            pl = memoryview(self._body)[:self._blen]
        self._finish(ex, m.code, pl)

    def _finish(self, ex, code, pl):
        ex.st = _FREE
        kind = ex.kind
        cb = ex.cb
        arg = ex.arg
        ex.cb = ex.arg = None
        m = self._m
        if kind == _K_RESOLVE:
            q = arg.find("?type=")
            target = arg if q < 0 else arg[:q]
            now = self.now
            if code == CONTENT:
                data = bytes(pl)
                res = rcache.answer(target, data)
                if res[0] == devicemsg.OK:
                    self.cache.put(arg, m.etag, m.max_age, data, now)
            elif code == VALID:
                e = self.cache.refresh(arg, m.max_age, now)
                res = rcache.answer(target, e[3], -2) if e else (devicemsg.INTERNAL, target, None, 0, "2.03 without entry")
            else:
                res = _failure(code, target, pl)
            cb(res)
        elif kind == _K_REPORT:
            boot, seq = arg
            if code == CHANGED:
                try:
                    a = devicemsg.decode("report_ack", pl)
                    c = a[devicemsg.K_CODE] if a[devicemsg.K_BOOT] == boot and a[devicemsg.K_SEQ] == seq else devicemsg.INTERNAL
                    self.cfg_hint = a.get(devicemsg.K_CFGVER, self.cfg_hint)
                except devicemsg.WireError:
                    c = devicemsg.BAD_REQUEST
            else:
                c = _failure(code, None, pl)[0]
            cb(c, boot, seq)
        elif kind == _K_CFG:
            if code == CONTENT:
                if m.obs >= 0 and ex.block == 0:
                    self._obs = ex.tok
                if self.on_config:
                    self.on_config(bytes(pl))


def _failure(code, target, pl):
    """Map a failed exchange to (code, id, None, 0, msg), preferring the error payload's own code."""
    if code < 0:
        return (code, target, None, 0, "no response")
    msg = dotted(code)
    c = _CODES.get(code, devicemsg.BAD_REQUEST if code < 160 else devicemsg.INTERNAL)
    if pl is not None and len(pl):
        try:
            e = cbor.loads(pl)
            if type(e) is dict and type(e.get(devicemsg.K_CODE)) is int:
                c = e[devicemsg.K_CODE]
                if type(e.get(devicemsg.K_MSG)) is str:
                    msg = e[devicemsg.K_MSG]
        except cbor.CBORError:
            pass
    return (c, target, None, 0, msg)
