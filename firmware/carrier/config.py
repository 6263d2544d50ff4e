# Remote management: the desired config the gateway sends (MQTT retained cfg topic or CoAP GET/observe
# /d/<id>/cfg) is validated, applied, persisted atomically (<data>/config.json) and acknowledged with a
# config_ack (code 1 applied, 400 rejected + msg). A cfgver that is not newer than the applied one changes
# nothing but is still acknowledged (code 1), so a gateway that missed the first ack stops resending.
# load() reads the Config record at boot; apply() and set_interval() change it and persist it.
import json
from micropython import const

from carrier import cbor, hal, devicemsg

# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_BAD_REQUEST = const(400)  # mirrors devicemsg.BAD_REQUEST
_K_CFGVER = const(20)      # mirrors devicemsg._K_CFGVER
_K_CODE = const(3)         # mirrors devicemsg._K_CODE
_K_ID = const(2)           # mirrors devicemsg._K_ID
_K_INTERVAL = const(21)    # mirrors devicemsg._K_INTERVAL
_K_META = const(22)        # mirrors devicemsg._K_META
_K_MSG = const(9)          # mirrors devicemsg._K_MSG
_OK = const(1)             # mirrors devicemsg.OK

FILE = "config.json"
DEFAULT_INTERVAL = 60
_META_MAX_ENTRIES = const(16)
_META_MAX_BYTES = const(512)


class Config:
    """The applied config, as load() makes it. A record without methods: the device keeps it, and it must not
    keep this module in the heap with it (the app imports this module for a config change and drops it again:
    carrier.unload). The annotations cost nothing on the device."""

    root: str  # data directory (config.json is written there)
    cfgver: int
    interval: int  # s between reports
    meta: dict  # text -> text
    on_change: "object"  # () -> None after a change was applied, or None
    applied: int
    rejected: int
    error: "str | None"  # why config.json was not usable at boot


def load(h, default_interval=DEFAULT_INTERVAL):
    """The config persisted in <data>/config.json, or the defaults (error says why the file was not usable)."""
    c = Config()
    c.root = h.root
    c.cfgver = 0
    c.interval = default_interval
    c.meta = {}
    c.on_change = None
    c.applied = c.rejected = 0
    c.error = None
    data = hal.read(h.root + FILE)
    if data:
        try:
            d = json.loads(data)
            _set(c, int(d.get("cfgver", 0)), int(d.get("interval", default_interval)), d.get("meta") or {})
        except (ValueError, TypeError, AttributeError, OverflowError) as e:  # OverflowError: 1e400 -> inf
            c.error = "config.json ignored: %s" % e
    return c


def _set(c, cfgver, interval, meta):
    msg = check_meta(meta)
    if msg or not 10 <= interval <= 86400 or cfgver < 0:
        raise ValueError(msg or "bad interval or cfgver")
    c.cfgver = cfgver
    c.interval = interval
    c.meta = meta


def save(c):
    hal.write_atomic(c.root + FILE, json.dumps({"cfgver": c.cfgver, "interval": c.interval, "meta": c.meta}).encode())


def apply(c, payload):
    """Apply a `config` payload from the gateway to c: (code, cfgver, msg) for the acknowledgement."""
    try:
        m = devicemsg.decode("config", payload)
    except devicemsg.WireError as e:
        c.rejected += 1
        return _BAD_REQUEST, _cfgver_of(payload), str(e)
    v = m[_K_CFGVER]
    meta = m.get(_K_META)
    msg = check_meta(meta) if meta is not None else None
    if msg:
        c.rejected += 1
        return _BAD_REQUEST, v, msg
    if v <= c.cfgver:
        return _OK, v, "not newer than applied cfgver %d" % c.cfgver
    c.cfgver = v
    if _K_INTERVAL in m:
        c.interval = m[_K_INTERVAL]
    if meta is not None:
        c.meta = meta
    save(c)
    c.applied += 1
    if c.on_change:
        c.on_change()
    return _OK, v, None


def set_interval(c, s):
    """Local change from the console (cfgver unchanged); ValueError when out of range."""
    if not 10 <= s <= 86400:
        raise ValueError("interval must be 10-86400 s")
    c.interval = s
    save(c)
    if c.on_change:
        c.on_change()


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
