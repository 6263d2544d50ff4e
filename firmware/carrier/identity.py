# The device's identity: identifier, per-device key, gateway addresses, transport, Wi-Fi credentials.
# Stored as <data>/identity.json (written by the flashing tool, `ida device run` or the console's
# `provision` command):
#   {"id": "88.123.99/PUMP-0001", "transport": "coap" | "mqtt",
#    "coap": "coap://host[:5683]", "mqtt": "mqtt://host[:1883]" | "mqtts://host[:8883]" (TLS),
#    "ca": "ca.crt",                                    (mqtts: the broker's CA, DER or PEM, under the data
#                                                        root unless absolute; default ca.crt)
#    "key": "<hex, 16-32 bytes>",                       (optional here: else the kv/NVS secret "key")
#    "secure": true,                                    (CoAP requests OSCORE-protected: docs/security.md)
#    "wifi": {"ssid": "...", "psk": "..."}}              (ESP32 only)
# Writes are atomic (identity.json.tmp, then rename), so a power cut leaves the old or the new file; a
# stale .tmp is ignored. The key is bytes and is never logged or printed: show fingerprint(key) instead.
# parse() makes an Identity record from the document; load(), save() and erase() work on the files.
import json
import hashlib
import binascii

from carrier import hal, idsyntax

FILE = "identity.json"
KV_KEY = "key"
TRANSPORTS = ("coap", "mqtt")
PORTS = {"coap": 5683, "mqtt": 1883, "mqtts": 8883}
CA_FILE = "ca.crt"


class IdentityError(ValueError):
    pass


def parse_url(url, scheme):
    """'coap://host:port' -> (host, port); IdentityError when malformed."""
    if type(url) is not str or not url.startswith(scheme + "://"):
        raise IdentityError("%s address must be %s://host[:port]" % (scheme, scheme))
    rest = url[len(scheme) + 3:].rstrip("/")
    port = PORTS[scheme]
    if rest.startswith("["):  # [v6]:port
        end = rest.find("]")
        host = rest[1:end]
        rest = rest[end + 1:]
        if rest.startswith(":"):
            port = rest[1:]
    elif ":" in rest:
        host, port = rest.rsplit(":", 1)
    else:
        host = rest
    try:
        port = int(port)
    except ValueError:
        port = 0
    if not host or "/" in host or not 0 < port < 65536:
        raise IdentityError("bad %s address" % scheme)
    return host, port


def fingerprint(key):
    """Short, non-reversible name of the key for consoles and logs."""
    return str(binascii.hexlify(hashlib.sha256(key).digest()[:4]), "ascii")


class Identity:
    """This device's identity, as parse() makes it. A record without methods: the device keeps it after boot,
    and it must not keep this module (or idsyntax) in the heap with it (carrier.unload). The annotations cost
    nothing on the device (MicroPython drops them)."""

    id: str  # normalised
    idb: bytes  # id as UTF-8
    transport: str  # "coap" or "mqtt"
    urls: dict  # scheme -> gateway URL as written
    coap: "tuple | None"  # (host, port)
    mqtt: "tuple | None"
    mqtt_tls: bool
    ca_file: "str | None"  # as written in the file
    ca_path: str  # where the CA is read (load() puts a relative one under the data root)
    key: bytes
    secure: bool  # CoAP requests OSCORE-protected
    wifi: "tuple | None"  # (ssid, psk)


def parse(d, key=None):
    """The Identity of an identity.json document d (key: the secret-store key when d has none);
    IdentityError when it is invalid."""
    if type(d) is not dict:
        raise IdentityError("identity must be a JSON object")
    r = Identity()
    i = d.get("id") or ""
    if type(i) is not str:  # a number or list would reach bytes() in idsyntax.parse: TypeError, not IdentityError
        raise IdentityError("bad identifier: id must be text")
    try:
        r.id = idsyntax.parse(i)
    except idsyntax.IdentifierError as e:
        raise IdentityError("bad identifier: " + e.reason)
    r.idb = r.id.encode()
    t = d.get("transport") or "coap"
    if t not in TRANSPORTS:
        raise IdentityError("transport must be coap or mqtt")
    r.transport = t
    r.urls = {}
    r.coap = r.mqtt = None
    for s in TRANSPORTS:
        u = d.get(s)
        if u:
            tls = s == "mqtt" and type(u) is str and u.startswith("mqtts://")
            setattr(r, s, parse_url(u, "mqtts" if tls else s))
            r.urls[s] = u
    r.mqtt_tls = r.urls.get("mqtt", "").startswith("mqtts://")
    ca = d.get("ca")
    if ca is not None and (type(ca) is not str or not ca):
        raise IdentityError("ca must be a file name")
    r.ca_file = ca
    r.ca_path = ca or CA_FILE  # load() puts it under the data root
    if not r.urls.get(t):
        raise IdentityError("no %s gateway address" % t)
    k = d.get("key")
    if k is not None:
        try:
            key = binascii.unhexlify(k)
        except (ValueError, TypeError):
            raise IdentityError("key must be hex")
    if not key or not 16 <= len(key) <= 32:
        raise IdentityError("key must be 16-32 bytes")
    r.key = key
    s = d.get("secure", False)
    if type(s) is not bool:
        raise IdentityError("secure must be true or false")
    r.secure = s
    w = d.get("wifi")
    r.wifi = (w.get("ssid"), w.get("psk") or "") if type(w) is dict and w.get("ssid") else None
    return r


def to_dict(i):
    """The file form of Identity i, without the key (kept in the secret store)."""
    d = {"id": i.id, "transport": i.transport}
    for s in i.urls:
        d[s] = i.urls[s]
    if i.secure:
        d["secure"] = True
    if i.ca_file:
        d["ca"] = i.ca_file
    if i.wifi:
        d["wifi"] = {"ssid": i.wifi[0], "psk": i.wifi[1]}
    return d


def load(h):
    """The stored identity; None when the device is not provisioned; IdentityError when it is invalid."""
    data = hal.read(h.root + FILE)
    if data is None:
        return None
    try:
        d = json.loads(data)
    except ValueError:
        raise IdentityError(FILE + " is not valid JSON")
    key = None
    if type(d) is dict and d.get("key") is None:
        key = h.kv_get(KV_KEY)
    i = parse(d, key)
    if not i.ca_path.startswith("/"):
        i.ca_path = h.root + i.ca_path
    return i


def save(h, ident_obj):
    """Persist atomically: the key to the secret store, the rest to identity.json."""
    if h.kv_get(KV_KEY) != ident_obj.key:
        h.kv_set(KV_KEY, ident_obj.key)
    hal.write_atomic(h.root + FILE, json.dumps(to_dict(ident_obj)).encode())


def erase(h):
    hal.remove(h.root + FILE)
    hal.remove(h.root + FILE + ".tmp")
    h.kv_del(KV_KEY)
