# MQTT 3.1.1 client of the device, in two layers over the packets of mqttmsg.py (umqtt.simple blocks on QoS 1
# and never pings; this one never blocks):
#  * Client: one connection on a non-blocking socket driven by poll(now): CONNECT with last will, QoS 1
#    publishes kept in flight and resent with DUP until PUBACK, inbound QoS 1 -> PUBACK, SUBSCRIBE/SUBACK,
#    PINGREQ when idle and a dead broker detected when PINGRESP does not come back; any error closes it;
#  * Session: the thin reconnect layer: exponential backoff with jitter, on_up() after each CONNACK;
# The device protocol on top (topics, resolve, reports, config) is mqttdevice.py. password(key) below is the
# device's MQTT password. Security (docs/security-mqtt.md): a Client given a CA file connects over TLS (tls.py),
# the broker's certificate verified against it and the host name.
import os
import time
import errno
import select
import socket
from micropython import const

from carrier import waiting
from carrier.mqttmsg import MQTTError, Reader, connect, empty, puback, publish, publish_size, subscribe

# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_CONNACK = const(2)      # mirrors mqttmsg.CONNACK
_PUBLISH = const(3)      # mirrors mqttmsg.PUBLISH
_PUBACK = const(4)       # mirrors mqttmsg.PUBACK
_SUBACK = const(9)       # mirrors mqttmsg.SUBACK
_PINGREQ = const(12)     # mirrors mqttmsg.PINGREQ
_PINGRESP = const(13)    # mirrors mqttmsg.PINGRESP
_DISCONNECT = const(14)  # mirrors mqttmsg.DISCONNECT

IDLE = const(0)
_CONNECTING = const(1)  # TCP handshake in progress
WAIT_CONNACK = const(2)
UP = const(3)

_CONNECT_TIMEOUT = const(10000)  # ms for TCP + CONNACK
RETRY_MS = const(10000)         # resend an unacknowledged QoS 1 PUBLISH (DUP) after this
INFLIGHT = const(4)
BACKOFF_MIN = const(1000)
BACKOFF_MAX = const(120000)


def _errno(e):
    return e.args[0] if e.args and type(e.args[0]) is int else 0


