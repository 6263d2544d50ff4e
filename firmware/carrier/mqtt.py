# MQTT 3.1.1 for the device, in three layers (umqtt.simple blocks on QoS 1 and never pings):
#  * codec, no I/O: connect()/publish()/subscribe()/puback() write packets into a buffer; Reader is an
#    incremental parser over one preallocated buffer with a maximum packet size (bigger packets are
#    skipped and counted, never buffered);
#  * Client: one connection on a non-blocking socket driven by poll(now): CONNECT with last will, QoS 1
#    publishes kept in flight and resent with DUP until PUBACK, inbound QoS 1 -> PUBACK, SUBSCRIBE/SUBACK,
#    PINGREQ when idle and a dead broker detected when PINGRESP does not come back; any error closes it;
#  * Session: the thin reconnect layer: exponential backoff with jitter, on_up() after each CONNACK;
#  * Transport: the device protocol on top (docs/protocol.md#mqtt): status/last will, resolve over
#    req/res with tokens, reports on rpt acknowledged on ack, retained desired config on cfg, cfgack.
#    Username = the topic key <dev> (for a broker ACL `pattern readwrite ida/v1/d/%u/#`), password =
#    password(key) below, client id = <dev>, cut to 23 bytes if the broker rejects a longer one.
# Security (docs/security-mqtt.md): an identity with an mqtts:// address connects over TLS, the broker's
# certificate verified against the identity's CA file and host name; tools/commands/broker.py writes the
# broker's password file and ACL from the same keys. mqtt:// is the factory-bench plain mode, logged so.
import os
import time
import errno
import select
import socket
import binascii
from micropython import const

from carrier import cbor, devicemsg, rcache, log

CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
SUBSCRIBE = const(8)
SUBACK = const(9)
PINGREQ = const(12)
PINGRESP = const(13)
DISCONNECT = const(14)

IDLE = const(0)
CONNECTING = const(1)  # TCP handshake in progress
WAIT_CONNACK = const(2)
UP = const(3)

CONNECT_TIMEOUT = const(10000)  # ms for TCP + CONNACK
RETRY_MS = const(10000)         # resend an unacknowledged QoS 1 PUBLISH (DUP) after this
INFLIGHT = const(4)
BACKOFF_MIN = const(1000)
BACKOFF_MAX = const(120000)


class MQTTError(ValueError):
    """The peer broke the protocol, refused us (code = CONNACK return code) or went silent."""

    def __init__(self, msg, code=0):
        super().__init__(msg)
        self.code = code


def _errno(e):
    return e.args[0] if e.args and type(e.args[0]) is int else 0


def _nop(*a):
    pass


def pem_to_der(data):
    """The first certificate of a PEM file as DER (MicroPython's mbedTLS may lack the PEM parser)."""
    a = data.find(b"\n", data.find(b"-----BEGIN"))
    b = data.find(b"-----END", a)
    if a < 0 or b < 0:
        raise MQTTError("CA file is neither PEM nor DER")
    return binascii.a2b_base64(data[a + 1:b].replace(b"\r", b"").replace(b"\n", b""))


def tls_context(ca_path):
    """A TLS client context that accepts only a broker certificate chaining to the CA in ca_path."""
    import ssl
    try:
        with open(ca_path, "rb") as f:
            data = f.read()
    except OSError:
        raise MQTTError("no CA file " + ca_path)
    if data.startswith(b"-----BEGIN"):
        data = pem_to_der(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # MicroPython's client default is CERT_NONE; verify_mode is a property of ssl.py (missing from the stubs)
    ctx.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]
    ctx.load_verify_locations(cadata=data)
    return ctx


# ---- codec --------------------------------------------------------------------------------------------
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


