# OSCORE (RFC 8613) for the device's CoAP client: the device authenticates and encrypts its requests with the
# per-device key written by `ida flash`, the gateway answers under the same security context
# (docs/security.md). Parameters, fixed for the whole fleet:
#   Master Secret   the device key (identity.key, 16 bytes)
#   Master Salt     SALT ("ida-oscore-v1": keeps this use of the key apart from any other)
#   Sender ID       kid(idb) = SHA-256("ida-oscore-kid" 0x00 identifier)[:6] (identifier normalised, UTF-8)
#   Recipient ID    GATEWAY_ID = b"" (the gateway's Sender ID)
#   ID Context      none
#   AEAD / HKDF     AES-CCM-16-64-128 (COSE 10) / HKDF-SHA256 (carrier/crypto.py)
# Layers:
#   * Context: key derivation (RFC 8613 3.2), AAD and nonce construction (5.3, 5.4), protect() a plain CoAP
#     request into an OSCORE message (4: Uri-Host/Uri-Port/Proxy-* stay outer, Observe both, all else inner;
#     outer code POST, FETCH with Observe), unprotect() a response (8.4: kid, kid context and flag checks;
#     nonce from the response's Partial IV when present, else from the request's). The sender sequence number
#     is reserved SEQ_WINDOW at a time through persist() before use, so a power cut never reuses a nonce.
#   * Client: coap.Client whose exchanges go out protected (its _seal() hook) and whose answers are unprotected
#     before the plain client sees them; Echo (RFC 9175) replay-window recovery is answered once per request; an
#     unprotected error answer ends the exchange with code UNAUTHORIZED (401); an unprotected success answer
#     is dropped (anyone could have sent it); notifications must carry increasing Partial IVs (7.4.1).
import time
import struct
import hashlib
from micropython import const

from carrier import cbor, coap, coapmsg, crypto
from carrier.coapmsg import CoapError, option, opt, uint, uint_opt

_ALG = const(10)          # COSE AES-CCM-16-64-128
_KEY_LEN = const(16)
_KID_LEN = const(6)
SALT = b"ida-oscore-v1"
KID_TAG = b"ida-oscore-kid\x00"
GATEWAY_ID = b""
SEQ_WINDOW = const(100)  # sequence numbers reserved per write to the kv store
MAX_SEQ = 0xFFFFFFFFFF   # 2**40 - 1: Partial IV is at most 5 bytes
KV_SEQ = "oscseq"
_OVERHEAD = const(80)     # OSCORE option, code byte, payload marker, tag and an Echo value, over a plain request
_O_OSCORE = const(9)
_O_ECHO = const(252)
_FETCH = const(5)
_OUTER = (3, 7, 35, 39)  # Uri-Host, Uri-Port, Proxy-Uri, Proxy-Scheme: class U
_UNAUTH = const(129)      # CoAP 4.01
_TOO_LARGE = const(141)   # CoAP 4.13
_INTERNAL = const(160)    # CoAP 5.00
# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_CON = const(0)          # mirrors coapmsg.CON
_ACK = const(2)          # mirrors coapmsg.ACK
_POST = const(2)         # mirrors coapmsg.POST
_O_OBSERVE = const(6)    # mirrors coapmsg.O_OBSERVE
_RX_MAX = const(1152)    # mirrors coapmsg.RX_MAX: also the largest plaintext handled
_GAP = const(16)          # where unprotect() puts a response's inner message for the client (see Client._inner)
_WAIT_ACK = const(1)     # mirrors coap._WAIT_ACK
_K_CFG = const(3)        # mirrors coap._K_CFG
_UNAUTHORIZED = const(401)  # mirrors devicemsg.UNAUTHORIZED: the gateway did not authenticate us


class OscoreError(CoapError):
    pass


class NotProtected(OscoreError):
    pass


def kid(idb):
    """The device's Sender ID for its normalised identifier (bytes)."""
    return hashlib.sha256(KID_TAG + idb).digest()[:_KID_LEN]


def _info(rid, idctx, typ, n):
    return cbor.dumps([rid, idctx, _ALG, typ, n])


