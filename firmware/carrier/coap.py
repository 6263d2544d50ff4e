# CoAP (RFC 7252) client of the device: confirmable exchanges driven by poll(now) on a non-blocking UDP
# socket (never blocks): ACK_TIMEOUT 2 s x random 1-1.5, MAX_RETRANSMIT 4 with doubling, 2-byte tokens and
# Message-IDs, de-duplication of the gateway's CON/NON messages by MID (a duplicate CON is re-ACKed, not
# delivered twice), empty ACK then separate response, Block2 reassembly for large answers, Observe on /cfg.
# The messages themselves are coapmsg.py (no I/O); oscore.py protects what this client sends.
# Device resources (docs/protocol.md): GET /r/<prefix>/<suffix segs> resolves (through rcache),
# POST /d/<id segs>/rpt reports, GET (observe) and POST /d/<id segs>/cfg fetch and acknowledge config.
# Results go to callbacks; the transport interface it shares with mqttdevice.Transport is
#   start(now) stop() poll(now) ready() resolve(id, cb) report(payload, boot, seq, cb) get_config()
#   cfg_ack(payload) on_config(payload) errors.
import os
import time
import socket
from errno import EAGAIN, ECONNREFUSED
from micropython import const

from carrier import cbor, devicemsg, rcache, waiting
from carrier.coapmsg import CoapError, Msg, config_request, decode, dotted, header, post_request, resolve_request

# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_BAD_REQUEST = const(400)  # mirrors devicemsg.BAD_REQUEST
_INTERNAL = const(500)     # mirrors devicemsg.INTERNAL
_K_BOOT = const(10)        # mirrors devicemsg._K_BOOT
_K_CFGVER = const(20)      # mirrors devicemsg._K_CFGVER
_K_CODE = const(3)         # mirrors devicemsg._K_CODE
_K_MSG = const(9)          # mirrors devicemsg._K_MSG
_K_SEQ = const(11)         # mirrors devicemsg._K_SEQ
_NOT_FOUND = const(100)    # mirrors devicemsg.NOT_FOUND
_NO_RESPONSE = const(-1)   # mirrors devicemsg.NO_RESPONSE
_TOO_LARGE = const(413)    # mirrors devicemsg.TOO_LARGE
_CON = const(0)            # mirrors coapmsg.CON
_ACK = const(2)            # mirrors coapmsg.ACK
_RST = const(3)            # mirrors coapmsg.RST
_VALID = const(67)         # mirrors coapmsg.VALID
_CHANGED = const(68)       # mirrors coapmsg.CHANGED
_CONTENT = const(69)       # mirrors coapmsg.CONTENT
_TOO_MANY = const(157)     # CoAP 4.29
_UNAVAILABLE = const(163)  # CoAP 5.03
_RX_MAX = const(1152)      # mirrors coapmsg.RX_MAX

_ACK_TIMEOUT = const(2000)  # ms
_ACK_RANDOM = const(1000)   # ms: ACK_TIMEOUT * (ACK_RANDOM_FACTOR - 1)
_MAX_RETRANSMIT = const(4)
# after k retransmissions the timeout is in [2, 3] s x 2**k: the ranges do not overlap, so the timeout tells how
# many were sent, and MAX_RETRANSMIT were sent once it reaches this
_LAST_TIMEOUT = const(_ACK_TIMEOUT << _MAX_RETRANSMIT)
_SEPARATE_WAIT = const(60000)  # ms to wait for a separate response after an empty ACK
SLOTS = const(4)
_BODY_MAX = const(2048)  # largest Block2-reassembled answer
_DEDUP = const(8)

_FREE = const(0)
_WAIT_ACK = const(1)
_WAIT_RESP = const(2)
_K_RESOLVE = const(1)
_K_REPORT = const(2)
_K_CFG = const(3)
_K_CFGACK = const(4)

_NOTHING = memoryview(b"")


def _rand(n):
    b = os.urandom(2)
    return ((b[0] << 8) | b[1]) % n