# ---- one connection -----------------------------------------------------------------------------------
class Client:
    def __init__(self, cid, keepalive=60, will=None, user=None, pwd=None, maxpkt=1536, outsize=1024,
                 retry_ms=RETRY_MS, ca_path=None):
        self.cid = cid
        self.ca_path = ca_path  # CA file: TLS with the broker's certificate verified; None = plain TCP
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
        self._connect_poll = None
        self._reader = Reader(maxpkt)
        self._out = bytearray(outsize)
        self._out_view = memoryview(self._out)
        self._out_len = 0
        self._pid = 0
        self._inflight = []  # in flight QoS 1: [pid, topic, payload, retain, due]
        self._connect_at = 0  # when the connection attempt started
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
        if self.ca_path and self._tls is None:
            from carrier import tls  # loaded by TLS devices only
            self._tls = tls.context(self.ca_path)
        s = socket.socket(addr[0], socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(addr[-1])
        except OSError as e:
            if e.errno != errno.EINPROGRESS and e.errno != errno.EAGAIN:
                s.close()
                raise
        self.sock = s
        self.state = _CONNECTING
        self._connect_at = now
        self._reader.reset()
        self._out_len = 0
        self._connect_poll = select.poll()
        self._connect_poll.register(s, select.POLLOUT)
        self.reason = None

    def close(self, reason=None):
        s = self.sock
        self.state = IDLE
        self._ping = 0
        if s is None:
            return
        self.sock = None
        self._connect_poll = None
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
            self._out_len = empty(self._out, _DISCONNECT, self._out_len)
            try:
                self._flush()
            except OSError:
                pass
        self.close("disconnected")

    def _room(self, n):
        return self._out_len + n <= len(self._out)

    def _next_pid(self):
        while True:
            self._pid = self._pid % 0xFFFF + 1
            for f in self._inflight:
                if f[0] == self._pid:
                    break
            else:
                return self._pid

    def inflight(self):
        return len(self._inflight)

    def publish(self, topic, payload, qos=0, retain=False, now=0):
        """Queue a PUBLISH: returns the packet id (QoS 1), 0 (QoS 0 sent) or -1 when not now (not
        connected, window full, output buffer full or packet too large)."""
        if self.state != UP or (qos and len(self._inflight) >= INFLIGHT):
            return -1
        if not self._room(publish_size(topic, payload, qos)):
            return -1
        pid = self._next_pid() if qos else 0
        if qos:
            payload = bytes(payload)  # kept for resends; the caller's buffer may be reused
            self._inflight.append([pid, topic, payload, retain, time.ticks_add(now, self.retry_ms)])
        self._out_len = publish(self._out, topic, payload, qos, retain, False, pid, self._out_len)
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
        self._out_len = subscribe(self._out, pid, topics, self._out_len)
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
            if self.state == _CONNECTING:
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
        p = self._connect_poll
        if p is None:
            return
        for _obj, ev in p.ipoll(0):
            if ev & (select.POLLERR | select.POLLHUP):
                raise MQTTError("connection refused")
            if ev & select.POLLOUT:
                self._connect_poll = None
                if self._tls is not None:  # the handshake runs in the reads and writes that follow
                    self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.sni,
                                                      do_handshake_on_connect=False)
                self._out_len = connect(self._out, self.cid, self.keepalive, True, self.will, self.user, self.pwd)
                self.state = WAIT_CONNACK
                self.last_tx = self.last_rx = now
                if self.poller:
                    self.poller.register(self.sock, select.POLLIN)
                return
        if time.ticks_diff(now, self._connect_at) > _CONNECT_TIMEOUT:
            raise MQTTError("connect timeout")

    def _flush(self):
        s = self.sock
        if not self._out_len or s is None:
            return
        k = s.write(self._out_view[:self._out_len])
        if k:
            rest = self._out_len - k
            if rest:
                self._out_view[:rest] = self._out_view[k:self._out_len]
            self._out_len = rest

    def _read(self, now):
        r = self._reader
        s = self.sock
        for _ in range(8):  # bounded work per poll
            if s is None or not waiting(self.poller, s):
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
        r = self._reader
        b = r.buf
        t = b[0] >> 4
        p = r.pos
        n = r.len
        if t == _PUBLISH:
            if self.state != UP:
                raise MQTTError("PUBLISH before CONNACK")
            qos = (b[0] >> 1) & 3
            tl = (b[p] << 8) | b[p + 1]
            hdr = 2 + tl + (2 if qos else 0)
            if qos > 1 or hdr > n:
                raise MQTTError("bad PUBLISH")
            if qos and self._room(4):  # else the broker resends it: we are at least once anyway
                pid = (b[p + 2 + tl] << 8) | b[p + 3 + tl]
                self._out_len = puback(self._out, pid, self._out_len)
            if self.on_msg:
                self.on_msg(r.view[p + 2:p + 2 + tl], r.view[p + hdr:p + n], b[0] & 1)
        elif t == _PUBACK:
            pid = (b[p] << 8) | b[p + 1]
            for f in self._inflight:
                if f[0] == pid:
                    self._inflight.remove(f)
                    if self.on_puback:
                        self.on_puback(pid)
                    break
        elif t == _SUBACK:
            if self.on_suback:
                self.on_suback((b[p] << 8) | b[p + 1], b[p + 2] != 0x80)
        elif t == _PINGRESP:
            self._ping = 0
        elif t == _CONNACK:
            if self.state != WAIT_CONNACK or n != 2:
                raise MQTTError("unexpected CONNACK")
            if b[p + 1]:
                self.refused = b[p + 1]
                raise MQTTError("connection refused, code %d" % b[p + 1], b[p + 1])
            self.state = UP
            self._ping = 0
            for f in self._inflight:  # resend what the last connection left unacknowledged
                f[4] = now
        else:
            raise MQTTError("unexpected packet type %d" % t)

    def _timers(self, now):
        if self.state == WAIT_CONNACK:
            if time.ticks_diff(now, self._connect_at) > _CONNECT_TIMEOUT:
                raise MQTTError("no CONNACK")
            return
        ka = self.keepalive * 1000
        if self._ping:
            if time.ticks_diff(now, self._ping) > ka // 2:
                raise MQTTError("broker did not answer PINGREQ")
        elif ka and (time.ticks_diff(now, self.last_tx) >= ka // 2 or time.ticks_diff(now, self.last_rx) >= ka // 2):
            if self._room(2):
                self._out_len = empty(self._out, _PINGREQ, self._out_len)
                self._ping = now if now else 1
                self.last_tx = now
        for f in self._inflight:
            if time.ticks_diff(now, f[4]) >= 0 and self._room(publish_size(f[1], f[2], 1)):
                self._out_len = publish(self._out, f[1], f[2], 1, f[3], True, f[0], self._out_len)
                f[4] = time.ticks_add(now, self.retry_ms)
                self.last_tx = now


# ---- reconnect layer ----------------------------------------------------------------------------------
class Session:
    """Keeps a Client connected: reconnects with exponential backoff and jitter; on_up() after CONNACK."""

    def __init__(self, client, host, port, on_up=None):
        self.client = client
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
        self.client.disconnect()

    def _later(self, now):
        b = self.backoff
        self._next = time.ticks_add(now, b // 2 + (os.urandom(1)[0] * (b // 2)) // 255)  # jitter: [b/2, b]
        self.backoff = min(b * 2, BACKOFF_MAX)

    def poll(self, now):
        c = self.client
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