def derive(secret, sender_id, recipient_id, salt=SALT, id_context=None):
    """(Sender Key, Recipient Key, Common IV) of RFC 8613 3.2.1."""
    return (crypto.hkdf(salt, secret, _info(sender_id, id_context, "Key", _KEY_LEN), _KEY_LEN),
            crypto.hkdf(salt, secret, _info(recipient_id, id_context, "Key", _KEY_LEN), _KEY_LEN),
            crypto.hkdf(salt, secret, _info(b"", id_context, "IV", crypto.NONCE), crypto.NONCE))


def _put_piv(buf, v):
    """Partial IV of sequence number v into buf (minimal big-endian, 0 is one zero byte); its length."""
    n = 1
    while n < 5 and v >> (8 * n):
        n += 1
    for i in range(n):
        buf[i] = (v >> (8 * (n - 1 - i))) & 255
    return n


_hd = [0, 0]  # delta and value length of the option header read last (coapmsg.option)


def seq_store(store, key):
    """(first usable sequence number, persist(limit)) for key, kept in store's kv "oscseq" as a 4-byte tag of
    the key + the reserved limit (8 bytes BE). A new key (re-provisioning) starts at 0."""
    tag = hashlib.sha256(b"ida-oscore-seq\x00" + key).digest()[:4]
    d = store.kv_get(KV_SEQ)
    start = struct.unpack(">Q", d[4:12])[0] if d and len(d) == 12 and d[:4] == tag else 0

    def persist(limit):
        store.kv_set(KV_SEQ, tag + struct.pack(">Q", limit))

    return start, persist