class Exchange:
    """One confirmable exchange (request -> response): the request in buf[:length]. Twelve attributes: the most an
    instance keeps in its smallest attribute table (oscore.py's exchanges add two)."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.length = self.state = 0  # _FREE
        self.mid = self.token = self.timeout = self.due = self.kind = self.block = 0
        self.callback = self.arg = self.etag = None


class Client:
    name = "coap"
    _tx: "bytearray | None" = None  # oscore.py: the buffer every request is protected into (else the exchange's own)

    def __init__(self, ident, poller=None, cache=None, exchange=Exchange):
        self.host, self.port = ident.coap
        self.idb = ident.idb
        self.poller = poller
        self.sock = None
        self.cache = cache if cache is not None else rcache.Cache()
        size = max(256, 128 + 2 * len(self.idb))
        self.exchanges = [exchange(size) for _ in range(SLOTS)]
        self._rx_view = _NOTHING  # the datagram being handled
        self._body = bytearray(0)  # Block2 reassembly buffer, allocated on first use
        self._body_len = 0
        self._msg = Msg()
        self._mid = _rand(0x10000)
        self._token = _rand(0x10000)
        self._seen = [-1] * _DEDUP  # MIDs of recent CON/NON messages from the gateway, | answer type << 16
        self._seen_at = 0
        self._empty_buf = bytearray(4)
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
        for ex in self.exchanges:
            if ex.state:
                self._finish(ex, _NO_RESPONSE, None)

    def ready(self):
        return self._free() is not None

    def observing(self):
        """True while the gateway has confirmed our observation of /cfg."""
        return self._obs >= 0

    # -- requests
    def _free(self):
        if self.sock is None:
            return None
        for ex in self.exchanges:
            if ex.state == _FREE:
                return ex
        return None

    def _start(self, kind, cb, arg):
        """A free exchange set up for a new request with a new token; None when all are busy or stopped."""
        ex = self._free()
        if ex is not None:
            ex.kind = kind
            ex.callback = cb
            ex.arg = arg
            ex.block = 0
            ex.etag = None
            ex.token = self._next_token()
        return ex

    def _next_mid(self):
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _next_token(self):
        self._token = (self._token + 1) & 0xFFFF
        if self._token == self._obs:
            self._token = (self._token + 1) & 0xFFFF
        return self._token

    def _seal(self, ex, new):
        """The length of what goes on the wire for the request in ex.buf (new: a new request, else a retransmission
        of it), in self._tx or else ex.buf; -1 when it cannot (then ex is finished)."""
        return ex.length

    def _send(self, ex, now, new=True):
        n = self._seal(ex, new)
        if n < 0:
            return
        if new:
            ex.timeout = _ACK_TIMEOUT + _rand(_ACK_RANDOM + 1)
            ex.state = _WAIT_ACK
        ex.due = time.ticks_add(now, ex.timeout)
        s = self.sock
        if s is None:
            return
        try:
            s.write(self._tx or ex.buf, n)  # one datagram of n bytes, no slice object
        except OSError:
            self.errors += 1  # lost like a datagram: the retransmission timer covers it

    def _build_get(self, ex):
        mid = self._next_mid()
        ex.mid = mid
        if ex.kind == _K_RESOLVE:
            key = ex.arg
            t = rcache.target(key)
            qt = key[len(t) + 6:].encode() if len(key) > len(t) else None
            ex.length = resolve_request(ex.buf, mid, ex.token, t.encode(), ex.etag, qt,
                                        (ex.block << 4) | 6 if ex.block else -1)  # SZX 6: 1024-byte blocks
        else:
            ex.length = config_request(ex.buf, mid, ex.token, self.idb, ex.block)

    def resolve(self, target, cb, qtype=None):
        """Resolve target (a normalised identifier); cb((code, id, values, src, msg)) later.
        src is the gateway's source (0-3) or -1 when served from the device's own cache."""
        key = rcache.key(target, qtype)
        if self.cache.serve(key, self.now, cb):
            return True
        ex = self._start(_K_RESOLVE, cb, key)
        if ex is None:
            return False
        ex.etag = self.cache.etag(key)
        try:
            self._build_get(ex)
        except CoapError:
            cb((_TOO_LARGE, target, None, 0, "identifier too long for a request"))
            return True
        self._send(ex, self.now)
        return True

    def _post(self, kind, leaf, payload, cb, arg):
        ex = self._start(kind, cb, arg)
        if ex is None:
            return False
        ex.mid = self._next_mid()
        try:
            ex.length = post_request(ex.buf, ex.mid, ex.token, self.idb, leaf, payload)
        except CoapError:
            ex.callback = ex.arg = None
            if cb:
                cb(_TOO_LARGE, arg[0], arg[1])
            return True
        self._send(ex, self.now)
        return True

    def report(self, payload, boot, seq, cb):
        """POST a CBOR report; cb(code, boot, seq) with the report_ack code or a failure code."""
        return self._post(_K_REPORT, b"rpt", payload, cb, (boot, seq))

    def cfg_ack(self, payload):
        return self._post(_K_CFGACK, b"cfg", payload, None, None)

    def get_config(self):
        """GET /d/<id>/cfg registering an observation; answers and notifications go to on_config."""
        for ex in self.exchanges:
            if ex.state and ex.kind == _K_CFG:
                return True
        ex = self._start(_K_CFG, None, None)
        if ex is None:
            return False
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
            if not waiting(self.poller, s):
                break
            try:
                # recv, not readinto: a stream read would join several datagrams into one buffer
                d = s.recv(_RX_MAX)
            except OSError as e:
                if e.args and e.args[0] == ECONNREFUSED:
                    # ICMP port unreachable: nothing listens there now; fail fast rather than
                    # retransmitting for 93 s (the reporter backs off and retries)
                    self.errors += 1
                    for ex in self.exchanges:
                        if ex.state == _WAIT_ACK:
                            self._finish(ex, _NO_RESPONSE, None)
                elif not e.args or e.args[0] != EAGAIN:
                    self.errors += 1
                break
            if not d:
                break
            self.datagram(d, now)
            # let the datagram go before the next recv: a 1152-byte buffer is the largest block the device asks
            # the heap for, and a small object kept alive above its last place would split the free heap
            d = None
            self._rx_view = _NOTHING
            if self.sock is None:
                return
        for ex in self.exchanges:
            if ex.state and time.ticks_diff(now, ex.due) >= 0:
                if ex.state == _WAIT_ACK and ex.timeout < _LAST_TIMEOUT:  # fewer than MAX_RETRANSMIT sent
                    ex.timeout *= 2
                    self.retrans += 1
                    self._send(ex, now, False)
                else:
                    self.errors += 1
                    self._finish(ex, _NO_RESPONSE, None)

    def _empty(self, mtype, mid):
        a = self._empty_buf
        header(a, mtype, 0, mid, 0, 0)
        s = self.sock
        if s is None:
            return
        try:
            s.send(a)
        except OSError:
            self.errors += 1

    def datagram(self, data, now):
        """Handle one received datagram."""
        m = self._msg
        self._rx_view = memoryview(data)
        try:
            decode(self._rx_view, len(data), m)
        except CoapError:
            self.errors += 1
            return
        if m.type == _ACK or m.type == _RST:
            for ex in self.exchanges:
                if ex.state == _WAIT_ACK and ex.mid == m.mid:
                    break
            else:
                self.dups += 1  # late or duplicate ACK: its exchange is over
                return
            if m.type == _RST:
                self.errors += 1
                self._finish(ex, _NO_RESPONSE, None)
            elif m.code == 0:
                ex.state = _WAIT_RESP
                ex.due = time.ticks_add(now, _SEPARATE_WAIT)
            elif m.tkl == 2 and m.token == ex.token:
                self._response(ex, now)
            else:
                self.errors += 1
            return
        if m.code < 64:  # a request: the device serves nothing
            if m.type == _CON:
                self._empty(_RST, m.mid)
            return
        ex = None
        if m.tkl == 2:
            for x in self.exchanges:
                if x.state and x.token == m.token:
                    ex = x
                    break
        seen = self._seen
        for v in seen:
            if v & 0xFFFF == m.mid and v >= 0:  # duplicate: answer as before, deliver nothing
                self.dups += 1
                if m.type == _CON:
                    self._empty(v >> 16, m.mid)
                return
        known = ex is not None or (m.tkl == 2 and m.token == self._obs)
        answer = _ACK if known else _RST
        if m.type == _CON:
            self._empty(answer, m.mid)
        seen[self._seen_at] = m.mid | (answer << 16)
        self._seen_at = (self._seen_at + 1) % _DEDUP
        if ex is not None:
            self._response(ex, now)
        elif known and m.code == _CONTENT and self.on_config:
            self.on_config(bytes(self._rx_view[m.payload_at:]))

    def _response(self, ex, now):
        m = self._msg
        pl = self._rx_view[m.payload_at:]
        if m.crit:
            self._finish(ex, _INTERNAL, None)
            return
        if m.block2 >= 0 and m.code == _CONTENT and ex.kind in (_K_RESOLVE, _K_CFG):
            num = m.block2 >> 4
            if num != ex.block or (num and m.etag != ex.etag):
                self._finish(ex, _INTERNAL, None)
                return
            if num == 0:
                ex.etag = m.etag
                self._body_len = 0
                if not len(self._body):
                    self._body = bytearray(_BODY_MAX)
            k = len(pl)
            if self._body_len + k > _BODY_MAX:
                self._finish(ex, _TOO_LARGE, None)
                return
            self._body[self._body_len:self._body_len + k] = pl
            self._body_len += k
            if m.block2 & 8:  # more blocks: ask for the next one
                ex.block = num + 1
                keep = ex.etag
                ex.etag = None  # the ETag option is for revalidation, not for block requests
                self._build_get(ex)
                ex.etag = keep
                self._send(ex, now)
                return
            pl = memoryview(self._body)[:self._body_len]
        self._finish(ex, m.code, pl)

    def _finish(self, ex, code, pl):
        ex.state = _FREE
        kind = ex.kind
        cb = ex.callback
        arg = ex.arg
        ex.callback = ex.arg = None
        m = self._msg
        if kind == _K_RESOLVE:
            if code == _CONTENT or code == _VALID:
                cb(self.cache.settle(arg, code == _CONTENT, pl, m.etag, m.max_age if m.max_age >= 0 else 60, self.now))
            else:
                cb(_failure(code, rcache.target(arg), pl))
        elif kind == _K_REPORT:
            boot, seq = arg
            if code == _CHANGED:
                try:
                    a = devicemsg.decode("report_ack", pl)
                    c = a[_K_CODE] if a[_K_BOOT] == boot and a[_K_SEQ] == seq else _INTERNAL
                    self.cfg_hint = a.get(_K_CFGVER, self.cfg_hint)
                except devicemsg.WireError:
                    c = _BAD_REQUEST
                cb(c, boot, seq)
            else:  # overloaded or rate-limited: Max-Age says when to come back (-1: none)
                cb(_failure(code, None, pl)[0], boot, seq, m.max_age if code == _UNAVAILABLE or code == _TOO_MANY else -1)
        elif kind == _K_CFG:
            if code == _CONTENT:
                if m.observe >= 0 and ex.block == 0:
                    self._obs = ex.token
                if self.on_config:
                    self.on_config(bytes(pl))


def _failure(code, target, pl):
    """Map a failed exchange to (code, id, None, 0, msg), preferring the error payload's own code."""
    if code < 0:
        return (code, target, None, 0, "no response")
    msg = dotted(code)
    # the protocol code of the CoAP code (docs/protocol.md#codes): c.dd -> c*100 + dd, but 4.04 -> NOT_FOUND
    if code == 132:
        c = _NOT_FOUND
    elif code in (67, 128, 131, 141, 157, 163, 164):  # 2.03 4.00 4.03 4.13 4.29 5.03 5.04
        c = (code >> 5) * 100 + (code & 31)
    else:
        c = _BAD_REQUEST if code < 160 else _INTERNAL
    if pl is not None and len(pl):
        try:
            e = cbor.loads(pl)
            if type(e) is dict and type(e.get(_K_CODE)) is int:
                c = e[_K_CODE]
                if type(e.get(_K_MSG)) is str:
                    msg = e[_K_MSG]
        except cbor.CBORError:
            pass
    return (c, target, None, 0, msg)
