# Tiny on-device cache of resolve answers, shared by the CoAP and MQTT transports. An entry keeps the
# gateway's raw CBOR answer, its ETag and an expiry from Max-Age (CoAP) or ttl (MQTT). A fresh entry is
# served without asking; an expired one with an ETag is revalidated (2.03 / code 203 refreshes it).
# Bounded by entry count and payload bytes; least recently used goes first. Both transports resolve through
# it the same way: serve() a fresh entry, etag() to revalidate a stale one, settle() the gateway's answer.
import time
from micropython import const

from carrier import devicemsg

# const() folds only inside one module: the numbers used here are copies, checked by fwcheck
_BAD_REQUEST = const(400)  # mirrors devicemsg.BAD_REQUEST
_INTERNAL = const(500)     # mirrors devicemsg.INTERNAL
_K_CODE = const(3)         # mirrors devicemsg._K_CODE
_K_ID = const(2)           # mirrors devicemsg._K_ID
_K_SOURCE = const(23)      # mirrors devicemsg._K_SOURCE
_K_VALUES = const(4)       # mirrors devicemsg._K_VALUES
_OK = const(1)             # mirrors devicemsg.OK

_MAX_AGE_CAP = const(86400)  # s; keeps ticks arithmetic inside half the ticks period


class Cache:
    def __init__(self, entries=4, max_bytes=1024):
        self.entries = entries
        self.max_bytes = max_bytes
        self._lru = []  # [key, etag, expires_ticks, payload], least recently used first
        self.bytes = 0
        self.hits = 0

    def get(self, key):
        for e in self._lru:
            if e[0] == key:
                self._lru.remove(e)
                self._lru.append(e)
                return e
        return None

    def serve(self, key, now, cb):
        """Answer cb from a fresh entry for key (a hit, src -1) and return True; else False."""
        e = self.get(key)
        if e is None or time.ticks_diff(e[2], now) <= 0:
            return False
        self.hits += 1
        cb(answer(target(key), e[3], -1))
        return True

    def etag(self, key):
        """The ETag of the (stale) entry for key, to revalidate with; None when there is none."""
        e = self.get(key)
        return e[1] if e else None

    def settle(self, key, fresh, data, etag, max_age, now):
        """The result of the gateway's answer for key: fresh, data is a resolve_response (kept when valid); not
        fresh, the cached entry was revalidated (2.03 / code 203) and lives max_age longer (src -2)."""
        t = target(key)
        if fresh:
            data = bytes(data)
            res = answer(t, data)
            if res[0] == _OK:
                self.put(key, etag, max_age, data, now)
            return res
        e = self.refresh(key, max_age, now)
        return answer(t, e[3], -2) if e else (_INTERNAL, t, None, 0, "not modified, but not cached")

    def put(self, key, etag, max_age, payload, now):
        self.drop(key)
        n = len(payload)
        if n > self.max_bytes or (max_age <= 0 and not etag):
            return None
        while self._lru and (len(self._lru) >= self.entries or self.bytes + n > self.max_bytes):
            self.bytes -= len(self._lru.pop(0)[3])
        e = [key, etag, time.ticks_add(now, min(max_age, _MAX_AGE_CAP) * 1000), payload]
        self._lru.append(e)
        self.bytes += n
        return e

    def refresh(self, key, max_age, now):
        e = self.get(key)
        if e:
            e[2] = time.ticks_add(now, min(max_age, _MAX_AGE_CAP) * 1000)
        return e

    def drop(self, key):
        for e in self._lru:
            if e[0] == key:
                self._lru.remove(e)
                self.bytes -= len(e[3])
                return

    def clear(self):
        self._lru = []
        self.bytes = 0


def key(ident, qtype=None):
    """The cache key of a resolve: the identifier, with "?type=<qtype>" when only that type is asked for."""
    return ident if qtype is None else ident + "?type=" + qtype


def target(key):
    """The identifier of a cache key."""
    q = key.find("?type=")
    return key if q < 0 else key[:q]


def answer(target, payload, src=None):
    """Result tuple (code, id, values, src, msg) of a resolve_response payload. src: the gateway's source
    (0 zone, 1 cache, 2 upstream, 3 stale) or, when given, -1 served by the device cache / -2 revalidated."""
    try:
        r = devicemsg.decode("resolve_response", payload)
    except devicemsg.WireError as e:
        return (_BAD_REQUEST, target, None, 0, str(e))
    return (r[_K_CODE], r[_K_ID], r[_K_VALUES], r.get(_K_SOURCE, 0) if src is None else src,
            None)