class Reader:
    """Incremental packet parser. Fill space() then call added(k); while next() is true the packet is
    buf[0] (type and flags) and buf[pos:pos+len] (after the fixed header); then consume()."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.n = 0
        self.skip = 0     # bytes still to discard of an oversized packet
        self.dropped = 0  # oversized packets skipped
        self.pos = self.len = 0

    def reset(self):
        self.n = self.skip = 0

    def space(self):
        return self.mv[self.n:]

    def added(self, k):
        self.n += k
        if self.skip:
            d = min(self.skip, self.n)
            self.skip -= d
            self._drop(d)

    def _drop(self, d):
        n = self.n - d
        if n:
            self.mv[:n] = self.mv[d:self.n]
        self.n = n

    def next(self):
        if self.skip or self.n < 2:
            return False
        b = self.buf
        rem = 0
        mul = 1
        i = 1
        while True:
            if i >= self.n:
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
            d = min(total, self.n)
            self.skip -= d
            self._drop(d)
            return False
        if self.n < total:
            return False
        self.pos = i
        self.len = rem
        return True

    def consume(self):
        self._drop(self.pos + self.len)


# ---- one connection -----------------------------------------------------------------------------------
class Client:
    def __init__(self, cid, keepalive=60, will=None, user=None, pwd=None, maxpkt=1536, outsize=1024,
                 retry_ms=RETRY_MS, ca=None):
        self.cid = cid
        self.ca = ca      # CA file: TLS with the broker's certificate verified; None = plain TCP
        self._tls = None  # its SSLContext, made at the first connect
        self.sni = None   # the host name the broker's certificate must carry (Session sets it)
        self.keepalive = keepalive
        self.will = will
        self.user = user
        self.pwd = pwd
        self.retry_ms = retry_ms
        self.sock = None
        self.state = IDLE
        self.poller = None
        self._p = None
        self._r = Reader(maxpkt)
        self._out = bytearray(outsize)
        self._ov = memoryview(self._out)
        self._on = 0
        self._pid = 0
        self._fl = []  # in flight QoS 1: [pid, topic, payload, retain, due]
        self._t = 0    # when the connection attempt started
        self.last_tx = self.last_rx = 0
        self._ping = 0  # ticks of an unanswered PINGREQ, 0 if none
        self.on_msg = None     # (topic mv, payload mv, retained) -> None; views valid during the call
        self.on_puback = None  # (pid) -> None
        self.on_suback = None  # (pid, granted ok) -> None
        self.reason = None     # why the last connection ended
        self.refused = 0       # CONNACK return code of the last refusal

    def open(self, addr, now):
        """Start a non-blocking TCP connect to a getaddrinfo() address entry."""
        self.close()
        if self.ca and self._tls is None:
            self._tls = tls_context(self.ca)
        s = socket.socket(addr[0], socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(addr[-1])
        except OSError as e:
            if e.errno != errno.EINPROGRESS and e.errno != errno.EAGAIN:
                s.close()
                raise
        self.sock = s
        self.state = CONNECTING
        self._t = now
        self._r.reset()
        self._on = 0
        self._p = select.poll()
        self._p.register(s, select.POLLOUT)
        self.reason = None

    def close(self, reason=None):
        s = self.sock
        self.state = IDLE
        self._ping = 0
        if s is None:
            return
        self.sock = None
        self._p = None
        if self.poller:
            try:
                self.poller.unregister(s)
            except (OSError, KeyError, ValueError):
                pass
        try:
            s.close()
        except OSError:
            pass
        if reason is not None:
            self.reason = reason

    def disconnect(self):
        """Polite DISCONNECT (the broker then drops the last will)."""
        if self.state == UP and self._room(2):
            self._out[self._on] = DISCONNECT << 4
            self._out[self._on + 1] = 0
            self._on += 2
            try:
                self._flush()
            except OSError:
                pass
        self.close("disconnected")

    def _room(self, n):
        return self._on + n <= len(self._out)

    def _next_pid(self):
        while True:
            self._pid = self._pid % 0xFFFF + 1
            for f in self._fl:
                if f[0] == self._pid:
                    break
            else:
                return self._pid

    def inflight(self):
        return len(self._fl)

    def publish(self, topic, payload, qos=0, retain=False, now=0):
        """Queue a PUBLISH: returns the packet id (QoS 1), 0 (QoS 0 sent) or -1 when not now (not
        connected, window full, output buffer full or packet too large)."""
        if self.state != UP or (qos and len(self._fl) >= INFLIGHT):
            return -1
        if not self._room(publish_size(topic, payload, qos)):
            return -1
        pid = self._next_pid() if qos else 0
        if qos:
            payload = bytes(payload)  # kept for resends; the caller's buffer may be reused
            self._fl.append([pid, topic, payload, retain, time.ticks_add(now, self.retry_ms)])
        self._on = publish(self._out, topic, payload, qos, retain, False, pid, self._on)
        self.last_tx = now
        self.flush()
        return pid

    def subscribe(self, topics, now=0):
        size = 5
        for t, _q in topics:
            size += 3 + len(t)
        if self.state != UP or not self._room(size):
            return -1
        pid = self._next_pid()
        self._on = subscribe(self._out, pid, topics, self._on)
        self.last_tx = now
        self.flush()
        return pid

    def flush(self):
        """Write what is queued now (a full socket buffer keeps the rest for the next poll)."""
        if self.sock is not None and self.state >= WAIT_CONNACK:
            try:
                self._flush()
            except OSError as e:
                self.close("socket error %d" % _errno(e))

    def poll(self, now):
        """Do pending I/O and timers; never blocks. Errors close the connection (see reason)."""
        if self.state == IDLE:
            return
        try:
            if self.state == CONNECTING:
                self._connecting(now)
            if self.state >= WAIT_CONNACK:
                self._read(now)
            if self.state:
                self._timers(now)
            if self.state:
                self._flush()
        except OSError as e:
            self.close("socket error %d" % _errno(e))
        except MQTTError as e:
            self.close(str(e))
        except ValueError as e:  # mbedTLS: certificate not trusted, wrong host name, bad record
            self.close("tls " + str(e).strip())

    def _connecting(self, now):
        p = self._p
        if p is None:
            return
        for _obj, ev in p.ipoll(0):
            if ev & (select.POLLERR | select.POLLHUP):
                raise MQTTError("connection refused")
            if ev & select.POLLOUT:
                self._p = None
                if self._tls is not None:  # the handshake runs in the reads and writes that follow
                    self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.sni,
                                                      do_handshake_on_connect=False)
                self._on = connect(self._out, self.cid, self.keepalive, True, self.will, self.user, self.pwd)
                self.state = WAIT_CONNACK
                self.last_tx = self.last_rx = now
                if self.poller:
                    self.poller.register(self.sock, select.POLLIN)
                return
        if time.ticks_diff(now, self._t) > CONNECT_TIMEOUT:
            raise MQTTError("connect timeout")

    def _flush(self):
        s = self.sock
        if not self._on or s is None:
            return
        k = s.write(self._ov[:self._on])
        if k:
            rest = self._on - k
            if rest:
                self._ov[:rest] = self._ov[k:self._on]
            self._on = rest

    def _read(self, now):
        r = self._r
        s = self.sock
        for _ in range(8):  # bounded work per poll
            if s is None:
                return
            k = s.readinto(r.space())
            if k is None:
                return
            if k == 0:
                raise MQTTError("connection closed by broker")
            self.last_rx = now
            r.added(k)
            while r.next():
                self._packet(now)
                r.consume()
                if self.state == IDLE:
                    return

    def _packet(self, now):
        r = self._r
        b = r.buf
        t = b[0] >> 4
        p = r.pos
        n = r.len
        if t == PUBLISH:
            if self.state != UP:
                raise MQTTError("PUBLISH before CONNACK")
            qos = (b[0] >> 1) & 3
            tl = (b[p] << 8) | b[p + 1]
            hdr = 2 + tl + (2 if qos else 0)
            if qos > 1 or hdr > n:
                raise MQTTError("bad PUBLISH")
            if qos and self._room(4):  # else the broker resends it: we are at least once anyway
                pid = (b[p + 2 + tl] << 8) | b[p + 3 + tl]
                self._on = puback(self._out, pid, self._on)
            if self.on_msg:
                self.on_msg(r.mv[p + 2:p + 2 + tl], r.mv[p + hdr:p + n], b[0] & 1)
        elif t == PUBACK:
            pid = (b[p] << 8) | b[p + 1]
            for f in self._fl:
                if f[0] == pid:
                    self._fl.remove(f)
                    if self.on_puback:
                        self.on_puback(pid)
                    break
        elif t == SUBACK:
            if self.on_suback:
                self.on_suback((b[p] << 8) | b[p + 1], b[p + 2] != 0x80)
        elif t == PINGRESP:
            self._ping = 0
        elif t == CONNACK:
            if self.state != WAIT_CONNACK or n != 2:
                raise MQTTError("unexpected CONNACK")
            if b[p + 1]:
                self.refused = b[p + 1]
                raise MQTTError("connection refused, code %d" % b[p + 1], b[p + 1])
            self.state = UP
            self._ping = 0
            for f in self._fl:  # resend what the last connection left unacknowledged
                f[4] = now
        else:
            raise MQTTError("unexpected packet type %d" % t)

    def _timers(self, now):
        if self.state == WAIT_CONNACK:
            if time.ticks_diff(now, self._t) > CONNECT_TIMEOUT:
                raise MQTTError("no CONNACK")
            return
        ka = self.keepalive * 1000
        if self._ping:
            if time.ticks_diff(now, self._ping) > ka // 2:
                raise MQTTError("broker did not answer PINGREQ")
        elif ka and (time.ticks_diff(now, self.last_tx) >= ka // 2 or time.ticks_diff(now, self.last_rx) >= ka // 2):
            if self._room(2):
                self._out[self._on] = PINGREQ << 4
                self._out[self._on + 1] = 0
                self._on += 2
                self._ping = now if now else 1
                self.last_tx = now
        for f in self._fl:
            if time.ticks_diff(now, f[4]) >= 0 and self._room(publish_size(f[1], f[2], 1)):
                self._on = publish(self._out, f[1], f[2], 1, f[3], True, f[0], self._on)
                f[4] = time.ticks_add(now, self.retry_ms)
                self.last_tx = now


# ---- reconnect layer ----------------------------------------------------------------------------------
class Session:
    """Keeps a Client connected: reconnects with exponential backoff and jitter; on_up() after CONNACK."""

    def __init__(self, client, host, port, on_up=None):
        self.c = client
        client.sni = host
        self.host = host
        self.port = port
        self.on_up = on_up
        self.enabled = False
        self._addr = None
        self._next = 0
        self.backoff = BACKOFF_MIN
        self.attempts = 0
        self.connects = 0

    def start(self, now):
        self.enabled = True
        self._next = now

    def stop(self):
        self.enabled = False
        self.c.disconnect()

    def _later(self, now):
        b = self.backoff
        self._next = time.ticks_add(now, b // 2 + (os.urandom(1)[0] * (b // 2)) // 255)  # jitter: [b/2, b]
        self.backoff = min(b * 2, BACKOFF_MAX)

    def poll(self, now):
        c = self.c
        if c.state == IDLE:
            if not self.enabled or time.ticks_diff(now, self._next) < 0:
                return
            self.attempts += 1
            try:
                if self._addr is None:
                    self._addr = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
                c.open(self._addr, now)
            except OSError as e:
                c.reason = "connect failed %d" % _errno(e)
                self._later(now)
                return
            except ValueError as e:  # MQTTError: no CA file; mbedTLS: a CA it cannot parse
                c.reason = "tls " + str(e).strip()
                self._later(now)
                return
        was = c.state
        c.poll(now)
        if c.state == IDLE:
            self._later(now)
        elif c.state == UP and was != UP:
            self.backoff = BACKOFF_MIN
            self.connects += 1
            if self.on_up:
                self.on_up(now)


def password(key):
    """The MQTT password: derived from the device key (32 hex digits), never the key itself, so a broker
    or a sniffer on a plain-TCP link learns nothing that protects CoAP (OSCORE) traffic. The broker's
    password file holds the same value for username <dev> (tools derive it from the key the same way)."""
    import hashlib
    import binascii
    return binascii.hexlify(hashlib.sha256(b"ida/mqtt/password/v1" + key).digest()[:16])


# ---- the device protocol over MQTT --------------------------------------------------------------------
RESOLVE_WAIT = const(5000)   # ms before a resolve request is retried with a new token
RESOLVE_TRIES = const(2)
REPORT_WAIT = const(30000)   # ms for the gateway's report_ack


class Transport:
    name = "mqtt"

    def __init__(self, ident, poller=None, cache=None, keepalive=60, retry_ms=RETRY_MS):
        self.id = ident.id
        dev = devicemsg.topic_key(ident.id)
        base = "ida/v1/d/" + dev + "/"
        self.t_status = (base + "status").encode()
        self.t_req = (base + "req").encode()
        self.t_rpt = (base + "rpt").encode()
        self.t_cfgack = (base + "cfgack").encode()
        self._subs = [((base + s).encode(), 1) for s in ("res", "ack", "cfg")]
        self._blen = len(base)
        will = (self.t_status, devicemsg.encode("status", {devicemsg.K_ID: ident.id, devicemsg.K_ONLINE: False}), 1, True)
        tls = getattr(ident, "mqtt_tls", False)
        self.c = Client(dev.encode(), keepalive, will, dev.encode(), password(ident.key), retry_ms=retry_ms,
                        ca=ident.ca_path if tls else None)
        if not tls:
            log.w("mqtt", "INSECURE plain mode: no TLS to %s:%d, password in clear (factory bench only)"
                  % ident.mqtt)
        self.c.poller = poller
        self.c.on_msg = self._msg
        self.s = Session(self.c, ident.mqtt[0], ident.mqtt[1], self._up)
        self.cache = cache if cache is not None else rcache.Cache()
        self._tok = int.from_bytes(os.urandom(2), "big")
        self._res = []  # pending resolves: [token, key, cb, due, tries]
        self._rep = None  # pending report: [boot, seq, due]
        self._rep_cb = _nop
        self.on_config = None
        self.cfg_hint = 0  # the desired cfgver the last report ack named (0: none)
        self.errors = 0
        self.now = time.ticks_ms()

    @property
    def sock(self):
        return self.c.sock

    def start(self, now):
        self.now = now
        self.s.start(now)

    def stop(self):
        if self.c.state == UP:
            self.c.publish(self.t_status, devicemsg.encode("status", {devicemsg.K_ID: self.id, devicemsg.K_ONLINE: False}),
                           0, True, self.now)
        self.s.stop()
        self._fail_all()

    def _fail_all(self):
        res, self._res = self._res, []
        for r in res:
            r[2]((devicemsg.NO_RESPONSE, r[1], None, 0, "no response"))
        if self._rep:
            boot, seq = self._rep[0], self._rep[1]
            self._rep = None
            self._rep_cb(devicemsg.NO_RESPONSE, boot, seq)

    def ready(self):
        return self.c.state == UP and self.c.inflight() < INFLIGHT

    def _up(self, now):
        self.c.publish(self.t_status, devicemsg.encode("status", {devicemsg.K_ID: self.id, devicemsg.K_ONLINE: True}),
                       1, True, now)
        self.c.subscribe(self._subs, now)

    def poll(self, now):
        self.now = now
        was = self.c.state
        self.s.poll(now)
        c = self.c
        if c.refused == 2 and len(c.cid) > 23:  # "identifier rejected": MQTT 3.1.1 only promises 23 bytes
            c.cid = c.cid[:23]
            c.refused = 0
            self.s._next = now  # retry at once with the short id
        if was == UP and self.c.state != UP:
            self.errors += 1
            # the pending report's PUBACK/ack may be lost: the reporter resends it from the queue
            if self._rep:
                boot, seq = self._rep[0], self._rep[1]
                self._rep = None
                self._rep_cb(devicemsg.NO_RESPONSE, boot, seq)
        for r in self._res:
            if time.ticks_diff(now, r[3]) >= 0:
                if r[4] < RESOLVE_TRIES and self._send_req(r, now):
                    continue
                self._res.remove(r)
                r[2]((devicemsg.NO_RESPONSE, r[1], None, 0, "no response"))
                break  # the list changed: the others wait for the next poll
        if self._rep and time.ticks_diff(now, self._rep[2]) >= 0:
            boot, seq = self._rep[0], self._rep[1]
            self._rep = None
            self.errors += 1
            self._rep_cb(devicemsg.NO_RESPONSE, boot, seq)

    def _send_req(self, r, now):
        self._tok = (self._tok + 1) & 0xFFFF
        r[0] = self._tok.to_bytes(2, "big")
        r[4] += 1
        r[3] = time.ticks_add(now, RESOLVE_WAIT)
        key = r[1]
        q = key.find("?type=")
        m = {devicemsg.K_TOKEN: r[0], devicemsg.K_ID: key if q < 0 else key[:q]}
        if q >= 0:
            m[devicemsg.K_TYPES] = [key[q + 6:]]
        e = self.cache.get(key)
        if e and e[1]:
            m[devicemsg.K_ETAG] = e[1]
        return self.c.publish(self.t_req, cbor.dumps(m), 0, False, now) == 0

    def resolve(self, target, cb, qtype=None):
        key = target if qtype is None else target + "?type=" + qtype
        e = self.cache.get(key)
        if e and self.cache.fresh(e, self.now):
            self.cache.hits += 1
            cb(rcache.answer(target, e[3], -1))
            return True
        if self.c.state != UP or len(self._res) >= 2:
            return False
        r = [b"", key, cb, 0, 0]
        if not self._send_req(r, self.now):
            return False
        self._res.append(r)
        return True

    def report(self, payload, boot, seq, cb):
        if self._rep is not None or self.c.publish(self.t_rpt, payload, 1, False, self.now) < 0:
            return False
        self._rep = [boot, seq, time.ticks_add(self.now, REPORT_WAIT)]
        self._rep_cb = cb
        return True

    def cfg_ack(self, payload):
        return self.c.publish(self.t_cfgack, payload, 1, False, self.now) >= 0

    def get_config(self):
        return True  # the broker delivers the retained desired config on every subscribe

    def _msg(self, topic, payload, retained):
        if len(topic) != self._blen + 3:
            return
        kind = bytes(topic[-3:])
        if kind == b"cfg":
            if len(payload) and self.on_config:  # empty retained message: no desired config
                self.on_config(bytes(payload))
            return
        try:
            m = cbor.loads(payload)
        except cbor.CBORError:
            self.errors += 1
            return
        if type(m) is not dict:
            self.errors += 1
        elif kind == b"ack":
            try:
                devicemsg.check("report_ack", m)
            except devicemsg.WireError:
                self.errors += 1
                return
            boot, seq = m[devicemsg.K_BOOT], m[devicemsg.K_SEQ]
            self.cfg_hint = m.get(devicemsg.K_CFGVER, self.cfg_hint)
            if self._rep and self._rep[0] == boot and self._rep[1] == seq:
                self._rep = None
            self._rep_cb(m[devicemsg.K_CODE], boot, seq)  # late acks still clear the queue
        elif kind == b"res":
            self._resolved(m, payload)

    def _resolved(self, m, payload):
        tok = m.get(devicemsg.K_TOKEN)
        for r in self._res:
            if r[0] == tok:
                break
        else:
            return  # an answer to a request we retried or gave up on
        self._res.remove(r)
        key, cb = r[1], r[2]
        q = key.find("?type=")
        target = key if q < 0 else key[:q]
        code = m.get(devicemsg.K_CODE)
        ttl = m.get(devicemsg.K_TTL)
        ttl = ttl if type(ttl) is int and ttl >= 0 else 60
        if code == devicemsg.OK:
            data = bytes(payload)
            res = rcache.answer(target, data)
            if res[0] == devicemsg.OK:
                self.cache.put(key, m.get(devicemsg.K_ETAG), ttl, data, self.now)
        elif code == devicemsg.NOT_MODIFIED:
            e = self.cache.refresh(key, ttl, self.now)
            res = rcache.answer(target, e[3], -2) if e else (devicemsg.INTERNAL, target, None, 0, "203 without entry")
        else:
            msg = m.get(devicemsg.K_MSG)
            res = (code if type(code) is int else devicemsg.BAD_REQUEST, target, None, 0,
                   msg if type(msg) is str else str(code))
        cb(res)
