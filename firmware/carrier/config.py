# Remote management: the desired config the gateway sends (MQTT retained cfg topic or CoAP GET/observe
# /d/<id>/cfg) is validated, applied, persisted atomically (<data>/config.json) and acknowledged with a
# config_ack (code 1 applied, 400 rejected + msg). A cfgver that is not newer than the applied one changes
# nothing but is still acknowledged (code 1), so a gateway that missed the first ack stops resending.
import json
from micropython import const

from carrier import cbor, hal, devicemsg

# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_BAD_REQUEST = const(400)  # mirrors devicemsg.BAD_REQUEST
_K_CFGVER = const(20)      # mirrors devicemsg.K_CFGVER
_K_CODE = const(3)         # mirrors devicemsg.K_CODE
_K_ID = const(2)           # mirrors devicemsg.K_ID
_K_INTERVAL = const(21)    # mirrors devicemsg.K_INTERVAL
_K_META = const(22)        # mirrors devicemsg.K_META
_K_MSG = const(9)          # mirrors devicemsg.K_MSG
_OK = const(1)             # mirrors devicemsg.OK

FILE = "config.json"
DEFAULT_INTERVAL = 60
_META_MAX_ENTRIES = const(16)
_META_MAX_BYTES = const(512)


class Config:
    def __init__(self, h, default_interval=DEFAULT_INTERVAL):
        self.hal = h
        self.cfgver = 0
        self.interval = default_interval
        self.meta = {}
        self.on_change = None  # () -> None after a change was applied
        self.applied = self.rejected = 0
        self.error = None  # why config.json was not usable at boot
        data = hal.read(h.root + FILE)
        if data:
            try:
                d = json.loads(data)
                self._set(int(d.get("cfgver", 0)), int(d.get("interval", default_interval)), d.get("meta") or {})
            except (ValueError, TypeError, AttributeError, OverflowError) as e:  # OverflowError: 1e400 -> inf
                self.error = "config.json ignored: %s" % e

    def _set(self, cfgver, interval, meta):
        msg = check_meta(meta)
        if msg or not 10 <= interval <= 86400 or cfgver < 0:
            raise ValueError(msg or "bad interval or cfgver")
        self.cfgver = cfgver
        self.interval = interval
        self.meta = meta

    def save(self):
        hal.write_atomic(self.hal.root + FILE,
                         json.dumps({"cfgver": self.cfgver, "interval": self.interval, "meta": self.meta}).encode())

    def apply(self, payload):
        """Apply a `config` payload from the gateway: (code, cfgver, msg) for the acknowledgement."""
        try:
            m = devicemsg.decode("config", payload)
        except devicemsg.WireError as e:
            self.rejected += 1
            return _BAD_REQUEST, _cfgver_of(payload), str(e)
        v = m[_K_CFGVER]
        meta = m.get(_K_META)
        msg = check_meta(meta) if meta is not None else None
        if msg:
            self.rejected += 1
            return _BAD_REQUEST, v, msg
        if v <= self.cfgver:
            return _OK, v, "not newer than applied cfgver %d" % self.cfgver
        self.cfgver = v
        if _K_INTERVAL in m:
            self.interval = m[_K_INTERVAL]
        if meta is not None:
            self.meta = meta
        self.save()
        self.applied += 1
        if self.on_change:
            self.on_change()
        return _OK, v, None

    def set_interval(self, s):
        """Local change from the console (cfgver unchanged); ValueError when out of range."""
        if not 10 <= s <= 86400:
            raise ValueError("interval must be 10-86400 s")
        self.interval = s
        self.save()
        if self.on_change:
            self.on_change()


def check_meta(meta):
    """None when meta is an acceptable map tstr -> tstr, else the reason."""
    if type(meta) is not dict:
        return "meta must be a map"
    if len(meta) > _META_MAX_ENTRIES:
        return "meta has more than %d entries" % _META_MAX_ENTRIES
    n = 0
    for k in meta:
        v = meta[k]
        if type(k) is not str or type(v) is not str:
            return "meta must map text to text"
        n += len(k) + len(v)
    if n > _META_MAX_BYTES:
        return "meta larger than %d bytes" % _META_MAX_BYTES
    return None


def _cfgver_of(payload):
    try:
        v = cbor.loads(payload).get(_K_CFGVER)
    except (cbor.CBORError, AttributeError):
        return 0
    return v if type(v) is int and v >= 0 else 0


def ack_payload(ident, code, cfgver, msg=None):
    m = {_K_ID: ident, _K_CFGVER: cfgver, _K_CODE: code}
    if msg:
        m[_K_MSG] = msg
    return devicemsg.encode("config_ack", m)
