# Message keys, codes and checks of docs/protocol.md (device side). The CPython twin is proto/devicemsg.py;
# tests/vectors/messages.json pins both.
from micropython import const

from carrier import cbor

# Message keys: private (no module attribute on the chip); the modules that build or read messages keep marked
# copies (`_K_ID = const(2)  # mirrors devicemsg._K_ID`, checked by fwcheck), tests use NAMES or the numbers.
_K_TOKEN = const(1)
_K_ID = const(2)
_K_CODE = const(3)
_K_VALUES = const(4)
_K_TTL = const(5)
_K_ETAG = const(6)
_K_TYPES = const(7)
_K_INDEXES = const(8)
_K_MSG = const(9)
_K_BOOT = const(10)
_K_SEQ = const(11)
_K_UPTIME = const(12)
_K_HEAP = const(13)
_K_RSSI = const(14)
_K_QUEUE = const(15)
_K_BOARD = const(16)
_K_FW = const(17)
_K_SENSORS = const(18)
_K_DROPPED = const(19)
_K_CFGVER = const(20)
_K_INTERVAL = const(21)
_K_META = const(22)
_K_SOURCE = const(23)
_K_ONLINE = const(24)
_K_TIME = const(25)

# key -> name (index = key); used by tests, the console's JSON mode and error messages
NAMES = ("", "token", "id", "code", "values", "ttl", "etag", "types", "indexes", "msg", "boot", "seq",
         "uptime", "heap", "rssi", "queue", "board", "fw", "sensors", "dropped", "cfgver", "interval",
         "meta", "source", "online", "time")

OK = const(1)
NOT_FOUND = const(100)
VALUES_NOT_FOUND = const(200)
NOT_MODIFIED = const(203)
BAD_REQUEST = const(400)
UNAUTHORIZED = const(401)  # device-local: CoAP 4.01 (OSCORE key not accepted); not a payload code
FORBIDDEN = const(403)
TOO_LARGE = const(413)
RATE_LIMITED = const(429)
INTERNAL = const(500)
UPSTREAM_UNAVAILABLE = const(503)
UPSTREAM_TIMEOUT = const(504)
NO_RESPONSE = const(-1)  # device-local, never on the wire: the gateway/broker did not answer in time

# Type letter of each key (index = key): b token/etag bytes(1-8), s text, u uint, i int, V values,
# S text list, U uint list, M sensors map, T text map, B bool, I interval, R source.
_TYPES = "-bsuVubSUsuuuuiussMuuITRBu"

# message -> (required keys, optional keys)
MESSAGES = {
    "resolve_request": ((1, 2), (7, 8, 6)),
    "resolve_response": ((3, 2, 4), (1, 5, 6, 23)),
    "not_modified": ((3,), (1, 5, 6)),
    "error": ((3,), (1, 9, 2, 5)),
    "report": ((2, 10, 11, 12, 13, 14, 15, 16, 17), (18, 19, 25)),
    "report_ack": ((10, 11, 3), (20,)),
    "config": ((20,), (21, 22)),
    "config_ack": ((2, 20, 3), (9,)),
    "status": ((2, 24), ()),
}


class WireError(ValueError):
    pass


def _uint(v):
    return type(v) is int and v >= 0


def _ok(t, v):
    if t == "u":
        return _uint(v)
    if t == "s":
        return type(v) is str
    if t == "b":
        return type(v) is bytes and 1 <= len(v) <= 8
    if t == "i":
        return type(v) is int
    if t == "B":
        return type(v) is bool
    if t == "I":
        return _uint(v) and 10 <= v <= 86400
    if t == "R":
        return _uint(v) and v <= 3
    if t == "S" or t == "U" or t == "V":
        if type(v) is not list:
            return False
        for x in v:
            if t == "S" and type(x) is not str:
                return False
            if t == "U" and not _uint(x):
                return False
            if t == "V" and not (type(x) is list and len(x) == 4 and _uint(x[0]) and type(x[1]) is str
                                 and type(x[2]) in (str, bytes) and _uint(x[3])):
                return False
        return True
    if t == "M" or t == "T":
        if type(v) is not dict:
            return False
        for k in v:
            x = v[k]
            if type(k) is not str:
                return False
            if t == "T" and type(x) is not str:
                return False
            if t == "M" and type(x) not in (int, float, str, bool):
                return False
        return True
    return False


def check(name, m):
    """Raise WireError unless the int-keyed dict m is a valid message `name`; returns m."""
    if type(m) is not dict:
        raise WireError(name + ": payload must be a map")
    req, opt = MESSAGES[name]
    for k in req:
        if k not in m:
            raise WireError("%s: missing %s" % (name, NAMES[k]))
    for k in m:
        if k in req or k in opt:
            if type(k) is float:  # 10.0 == 10 finds the key, but the message says integer keys
                raise WireError("%s: key %r is not an integer" % (name, k))
            if not _ok(_TYPES[k], m[k]):
                raise WireError("%s: bad %s" % (name, NAMES[k]))
    return m


def decode(name, data):
    """Decode and check a payload; WireError (a ValueError) for anything malformed."""
    try:
        m = cbor.loads(data)
    except cbor.CBORError as e:
        raise WireError("%s: %s" % (name, e))
    return check(name, m)


def encode(name, m):
    return cbor.dumps(check(name, m))
