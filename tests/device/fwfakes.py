# Test doubles for firmware tests under micropython: temp data dirs, a RAM block device holding a real
# LittleFS (with a snapshot after every block write, to simulate a power cut at any point), a fake HAL
# with controllable time, and fake sockets.
import json
import os
import vfs


def rmtree(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        return
    for e in entries:
        p = path + "/" + e[0]
        if e[1] == 0x4000:
            rmtree(p)
        else:
            os.remove(p)
    os.rmdir(path)


def tmpdir(tag="t"):
    p = "/tmp/ida-fw-%s-%s" % (tag, os.urandom(4).hex())
    os.mkdir(p)
    return p + "/"


class RamDev:
    """Block device for vfs.VfsLfs2; snaps (when a list) gets the whole image after every write/erase."""

    def __init__(self, bs=512, n=64):
        self.bs = bs
        self.n = n
        self.data = bytearray(b"\xff" * (bs * n))
        self.snaps = None

    def readblocks(self, b, buf, off=0):
        a = b * self.bs + off
        buf[:] = self.data[a : a + len(buf)]

    def writeblocks(self, b, buf, off=None):
        a = b * self.bs + (off or 0)
        self.data[a : a + len(buf)] = buf
        if self.snaps is not None:
            self.snaps.append(bytes(self.data))

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:
            a = arg * self.bs
            self.data[a : a + self.bs] = b"\xff" * self.bs
            if self.snaps is not None:
                self.snaps.append(bytes(self.data))
            return 0
        return None


def lfs_mount(dev, point="/lfs", fresh=False):
    if fresh:
        vfs.VfsLfs2.mkfs(dev)
    vfs.mount(vfs.VfsLfs2(dev), point)
    return point + "/"


def lfs_umount(point="/lfs"):
    vfs.umount(point)


class FakeBoard:
    name = "unix"
    chip = "unix"
    led = None
    button = None
    console = "stdio"
    wifi = False


class FakeHal:
    """The HAL interface with a settable clock, in-memory kv/rtc and a console fed by tests."""

    def __init__(self, root, uid=b"\x02\x00\x00\x00\x00\x07"):
        self.root = root
        self.board = FakeBoard()
        self.now = 1000
        self.wall = 0
        self._uid = uid
        self.net = True
        self.kv = {}
        self.rtc = b""
        self.fed = 0
        self.wdt = 0
        self.led_on = False
        self.resets = 0
        self.con = None
        self.inp = bytearray()
        self.out = []

    def ticks(self):
        return self.now

    def time(self):
        return self.wall

    def sleep_ms(self, ms):
        self.now += ms

    def uid(self):
        return self._uid

    def net_poll(self, now):
        pass

    def net_up(self):
        return self.net

    def net_set(self, on, wifi=None):
        self.net = bool(on)

    def rssi(self):
        return -61 if self.net else 0

    def wdt_start(self, ms):
        self.wdt = ms

    def wdt_feed(self):
        self.fed += 1

    def led(self, on):
        self.led_on = on

    def button(self):
        return False

    def kv_get(self, name):
        return self.kv.get(name)

    def kv_set(self, name, data):
        self.kv[name] = bytes(data)

    def kv_del(self, name):
        self.kv.pop(name, None)

    def rtc_get(self):
        return self.rtc

    def rtc_set(self, data):
        self.rtc = bytes(data)

    def reset(self):
        from carrier.hal import Reset

        self.resets += 1
        raise Reset()

    def deepsleep(self, ms):
        self.reset()

    def con_read(self, mv1):
        if not self.inp:
            return 0
        mv1[0] = self.inp[0]
        self.inp = self.inp[1:]
        return 1

    def con_write(self, s):
        self.out.append(s)

    def output(self):
        s = "".join(self.out)
        self.out = []
        return s


class FakeSock:
    """Datagram/stream socket double: `rx` is a list of chunks that readinto() returns one by one
    (None when empty: EAGAIN), `tx` collects what was sent."""

    def __init__(self):
        self.rx = []
        self.tx = []
        self.closed = False

    def readinto(self, buf, n=None):
        if not self.rx:
            return None
        c = self.rx.pop(0)
        if c is None or isinstance(c, OSError):
            raise c or OSError(104)
        k = min(len(c), len(buf) if n is None else n)
        buf[:k] = c[:k]
        if k < len(c):
            self.rx.insert(0, c[k:])
        return k

    def recv(self, n):
        if not self.rx:
            raise OSError(11)
        c = self.rx.pop(0)
        if isinstance(c, OSError):
            raise c
        return c

    def send(self, b):
        self.tx.append(bytes(b))
        return len(b)

    def write(self, b, n=None):
        b = bytes(b) if n is None else bytes(b[:n])
        self.tx.append(b)
        return len(b)

    def close(self):
        self.closed = True


def coap_reply(t, code, mid, tok, tkl, opts=(), payload=None):
    """A CoAP message as the gateway would send it; ``opts`` are (number, bytes or int) in any order."""
    from carrier import coapmsg

    buf = bytearray(1400)
    pos = coapmsg.header(buf, t, code, mid, tok, tkl)
    last = 0
    for num, val in sorted(opts, key=lambda o: o[0]):
        if type(val) is int:
            pos = coapmsg.uint_opt(buf, pos, num - last, val)
        else:
            pos = coapmsg.opt(buf, pos, num - last, val)
        last = num
    if payload:
        buf[pos] = 0xFF
        buf[pos + 1 : pos + 1 + len(payload)] = payload
        pos += 1 + len(payload)
    return bytes(buf[:pos])


class CoapServer:
    """A loopback CoAP gateway for firmware tests, served from the test's own loop (serve() is
    non-blocking): POST .../rpt -> 2.04 report_ack (5.03 + Max-Age `overload` while set; `refuse`: that code), GET /r/... -> 2.05 resolve_response (or 4.04 for
    suffixes starting with "missing"), GET .../cfg -> 2.05 `cfg` when set else 4.04, POST .../cfg -> 2.04
    (the config_ack is kept in cfg_acks). `down` makes it drop everything."""

    def __init__(self):
        import socket
        from carrier import coapmsg

        self.coapmsg = coapmsg
        self.sock = None
        for port in range(47300, 47400):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
            except OSError:
                s.close()
                continue
            self.sock = s
            self.port = port
            break
        self.sock.setblocking(False)
        self.reports = []
        self.cfg_acks = []
        self.resolves = []
        self.cfg = None
        self.desired = (
            None  # a cfgver the report acks name (as the gateway does when a desired config is set)
        )
        self.cfg_gets = 0
        self.down = False
        self.overload = None  # seconds: answer reports 5.03 with this Max-Age (an overloaded gateway)
        self.refuse = (
            None  # a CoAP code (e.g. 128 = 4.00): answer reports with it, an error payload, no Max-Age
        )
        self.posts = 0  # report POSTs received, answered or not
        self._buf = bytearray(1200)
        self._out = bytearray(1200)
        self._msg = coapmsg.Msg()

    def close(self):
        self.sock.close()

    def serve(self):
        from carrier import cbor

        coapmsg = self.coapmsg
        for _ in range(16):
            try:
                data, addr = self.sock.recvfrom(1200)
            except OSError:
                return
            n = len(data)
            self._buf[:n] = data
            if self.down:
                continue
            m = coapmsg.decode(memoryview(self._buf), n, self._msg)
            path = []
            pos = 4 + m.tkl
            num = 0
            mv = memoryview(self._buf)
            hd = [0, 0]
            while pos < n and self._buf[pos] != 0xFF:
                pos = coapmsg.option(mv, pos, n, hd)
                num += hd[0]
                ln = hd[1]
                if num == coapmsg.O_URI_PATH:
                    path.append(str(bytes(mv[pos : pos + ln]), "utf-8"))
                pos += ln
            body = bytes(mv[m.payload_at : n])
            code, opts, payload = 132, (), None
            if path and path[0] == "d" and path[-1] == "rpt" and (self.overload is not None or self.refuse):
                self.posts += 1
                if self.overload is not None:
                    code, opts = 163, ((coapmsg.O_CF, 60), (coapmsg.O_MAX_AGE, self.overload))
                    payload = cbor.dumps({3: 503, 9: "overloaded: come back later"})
                else:
                    code, opts, payload = (
                        self.refuse,
                        ((coapmsg.O_CF, 60),),
                        cbor.dumps({3: 400, 9: "bad report"}),
                    )
            elif path and path[0] == "d" and path[-1] == "rpt":
                self.posts += 1
                rep = cbor.loads(body)
                self.reports.append(rep)
                ack = {10: rep[10], 11: rep[11], 3: 1}
                if self.desired is not None:
                    ack[20] = self.desired
                code, payload = 68, cbor.dumps(ack)
            elif path and path[0] == "d" and path[-1] == "cfg":
                if m.code == 2:
                    self.cfg_acks.append(cbor.loads(body))
                    code = 68
                elif self.cfg is not None:
                    self.cfg_gets += 1
                    code, opts, payload = (
                        69,
                        ((coapmsg.O_OBSERVE, 1), (coapmsg.O_CF, 60)),
                        cbor.dumps(self.cfg),
                    )
            elif path and path[0] == "r":
                ident = path[1] + "/" + "/".join(path[2:])
                self.resolves.append(ident)
                if path[2].startswith("missing"):
                    payload = cbor.dumps({3: 100, 9: "handle not found"})
                else:
                    code = 69
                    opts = (
                        (coapmsg.O_ETAG, b"\x00\x01\x02\x03\x04\x05\x06\x07"),
                        (coapmsg.O_CF, 60),
                        (coapmsg.O_MAX_AGE, 300),
                    )
                    payload = cbor.dumps(
                        {3: 1, 2: ident, 4: [[1, "URL", "https://example.org/" + ident, 300]], 23: 2}
                    )
            o = self._out
            p = coapmsg.header(o, coapmsg.ACK, code, m.mid, m.token, m.tkl)
            last = 0
            for num, val in opts:
                p = (
                    coapmsg.uint_opt(o, p, num - last, val)
                    if type(val) is int
                    else coapmsg.opt(o, p, num - last, val)
                )
                last = num
            if payload:
                o[p] = 0xFF
                o[p + 1 : p + 1 + len(payload)] = payload
                p += 1 + len(payload)
            self.sock.sendto(memoryview(o)[:p], addr)


# ---- a whole device on the fake HAL against the loopback gateway -----------------------------------------
KEY = "00112233445566778899aabbccddeeff"
ID = "88.123.99/PUMP-0001"


class Rig:
    def __init__(self, provision=True, transport="coap"):
        self.root = tmpdir("app")
        self.srv = CoapServer()
        self.hal = FakeHal(self.root)
        if provision:
            d = {"id": ID, "transport": transport, "coap": "coap://127.0.0.1:%d" % self.srv.port, "key": KEY}
            with open(self.root + "identity.json", "w") as f:
                json.dump(d, f)
        self.app = None

    def boot(self, **kw):
        h2 = FakeHal(self.root)  # a reboot: same flash, kv and RTC memory; fresh RAM
        h2.kv = self.hal.kv
        h2.rtc = self.hal.rtc
        h2.now = self.hal.now
        h2.net = self.hal.net
        self.hal = h2
        from carrier import app as A

        self.app = A.App(h2, **kw)
        self.app.boot()
        return self.app

    def run(self, ms, until=None):
        end = self.hal.now + ms
        while self.hal.now < end:
            self.app.step(self.hal.now)
            self.srv.serve()
            if until and until():
                return True
            self.hal.now += 10  # loopback datagrams arrive at once: no real sleeping needed
        return False

    def con(self, line):
        self.hal.output()
        self.hal.inp.extend(line.encode() + b"\n")
        for _ in range(50):  # the console takes at most READ_MAX bytes per loop
            self.app.step(self.hal.now)
            if not self.hal.inp:
                break
        return self.hal.output()

    def close(self):
        self.srv.close()
        rmtree(self.root[:-1])


def log_reset():
    from carrier import log

    log.sink = log._print
