# Test doubles for firmware tests under micropython: temp data dirs, a RAM block device holding a real
# LittleFS (with a snapshot after every block write, to simulate a power cut at any point), a fake HAL
# with controllable time, and fake sockets.
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
        buf[:] = self.data[a:a + len(buf)]

    def writeblocks(self, b, buf, off=None):
        a = b * self.bs + (off or 0)
        self.data[a:a + len(buf)] = buf
        if self.snaps is not None:
            self.snaps.append(bytes(self.data))

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:
            a = arg * self.bs
            self.data[a:a + self.bs] = b"\xff" * self.bs
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

    def send(self, b):
        self.tx.append(bytes(b))
        return len(b)

    def write(self, b, n=None):
        b = bytes(b) if n is None else bytes(b[:n])
        self.tx.append(b)
        return len(b)

    def close(self):
        self.closed = True
