# Fuzzing the device's CoAP client (carrier/coap.py) with what a hostile or broken network can deliver:
# coapmsg.decode raises only CoapError; Client.poll/datagram never raise, whatever arrives (random datagrams,
# mutated answers that match a pending exchange's Message ID and token: every type, code, option, Block2,
# Observe and payload), every callback gets a well-formed result, the config it passes on is applied by
# the real config.Config without an exception, everything the client sends decodes, and afterwards a clean
# exchange still works. Seeded and bounded (fuzzlib.py); test_regression_* hold the inputs of findings.
from mptest import eq, ok, note
import fuzzlib as F
from fwfakes import FakeSock, coap_reply as _reply
from carrier import coap, coapmsg, cbor
from carrier import config as fwconfig
from carrier import identity

ID = "88.123.99/PUMP-0001"
TARGETS = ("88.1/X", "88.123.99/PUMP-0001", "0.NA/88.1", "88.1/" + "s" * 200, "88.1/a/b/c")
CODES = (0, 1, 2, 65, 67, 68, 69, 95, 128, 131, 132, 141, 157, 160, 163, 164, 191, 224, 255)
OPTS = (
    coapmsg.O_ETAG,
    coapmsg.O_OBSERVE,
    coapmsg.O_CF,
    coapmsg.O_MAX_AGE,
    coapmsg.O_BLOCK2,
    coapmsg.O_SIZE2,
    1,
    3,
    8,
    9,
    11,
    60,
    258,
    259,
    2048,
    65000,
)


def _payloads():
    good = [
        cbor.dumps({3: 1, 2: "88.1/X", 4: [[1, "URL", "https://x.example/", 86400]], 23: 2}),
        cbor.dumps({3: 1, 2: "88.1/X", 4: [], 23: 0}),
        cbor.dumps({10: 1, 11: 1, 3: 1}),
        cbor.dumps({20: 3, 21: 30}),
        cbor.dumps({20: 4, 22: {"URL": "https://y"}}),
        cbor.dumps({3: 100, 9: "handle not found", 5: 60}),
        cbor.dumps({3: 429, 9: "slow down", 5: 3}),
    ]
    return good


PAYLOADS = _payloads()


def _payload():
    k = F.below(5)
    if k == 0:
        return F.pick(PAYLOADS)
    if k == 4:
        try:
            return cbor.dumps(F.message(F.pick(("resolve_response", "report_ack", "config", "error"))))
        except cbor.CBORError:
            return b""
    if k == 1:
        return F.mutate(F.pick(PAYLOADS), PAYLOADS)
    if k == 2:
        return F.rbytes(F.below(40))
    m = {}
    for _ in range(F.below(6)):
        m[F.key()] = F.value(1)
    try:
        return cbor.dumps(m)
    except cbor.CBORError:
        return b""


def _opts():
    out = []
    for _ in range(F.below(5)):
        num = F.pick(OPTS) if F.chance(3) else F.pick(OPTS[:6])
        if num == coapmsg.O_ETAG or F.chance(4):
            val = F.rbytes(F.pick((0, 1, 4, 8, 9)))
        elif num == coapmsg.O_BLOCK2:
            val = (F.below(3) << 4) | (8 if F.chance(2) else 0) | F.below(8)
        else:
            val = F.pick((0, 1, 60, 300, 65535, 2**24, 2**32 - 1))
        out.append((num, val))
    return out


class Rig(F.ClientRig):
    def __init__(self):
        F.ClientRig.__init__(self, "fzc")
        self.c = coap.Client(identity.parse({"id": ID, "coap": "coap://127.0.0.1", "key": "00" * 16}))
        self.c.sock = FakeSock()
        self.c.now = self.now = 1000
        self.c.on_config = self.on_config
        self.sent = []  # (mid, tok, tkl) of requests the client sent

    def reported(self, code, boot, seq, wait_s=-1):
        ok(type(code) is int and (boot, seq) == (7, 9), "report result %r" % ((code, boot, seq),))
        ok(type(wait_s) is int and (wait_s == -1 or code in (429, 503) and wait_s >= 0), "wait %r" % wait_s)
        self.keep(code)

    def collect(self):
        """Decode what the client sent (it must all be well-formed CoAP)."""
        m = coapmsg.Msg()
        for d in self.c.sock.tx:
            try:
                coapmsg.decode(memoryview(d), len(d), m)
            except coapmsg.CoapError as e:
                raise AssertionError("client sent malformed CoAP %s: %s" % (bytes(d).hex(), e))
            if m.type == coapmsg.CON:
                self.sent.append((m.mid, m.token, m.tkl))
                self.sent = self.sent[-8:]
        self.c.sock.tx.clear()

    def feed(self, d):
        self.c.sock.rx.append(d)
        try:
            self.c.poll(self.now)
        except Exception as e:
            raise AssertionError(
                "Client.poll raised %s: %s on datagram %s (seed %d)"
                % (type(e).__name__, e, bytes(d).hex(), F.SEED)
            )
        self.collect()


