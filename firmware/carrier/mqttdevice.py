# The device protocol over MQTT (docs/protocol.md#mqtt), on mqtt.Client and mqtt.Session: status topic and
# last will, resolve over req/res with tokens, reports on rpt acknowledged on ack, the retained desired config on
# cfg, cfgack. Username = the topic key <dev> (for a broker ACL `pattern readwrite ida/v1/d/%u/#`), password =
# mqtt.password(key), client id = <dev>, cut to 23 bytes if the broker rejects a longer one.
# An identity with an mqtts:// address connects over TLS (tls.py), the broker's certificate verified against the
# identity's CA file and host name; tools/commands/broker.py writes the broker's password file and ACL from the
# same keys. mqtt:// is the factory-bench plain mode, logged so.
# Transport has the interface of coap.Client: start(now) stop() poll(now) ready() resolve(id, cb)
# report(payload, boot, seq, cb) get_config() cfg_ack(payload) on_config(payload) errors.
import os
import time
from micropython import const

from carrier import cbor, devicemsg, rcache, log
from carrier.mqtt import Client, Session, password

# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_BAD_REQUEST = const(400)   # mirrors devicemsg.BAD_REQUEST
_K_BOOT = const(10)         # mirrors devicemsg._K_BOOT
_K_CFGVER = const(20)       # mirrors devicemsg._K_CFGVER
_K_CODE = const(3)          # mirrors devicemsg._K_CODE
_K_ETAG = const(6)          # mirrors devicemsg._K_ETAG
_K_ID = const(2)            # mirrors devicemsg._K_ID
_K_MSG = const(9)           # mirrors devicemsg._K_MSG
_K_ONLINE = const(24)       # mirrors devicemsg._K_ONLINE
_K_SEQ = const(11)          # mirrors devicemsg._K_SEQ
_K_TOKEN = const(1)         # mirrors devicemsg._K_TOKEN
_K_TTL = const(5)           # mirrors devicemsg._K_TTL
_K_TYPES = const(7)         # mirrors devicemsg._K_TYPES
_NOT_MODIFIED = const(203)  # mirrors devicemsg.NOT_MODIFIED
_NO_RESPONSE = const(-1)    # mirrors devicemsg.NO_RESPONSE
_OK = const(1)              # mirrors devicemsg.OK
_UP = const(3)              # mirrors mqtt.UP
_INFLIGHT = const(4)        # mirrors mqtt.INFLIGHT
_RETRY_MS = const(10000)    # mirrors mqtt.RETRY_MS

RESOLVE_WAIT = const(5000)  # ms before a resolve request is retried with a new token
_RESOLVE_TRIES = const(2)
REPORT_WAIT = const(30000)  # ms for the gateway's report_ack


def _nop(*a):
    pass


_ESC = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "$": "%24"}


def topic_key(ident):
    """The identifier as one MQTT topic level (docs/protocol.md#mqtt; proto.devicemsg.topic_key is its twin)."""
    out = []
    for c in ident:
        out.append(_ESC.get(c, c))
    return "".join(out)