class Context:
    """One OSCORE security context (client side). seq is the next sender sequence number; persist(limit) must
    make every number below limit unusable after a reboot (it is called before the first one is used).
    protect() and unprotect() work in preallocated buffers (plain, nonce, AAD, Partial IVs)."""

    def __init__(self, secret, sender_id, recipient_id, salt=SALT, id_context=None, seq=0, persist=None):
        if len(sender_id) > 7 or len(recipient_id) > 7 or sender_id == recipient_id:
            raise ValueError("OSCORE ids: at most 7 bytes, and different")
        self.sid = sender_id
        self.rid = recipient_id
        self.idctx = id_context
        sk, rk, self._common_iv = derive(secret, sender_id, recipient_id, salt, id_context)
        self._snd = crypto.CCM(sk)
        self._rcv = crypto.CCM(rk)
        self.seq = seq
        self._limit = seq
        self._persist = persist
        self._nonce = bytearray(crypto.NONCE)
        # Enc_structure ["Encrypt0", h'', external_aad], external_aad = [1, [10], request kid, request piv, h''].
        # The request kid is always ours (we only send requests): only the Partial IV part changes.
        kl = len(sender_id)
        a = bytearray(24 + kl)
        a[0:11] = b"\x83\x68Encrypt0\x40"
        a[12:16] = b"\x85\x01\x81\x0a"
        a[16] = 0x40 | kl
        a[17:17 + kl] = sender_id
        self._aad = a
        self._piv = bytearray(5)
        self._rpiv = bytearray(5)
        self._optval = bytearray(8 + kl + (1 + len(id_context) if id_context else 0))
        # plaintext scratch: the inner message of the last protect, or of the last unprotect (at offset `at`)
        self.plain = bytearray(_RX_MAX + _GAP)

    def next_seq(self):
        s = self.seq
        if s >= MAX_SEQ:
            raise OscoreError("sender sequence numbers exhausted: provision a new key")
        if s >= self._limit:
            limit = s + SEQ_WINDOW
            if self._persist:
                self._persist(limit)  # OSError propagates: nothing was used
            self._limit = limit
        self.seq = s + 1
        return s

    def _mkaad(self, piv, po, pl):
        """The AAD for the request Partial IV piv[po:po+pl]; returns its length (in self._aad)."""
        a = self._aad
        p = 17 + len(self.sid)
        a[11] = 0x40 | (p - 10 + pl)  # external_aad length: 7 + kid + piv
        a[p] = 0x40 | pl
        for i in range(pl):
            a[p + 1 + i] = piv[po + i]
        a[p + 1 + pl] = 0x40
        return p + 2 + pl

    def _mknonce(self, idb, piv, po, pl):
        """Common IV XOR (len(id) | id left-padded to 7 | piv left-padded to 5) (RFC 8613 5.2)."""
        nc = self._nonce
        iv = self._common_iv
        k = len(idb)
        for i in range(crypto.NONCE):
            v = 0
            if i == 0:
                v = k
            elif 8 - k <= i < 8:
                v = idb[i - 8 + k]
            elif i >= 13 - pl:
                v = piv[po + i - 13 + pl]
            nc[i] = v ^ iv[i]
        return nc

    def protect(self, src, n, out, echo=None, seq=-1):
        """Protect the plain CoAP request src[:n] into out (an inner Echo option is added when echo is given) with
        the next sequence number, or with seq when given (a retransmission: the same inputs give the same bytes);
        returns (length, sequence number used)."""
        tkl = src[0] & 15
        h = 4 + tkl
        if n < h or tkl > 8 or h + 1 > len(out):
            raise OscoreError("not a CoAP request")
        for i in range(h):
            out[i] = src[i]
        if seq < 0:
            seq = self.next_seq()
        piv = self._piv
        pl = _put_piv(piv, seq)
        ov = self._optval
        ov[0] = 0x08 | pl
        for i in range(pl):
            ov[1 + i] = piv[i]
        k = 1 + pl
        ctx = self.idctx
        if ctx is not None:
            ov[0] |= 0x10
            ov[k] = len(ctx)
            for i in range(len(ctx)):
                ov[k + 1 + i] = ctx[i]
            k += 1 + len(ctx)
        for i in range(len(self.sid)):
            ov[k + i] = self.sid[i]
        k += len(self.sid)
        pt = self.plain
        pt[0] = src[1]
        ip = 1
        ilast = 0
        op = h
        olast = 0
        osc = obs = False
        pos = h
        num = 0
        while pos < n and src[pos] != 0xFF:
            pos = option(src, pos, n, _hd)
            num += _hd[0]
            ln = _hd[1]
            if num in _OUTER or num == _O_OBSERVE:
                if num > _O_OSCORE and not osc:
                    op = opt(out, op, _O_OSCORE - olast, ov, 0, k)
                    olast = _O_OSCORE
                    osc = True
                op = opt(out, op, num - olast, src, pos, ln)
                olast = num
                obs = obs or num == _O_OBSERVE
            if num not in _OUTER:
                ip = opt(pt, ip, num - ilast, src, pos, ln)
                ilast = num
            pos += ln
        if not osc:
            op = opt(out, op, _O_OSCORE - olast, ov, 0, k)
        if echo:
            ip = opt(pt, ip, _O_ECHO - ilast, echo, 0, len(echo))
        if pos < n:
            m = n - pos - 1
            if m <= 0 or ip + 1 + m > len(pt):
                raise OscoreError("bad or too large payload")
            pt[ip] = 0xFF
            for i in range(m):
                pt[ip + 1 + i] = src[pos + 1 + i]
            ip += 1 + m
        if op + 1 + ip + crypto.TAG > len(out):
            raise OscoreError("protected message larger than its buffer")
        out[1] = _FETCH if obs else _POST
        out[op] = 0xFF
        al = self._mkaad(piv, 0, pl)
        c = self._snd.encrypt(self._mknonce(self.sid, piv, 0, pl), self._aad, pt, ip, out, al, 0, op + 1)
        return op + 1 + c, seq

    def unprotect(self, src, n, req_seq, at=0):
        """Verify and decrypt the response src[:n] to the request sent with sequence number req_seq. The inner
        message (code, options, payload) is left in self.plain from offset at; returns (its length, the response's
        Partial IV as a number or -1, the outer Observe value or -1). OscoreError when it is not a valid protected
        answer (NotProtected when it carries no OSCORE option at all)."""
        tkl = src[0] & 15
        pos = 4 + tkl
        num = 0
        ovs = -1
        ovl = 0
        obs = -1
        while pos < n and src[pos] != 0xFF:
            try:
                pos = option(src, pos, n, _hd)
            except CoapError as e:  # a damaged outer option: not a valid protected answer either
                raise OscoreError(e.args[0])
            num += _hd[0]
            ln = _hd[1]
            if num == _O_OSCORE:
                ovs = pos
                ovl = ln
            elif num == _O_OBSERVE:
                if ln > 3:
                    raise OscoreError("bad Observe")
                obs = uint(src, pos, ln)
            pos += ln
        if ovs < 0:
            raise NotProtected("not OSCORE-protected")
        if pos + 1 >= n:
            raise OscoreError("no ciphertext")
        end = ovs + ovl
        f = src[ovs] if ovl else 0
        pl = f & 7
        if f & 0xE0 or pl > 5 or (ovl and ovs + 1 + pl > end):
            raise OscoreError("bad OSCORE option")
        ps = ovs + 1
        p = ps + pl
        if f & 0x10:
            if p >= end:
                raise OscoreError("bad OSCORE option")
            s = src[p]
            ctx = self.idctx
            if p + 1 + s > end or ctx is None or s != len(ctx):
                raise OscoreError("kid context does not match")
            for i in range(s):
                if src[p + 1 + i] != ctx[i]:
                    raise OscoreError("kid context does not match")
            p += 1 + s
        if f & 0x08:
            rid = self.rid
            if end - p != len(rid):
                raise OscoreError("kid does not match")
            for i in range(len(rid)):
                if src[p + i] != rid[i]:
                    raise OscoreError("kid does not match")
        elif ovl and p != end:
            raise OscoreError("bad OSCORE option")
        rp = self._rpiv
        rl = _put_piv(rp, req_seq)
        al = self._mkaad(rp, 0, rl)
        if pl:
            nonce = self._mknonce(self.rid, src, ps, pl)
            piv = uint(src, ps, pl)
        else:
            nonce = self._mknonce(self.sid, rp, 0, rl)
            piv = -1
        cl = n - pos - 1
        if cl - crypto.TAG > len(self.plain) - at:
            raise OscoreError("response too large")
        m = self._rcv.decrypt(nonce, self._aad, src, cl, self.plain, al, pos + 1, at)
        if m < 1:
            raise OscoreError("response does not verify")
        return m, piv, obs


