"""Active identifier carrier firmware (MicroPython); the wire format is docs/protocol.md, the map docs/firmware.md.

app         the poll loop, config changes, status  startup     boot sequence (dropped after boot)
console     serial console: input, replies, status commands    the other console commands (on first use)
identity    this device's identifier and key     idsyntax    identifier syntax (twin: proto/identifier.py)
devicemsg   device message keys, codes, checks   cbor        the CBOR subset they use
            (twin: proto/devicemsg.py)
coapmsg     CoAP messages, no I/O                coap        the CoAP client (exchanges, Observe, Block2)
oscore      OSCORE over the CoAP client          crypto      HMAC, HKDF, AES-CCM for OSCORE
mqttmsg     MQTT 3.1.1 packets and Reader        mqtt        MQTT Client and reconnecting Session
mqttdevice  the device protocol over MQTT        tls         the MQTT TLS context (mqtts:// only)
rcache      resolve answers cached on the device reporter    periodic reports, one in flight
queue       reports not yet acknowledged (RAM)   qfile       their file in flash (loaded when touched)
config      remote config: validate, apply       log         log lines and their RAM ring
hal/        esp32 and unix ports of the hardware layer, boardfile (board.json, read at boot)
A running device imports only what its transport and security mode use; code that only boot or a rare event
needs is imported for it and dropped again (unload() below), so that .mpy code does not stay in the heap.
"""
VERSION = "0.1.0"


def waiting(poller, s):
    """True when poller (a select.poll holding s) says socket s has bytes to read (TLS: or has them buffered), or
    when there is no poller: the read then finds out. Reading only then keeps an idle loop from allocating (a recv
    that finds nothing raises, leaving its buffer and the exception behind; a readinto wants a view of free space)."""
    if poller is None:
        return True
    for o, _ev in poller.ipoll(0):
        if o is s:
            return True
    return False


def unload(*names):
    """Drop modules of this package that only boot or a rare event needs (startup, identity, config, qfile...), so
    the heap no longer holds their code (their bytecode, when imported from .mpy files) once nothing refers to
    them: what the device keeps of them are records without methods (identity.Identity, config.Config,
    hal.boardfile.Board). The next import loads them again."""
    import sys
    for n in names:
        name = "carrier." + n
        sys.modules.pop(name, None)
        parent, _, leaf = name.rpartition(".")
        sys.modules[parent].__dict__.pop(leaf, None)  # the attribute the import set on its package