class Transport:
    name = "mqtt"

    def __init__(self, ident, poller=None, cache=None, keepalive=60, retry_ms=_RETRY_MS):
        self.id = ident.id
        dev = topic_key(ident.id)
        base = "ida/v1/d/" + dev + "/"
        self.t_status = (base + "status").encode()
        self.t_req = (base + "req").encode()
        self.t_rpt = (base + "rpt").encode()
        self.t_cfgack = (base + "cfgack").encode()
        self._subs = [((base + s).encode(), 1) for s in ("res", "ack", "cfg")]
        self._base_len = len(base)
        will = (self.t_status, devicemsg.encode("status", {_K_ID: ident.id, _K_ONLINE: False}), 1, True)
        tls = getattr(ident, "mqtt_tls", False)
        self.client = Client(dev.encode(), keepalive, will, dev.encode(), password(ident.key), retry_ms=retry_ms,
                        ca_path=ident.ca_path if tls else None)
        if not tls:
            log.w("mqtt", "INSECURE plain mode: no TLS to %s:%d, password in clear (factory bench only)"
                  % ident.mqtt)
        self.client.poller = poller
        self.client.on_msg = self._msg
        self.session = Session(self.client, ident.mqtt[0], ident.mqtt[1], self._up)
        self.cache = cache if cache is not None else rcache.Cache()
        self._token = int.from_bytes(os.urandom(2), "big")
        self._resolves = []  # pending resolves: [token, key, cb, due, tries]
        self._report = None  # pending report: [boot, seq, due]
        self._report_cb = _nop
        self.on_config = None
        self.cfg_hint = 0  # the desired cfgver the last report ack named (0: none)
        self.errors = 0
        self.now = time.ticks_ms()

    @property
    def sock(self):
        return self.client.sock

    def start(self, now):
        self.now = now
        self.session.start(now)

    def stop(self):
        if self.client.state == _UP:
            self.client.publish(self.t_status, devicemsg.encode("status", {_K_ID: self.id, _K_ONLINE: False}),
                           0, True, self.now)
        self.session.stop()
        self._fail_all()

    def _fail_all(self):
        res, self._resolves = self._resolves, []
        for r in res:
            r[2]((_NO_RESPONSE, r[1], None, 0, "no response"))
        if self._report:
            boot, seq = self._report[0], self._report[1]
            self._report = None
            self._report_cb(_NO_RESPONSE, boot, seq)

    def ready(self):
        return self.client.state == _UP and self.client.inflight() < _INFLIGHT

    def _up(self, now):
        self.client.publish(self.t_status, devicemsg.encode("status", {_K_ID: self.id, _K_ONLINE: True}),
                       1, True, now)
        self.client.subscribe(self._subs, now)

    def poll(self, now):
        self.now = now
        was = self.client.state
        self.session.poll(now)
        c = self.client
        if c.refused == 2 and len(c.cid) > 23:  # "identifier rejected": MQTT 3.1.1 only promises 23 bytes
            c.cid = c.cid[:23]
            c.refused = 0
            self.session._next = now  # retry at once with the short id
        if was == _UP and self.client.state != _UP:
            self.errors += 1
            # the pending report's PUBACK/ack may be lost: the reporter resends it from the queue
            if self._report:
                boot, seq = self._report[0], self._report[1]
                self._report = None
                self._report_cb(_NO_RESPONSE, boot, seq)
        for r in self._resolves:
            if time.ticks_diff(now, r[3]) >= 0:
                if r[4] < _RESOLVE_TRIES and self._send_req(r, now):
                    continue
                self._resolves.remove(r)
                r[2]((_NO_RESPONSE, r[1], None, 0, "no response"))
                break  # the list changed: the others wait for the next poll
        if self._report and time.ticks_diff(now, self._report[2]) >= 0:
            boot, seq = self._report[0], self._report[1]
            self._report = None
            self.errors += 1
            self._report_cb(_NO_RESPONSE, boot, seq)

    def _send_req(self, r, now):
        self._token = (self._token + 1) & 0xFFFF
        r[0] = self._token.to_bytes(2, "big")
        r[4] += 1
        r[3] = time.ticks_add(now, RESOLVE_WAIT)
        key = r[1]
        t = rcache.target(key)
        m = {_K_TOKEN: r[0], _K_ID: t}
        if len(key) > len(t):
            m[_K_TYPES] = [key[len(t) + 6:]]
        etag = self.cache.etag(key)
        if etag:
            m[_K_ETAG] = etag
        return self.client.publish(self.t_req, cbor.dumps(m), 0, False, now) == 0

    def resolve(self, target, cb, qtype=None):
        key = rcache.key(target, qtype)
        if self.cache.serve(key, self.now, cb):
            return True
        if self.client.state != _UP or len(self._resolves) >= 2:
            return False
        r = [b"", key, cb, 0, 0]
        if not self._send_req(r, self.now):
            return False
        self._resolves.append(r)
        return True

    def report(self, payload, boot, seq, cb):
        if self._report is not None or self.client.publish(self.t_rpt, payload, 1, False, self.now) < 0:
            return False
        self._report = [boot, seq, time.ticks_add(self.now, REPORT_WAIT)]
        self._report_cb = cb
        return True

    def cfg_ack(self, payload):
        return self.client.publish(self.t_cfgack, payload, 1, False, self.now) >= 0

    def get_config(self):
        return True  # the broker delivers the retained desired config on every subscribe

    def _msg(self, topic, payload, retained):
        if len(topic) != self._base_len + 3:
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
            boot, seq = m[_K_BOOT], m[_K_SEQ]
            self.cfg_hint = m.get(_K_CFGVER, self.cfg_hint)
            if self._report and self._report[0] == boot and self._report[1] == seq:
                self._report = None
            self._report_cb(m[_K_CODE], boot, seq)  # late acks still clear the queue
        elif kind == b"res":
            self._resolved(m, payload)

    def _resolved(self, m, payload):
        tok = m.get(_K_TOKEN)
        for r in self._resolves:
            if r[0] == tok:
                break
        else:
            return  # an answer to a request we retried or gave up on
        self._resolves.remove(r)
        key, cb = r[1], r[2]
        code = m.get(_K_CODE)
        if code == _OK or code == _NOT_MODIFIED:
            ttl = m.get(_K_TTL)
            cb(self.cache.settle(key, code == _OK, payload, m.get(_K_ETAG),
                                 ttl if type(ttl) is int and ttl >= 0 else 60, self.now))
        else:
            msg = m.get(_K_MSG)
            cb((code if type(code) is int else _BAD_REQUEST, rcache.target(key), None, 0,
                msg if type(msg) is str else str(code)))