class _Exchange(coap.Exchange):
    def __init__(self, size):
        coap.Exchange.__init__(self, size)
        self.seq = -1     # sequence number of the request on the wire
        self.echo = None  # Echo value it carries (after a 4.01 answer with Echo: RFC 9175; its next blocks too)


class Client(coap.Client):
    """coap.Client with OSCORE. store is the Hal (kv_get/kv_set) keeping the sender sequence number."""

    name = "coap+oscore"

    def __init__(self, ident, poller=None, cache=None, store=None):
        if store is None:
            raise OscoreError("OSCORE needs a store for its sequence number")
        coap.Client.__init__(self, ident, poller, cache, _Exchange)
        self._tx = bytearray(len(self.exchanges[0].buf) + _OVERHEAD)  # every request is protected into it to be sent
        start, persist = seq_store(store, ident.key)
        self.ctx = Context(ident.key, kid(ident.idb), GATEWAY_ID, seq=start, persist=persist)
        self._obs_seq = -1  # sequence number of the request that registered the /cfg observation
        self._obs_n = -1    # Partial IV of the newest notification accepted
        self._echo = None   # (offset, length) of an Echo option in the inner message being handled
        self.auth_fail = 0  # answers that did not verify (forged, damaged, or another key)

    def _start(self, kind, cb, arg):
        ex = coap.Client._start(self, kind, cb, arg)
        if ex is not None:
            ex.echo = None
        return ex

    def _seal(self, ex, new):
        # protected again at each retransmission, with the request's own sequence number: the same bytes
        try:
            n, ex.seq = self.ctx.protect(ex.buf, ex.length, self._tx, ex.echo, -1 if new else ex.seq)
        except OSError:  # the sequence number could not be reserved in flash
            self._finish(ex, _INTERNAL, None)
            return -1
        except CoapError as e:
            self._finish(ex, _TOO_LARGE if "larger" in str(e) else _INTERNAL, None)
            return -1
        return n

    def datagram(self, data, now):
        n = len(data)
        b0 = data[0] if n else 0
        tkl = b0 & 15
        if n < 4 or data[1] < 64 or b0 >> 6 != 1 or tkl > 8 or 4 + tkl > n:
            coap.Client.datagram(self, data, now)  # empty, request or malformed: the plain client handles it
            return
        t = (b0 >> 4) & 3
        mid = (data[2] << 8) | data[3]
        tok = uint(data, 4, tkl)
        if t != _ACK:
            for v in self._seen:
                if v >= 0 and v & 0xFFFF == mid:  # a duplicate: re-acknowledged by the plain client
                    coap.Client.datagram(self, data, now)
                    return
        ex = None
        if tkl == 2:
            for x in self.exchanges:
                if x.state and x.token == tok and (t != _ACK or (x.state == _WAIT_ACK and x.mid == mid)):
                    ex = x
                    break
        note = ex is None and tkl == 2 and tok == self._obs
        if ex is None and (not note or self._obs_seq < 0):
            coap.Client.datagram(self, data, now)  # late, unknown or mismatched: RST / counted there
            return
        try:
            m, piv, ob = self.ctx.unprotect(data, n, ex.seq if ex is not None else self._obs_seq, _GAP)
        except NotProtected:
            if ex is not None and data[1] >= 128:
                coap.Client.datagram(self, self._unauthenticated(data, tkl), now)
            else:
                self.errors += 1  # an unprotected success answer is never believed
            return
        except OscoreError:
            self.auth_fail += 1  # dropped like a lost datagram: retransmission or timeout follows
            self.errors += 1
            return
        if note:
            if piv <= self._obs_n:  # replayed or reordered notification (RFC 8613 7.4.1)
                self.dups += 1
                if t == _CON:
                    self._empty(_ACK, mid)
                return
            self._obs_n = piv
        out = self.ctx.plain  # the plain answer is rebuilt in front of the inner message it comes from
        for i in range(4 + tkl):
            out[i] = data[i]
        try:
            n2 = self._inner(_GAP + m, ob, tkl)
        except CoapError:  # OscoreError, or the Observe option (uint_opt) did not fit
            self.errors += 1
            return
        echo = self._echo
        if ex is not None and out[1] == _UNAUTH and echo and ex.echo is None:
            # Echo (RFC 9175): the gateway has no replay state for us yet; repeat the request once with it
            if t == _CON:
                self._empty(_ACK, mid)
            ex.echo = bytes(out[echo[0]:echo[0] + echo[1]])
            ex.mid = self._next_mid()
            ex.buf[2] = ex.mid >> 8
            ex.buf[3] = ex.mid & 255
            self._send(ex, now)
            return
        if ex is not None and ex.kind == _K_CFG and ob >= 0:
            self._obs_seq = ex.seq
            self._obs_n = piv
        coap.Client.datagram(self, memoryview(out)[:n2], now)

    def _inner(self, m, ob, tkl):
        """Rebuild the plain response in ctx.plain, in front of the inner message (code, options, payload) that
        unprotect() left at plain[_GAP:m]: outer header and token (already in place), inner code, inner options (with
        the outer Observe value in place of any inner one), inner payload. Returns its length. Each byte is written
        before the ones still to be read: the answer is at most _GAP - 1 bytes longer than the inner message (11 of
        header and token, 4 of Observe)."""
        b = self.ctx.plain
        b[1] = b[_GAP]
        p = 4 + tkl
        last = num = 0
        i = _GAP + 1
        done = ob < 0
        self._echo = None
        while i < m and b[i] != 0xFF:
            i = option(b, i, m, _hd)
            num += _hd[0]
            ln = _hd[1]
            if num != _O_OBSERVE:
                if not done and num > _O_OBSERVE:
                    p = uint_opt(b, p, _O_OBSERVE - last, ob & 0xFFFFFF)
                    last = _O_OBSERVE
                    done = True
                p = opt(b, p, num - last, b, i, ln)
                if num == _O_ECHO:
                    self._echo = (p - ln, ln)  # where its value is in the rebuilt answer
                last = num
            i += ln
        if not done:
            p = uint_opt(b, p, _O_OBSERVE - last, ob & 0xFFFFFF)
        if i < m:
            if i + 1 == m:
                raise OscoreError("payload marker without payload")
            for j in range(m - i):
                b[p + j] = b[i + j]
            p += m - i
        return p

    def _unauthenticated(self, data, tkl):
        """An unprotected error answer to a protected request (the gateway could not verify us: unknown device,
        wrong key, replay...): header and token, then an error payload with code 401 and the gateway's text."""
        n = len(data)
        text = ""
        try:
            pos = coapmsg.decode(memoryview(data), n, self._msg).payload_at
            if pos < n:
                text = " " + str(bytes(data[pos:min(n, pos + 40)]), "utf-8")
        except ValueError:  # CoapError, UnicodeError
            pass
        pl = cbor.dumps({3: _UNAUTHORIZED, 9: "gateway did not authenticate us: %s%s" % (coapmsg.dotted(data[1]), text)})
        out = bytearray(4 + tkl + 1 + len(pl))
        out[0:4 + tkl] = data[0:4 + tkl]
        out[4 + tkl] = 0xFF
        out[5 + tkl:] = pl
        return out