def _start_something(r):
    c = r.c
    if not c.ready():
        r.now += 100000  # every exchange gives up: slots free again
        r.feed(b"")
    k = F.below(5)
    if k == 0:
        c.resolve(F.pick(TARGETS), r.resolved, F.pick((None, None, "URL", "x" * 40)))
    elif k == 1:
        c.report(cbor.dumps({2: ID, 10: 7, 11: 9}), 7, 9, r.reported)
    elif k >= 3:
        c.get_config()
    else:  # k == 2
        c.cfg_ack(fwconfig.ack_payload(ID, 1, 3))
    r.collect()


def _datagram(r):
    k = F.below(10)
    if k == 0:
        return F.rbytes(F.below(30))
    if k == 1 and r.c._obs >= 0:  # a notification of the /cfg observation (or a stale one)
        mid, tok, tkl = F.below(0x10000), r.c._obs, 2
    elif r.sent and k < 9:
        mid, tok, tkl = r.sent[-1] if F.chance(2) else F.pick(r.sent)
    else:
        mid, tok, tkl = F.below(0x10000), F.below(0x10000), F.pick((0, 2, 8))
    if F.chance(6):
        tok ^= 1
    t = F.pick((coapmsg.ACK, coapmsg.ACK, coapmsg.CON, coapmsg.NON, coapmsg.RST))
    code = (
        F.pick((coapmsg.CONTENT, coapmsg.CONTENT, coapmsg.CHANGED, coapmsg.VALID))
        if F.chance(2)
        else F.pick(CODES)
    )
    d = _reply(t, code, mid, tok, tkl, _opts(), _payload() if not F.chance(5) else b"")
    return F.mutate(d) if F.chance(4) else d


def test_fuzz_decode_only_coap_error():
    F.seed("coap-decode")
    m = coapmsg.Msg()
    seeds = [
        _reply(
            coapmsg.ACK,
            69,
            1,
            2,
            2,
            ((coapmsg.O_ETAG, b"12345678"), (coapmsg.O_BLOCK2, 14), (coapmsg.O_CF, 60)),
            PAYLOADS[0],
        ),
        _reply(coapmsg.CON, 69, 1, 2, 2, ((coapmsg.O_OBSERVE, 5), (300, b"x" * 20)), b""),
    ]
    n = 0
    for r in range(F.rounds(2000)):
        d = F.rbytes(F.below(24)) if r % 2 else F.mutate(F.pick(seeds), seeds)
        n += 1
        try:
            coapmsg.decode(memoryview(d), len(d), m)
        except coapmsg.CoapError:
            continue
        except Exception as e:
            raise AssertionError("decode raised %s: %s on %s" % (type(e).__name__, e, d.hex()))
        ok(4 <= m.payload_at <= len(d) and m.tkl <= 8)
    note(n, "datagrams decoded")


def test_fuzz_client_exchanges():
    F.seed("coap-client")
    r = Rig()
    try:
        n = 0
        base = F.heap()
        for i in range(F.rounds(800)):
            if F.chance(2):
                _start_something(r)
            r.feed(_datagram(r))
            n += 1
            if F.chance(20):
                r.now += F.pick((10, 2000, 5000, 61000))
                r.feed(b"")  # just the timers
        note(n, "datagrams,", r.nresults, "results,", r.configs, "configs, errors", r.c.errors)
        # every exchange ends (answered or given up), then a clean resolve still works
        for _ in range(30):
            r.now += 10000
            r.feed(b"")
        eq([ex.state for ex in r.c.exchanges if ex.state], [], "exchanges left")
        r.results = []
        r.c.cache.clear()
        ok(r.c.resolve("88.1/CLEAN", r.resolved))
        r.sent = []
        r.collect()
        mid, tok, tkl = r.sent[-1]
        r.feed(
            _reply(
                coapmsg.ACK,
                coapmsg.CONTENT,
                mid,
                tok,
                tkl,
                ((coapmsg.O_CF, 60),),
                cbor.dumps({3: 1, 2: "88.1/CLEAN", 4: [[1, "URL", "u", 5]], 23: 2}),
            )
        )
        eq(r.results, [(1, "88.1/CLEAN", [[1, "URL", "u", 5]], 2, None)])
        r.check_heap(base, "client")
    finally:
        r.close()


# -- findings -----------------------------------------------------------------------------------------------
def test_regression_float_key_in_config_notification():
    # fuzz finding (seed 4): a /cfg answer whose payload is {20.0: {"0.NA/x": "\u0085"}} (a float key equal to
    # cfgver) raised TypeError out of Client.poll via Config.apply -> devicemsg.check.
    r = Rig()
    try:
        ok(r.c.get_config())
        r.collect()
        mid, tok, tkl = r.sent[-1]
        r.feed(
            _reply(
                coapmsg.ACK,
                coapmsg.CONTENT,
                mid,
                tok,
                tkl,
                ((coapmsg.O_OBSERVE, 3), (coapmsg.O_CF, 60)),
                bytes.fromhex("a1f94d00a166302e4e412f7862c285"),
            )
        )
        eq((r.configs, r.cfg.rejected, r.cfg.cfgver), (1, 1, 0))
        # the observation stays: a later good notification is applied
        r.feed(
            _reply(
                coapmsg.NON,
                coapmsg.CONTENT,
                7,
                tok,
                tkl,
                ((coapmsg.O_OBSERVE, 4),),
                cbor.dumps({20: 5, 21: 30}),
            )
        )
        eq((r.configs, r.cfg.cfgver, r.cfg.interval), (2, 5, 30))
    finally:
        r.close()
