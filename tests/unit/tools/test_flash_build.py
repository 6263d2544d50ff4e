"""`ida flash build`: the filesystem image is what MicroPython itself mounts.

The key checks: the image built for esp32-devkitc mounts in littlefs-python AND in MicroPython's own
``vfs.VfsLfs2`` inside the real ``micropython`` binary (block size and count must be right, or it would
refuse); MicroPython can write to it and littlefs-python reads that back; the per-chip image (batch image +
/identity.json) differs from the batch image in at most 2 blocks and carries the identity the firmware parses.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import IO

import pytest

from tests.support.flashutil import firmware_tree
from tools.commands.flash import builder as fb
from tools.commands.flash import image as im
from tools.commands.flash.identity import IDENTITY_PATH, Identity, new_key, parse_identity, personalise
from tools.support.boards import load_board
from tools.support.procs import ida_command, micropython_binary

BOARD = "esp32-devkitc"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> fb.Build:
    tmp = tmp_path_factory.mktemp("flashbuild")
    fw, _ = firmware_tree(tmp)
    fb.build(BOARD, tmp / "out", firmware_dir=fw)
    return fb.load_build(tmp / "out", BOARD)


def test_build_writes_manifest_image_and_table(built: fb.Build) -> None:
    board = load_board(BOARD)
    m = built.manifest
    assert m.board == BOARD and m.chip == "esp32"
    assert m.fs_image["size"] == board.vfs.size == 0x200000
    assert m.fs_image["block_count"] == 512 and m.fs_image["block_size"] == 4096
    assert m.fs_image["offset"] == 0x200000
    assert m.runtime is None and m.factory_image is None
    assert m.firmware_version == fb.firmware_version()
    assert "mpy v6" in m.mpy_cross
    paths = {f.path for f in m.files}
    assert "/main.py" in paths and "/board.json" in paths and "/carrier/__init__.mpy" in paths
    assert not any(p.endswith(".py") and p not in ("/main.py", "/boot.py") for p in paths)
    # every file in the manifest is in the app/ tree with that sha256
    for f in m.files:
        assert im.sha256((built.directory / "app" / f.path[1:]).read_bytes()) == f.sha256
    table = im.decode_partition_table((built.directory / fb.PARTITION_TABLE).read_bytes())
    assert [(e.name, e.offset, e.size) for e in table] == [
        ("nvs", 0x9000, 0x6000),
        ("phy_init", 0xF000, 0x1000),
        ("factory", 0x10000, 0x1F0000),
        ("vfs", 0x200000, 0x200000),
    ]


def test_mpy_files_are_bytecode_for_any_arch(built: fb.Build) -> None:
    for f in built.manifest.files:
        if f.path.endswith(".mpy"):
            head = (built.directory / "app" / f.path[1:]).read_bytes()[:4]
            assert head[0:1] == b"M" and head[1] == 6  # .mpy v6
            assert head[2] >> 2 == 0  # no native architecture: runs on every chip and on the unix port


def test_superblock_says_v2_0_and_the_region_geometry(built: fb.Build) -> None:
    sb = built.fs_image
    assert sb[8:16] == b"littlefs"
    version, block_size, block_count, name_max = struct.unpack_from("<IIII", sb, 20)
    assert (version, block_size, block_count, name_max) == (0x00020000, 4096, 512, 255)


def test_image_mounts_in_littlefs_python(built: fb.Build) -> None:
    files = im.read_files(built.params, built.fs_image)
    expect = {f.path: f.sha256 for f in built.manifest.files}
    assert {p: im.sha256(d) for p, d in files.items()} == expect
    assert json.loads(files["/board.json"])["name"] == BOARD


# MicroPython script: mount an image file with vfs.VfsLfs2 through a block device over the file, list and hash
# every file, optionally write one, and print one JSON line.
MP_MOUNT = r"""
import sys, os, vfs, json, hashlib, binascii

class FileBlockDev:
    def __init__(self, path, block_size):
        self.f = open(path, "r+b")
        self.bs = block_size
        self.f.seek(0, 2)
        self.n = self.f.tell() // block_size

    def readblocks(self, block, buf, off=0):
        self.f.seek(block * self.bs + off)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, off=None):
        if off is None:  # whole blocks: erase then program
            off = 0
        self.f.seek(block * self.bs + off)
        self.f.write(buf)

    def ioctl(self, op, arg):
        if op == 4:  # MP_BLOCKDEV_IOCTL_BLOCK_COUNT
            return self.n
        if op == 5:  # MP_BLOCKDEV_IOCTL_BLOCK_SIZE
            return self.bs
        if op == 6:  # MP_BLOCKDEV_IOCTL_BLOCK_ERASE
            self.f.seek(arg * self.bs)
            self.f.write(b"\xff" * self.bs)
            return 0
        if op == 3:  # sync
            self.f.flush()
        return 0

def walk(top, out):
    for name, kind, _, size in os.ilistdir(top):
        path = top.rstrip("/") + "/" + name
        if kind == 0x4000:
            walk(path, out)
        else:
            with open(path, "rb") as f:
                out[path[len("/flash"):]] = binascii.hexlify(hashlib.sha256(f.read()).digest()).decode()

bdev = FileBlockDev(sys.argv[1], 4096)
fs = vfs.VfsLfs2(bdev)  # MicroPython's defaults: readsize=32, progsize=32, lookahead=32
vfs.mount(fs, "/flash")
files = {}
walk("/flash", files)
st = os.statvfs("/flash")
ident = None
try:
    with open("/flash/identity.json") as f:
        ident = json.loads(f.read())
except OSError:
    pass
if len(sys.argv) > 2:
    with open("/flash/probe.bin", "wb") as f:
        f.write(sys.argv[2].encode())
vfs.umount("/flash")
print(json.dumps({"files": files, "bsize": st[0], "blocks": st[2], "free": st[3], "identity": ident}))
"""


def mp_mount(tmp: Path, image: bytes, write: str | None = None) -> tuple[dict, bytes]:
    script = tmp / "mount.py"
    script.write_text(MP_MOUNT)
    img = tmp / "fs.img"
    img.write_bytes(image)
    argv = [micropython_binary(), str(script), str(img)] + ([write] if write else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), img.read_bytes()


def test_image_mounts_in_micropython_vfslfs2(built: fb.Build, tmp_path: Path) -> None:
    out, after = mp_mount(tmp_path, built.fs_image)
    assert out["bsize"] == 4096 and out["blocks"] == 512  # MicroPython sees the geometry of the vfs region
    assert out["files"] == {f.path: f.sha256 for f in built.manifest.files}
    assert out["identity"] is None
    assert after == built.fs_image  # mounting and reading wrote nothing


def test_micropython_writes_are_read_by_littlefs_python(built: fb.Build, tmp_path: Path) -> None:
    _, after = mp_mount(tmp_path, built.fs_image, write="written by VfsLfs2")
    files = im.read_files(built.params, after)
    assert files["/probe.bin"] == b"written by VfsLfs2"
    assert im.sha256(files["/main.py"]) == next(
        f.sha256 for f in built.manifest.files if f.path == "/main.py"
    )


def test_chip_image_adds_identity_in_few_blocks(built: fb.Build, tmp_path: Path) -> None:
    ident = Identity("88.123.99/pump-000042", new_key(), ("coap://192.168.4.1:5683",), "coap")
    chip = personalise(built.params, built.fs_image, ident)
    assert 1 <= chip.delta_blocks <= 2, chip.delta_blocks
    # the delta applied to the batch image is the chip image
    patched = bytearray(built.fs_image)
    for off, data in chip.delta:
        assert off % 4096 == 0 and len(data) % 4096 == 0
        patched[off : off + len(data)] = data
    assert bytes(patched) == chip.image
    out, _ = mp_mount(tmp_path, chip.image)
    assert out["identity"] == json.loads(ident.to_json(compact=True))
    assert out["identity"]["id"] == "88.123.99/pump-000042"  # prefix normalised (already upper), suffix kept
    assert parse_identity(im.read_files(built.params, chip.image)[IDENTITY_PATH]) == ident
    # a longer identity (Wi-Fi credentials, both transports) still costs at most two blocks
    longer = Identity(
        ident.identifier,
        ident.key,
        ("coap://gw.factory.example:5683", "mqtt://gw.factory.example:1883"),
        "mqtt",
        ("factory-line-4", "correct horse battery staple"),
    )
    assert personalise(built.params, built.fs_image, longer).delta_blocks <= 2


def test_same_identity_gives_same_image(built: fb.Build) -> None:
    ident = Identity("88.123.99/PUMP-1", bytes(16), ("coap://10.0.0.1",))
    a = personalise(built.params, built.fs_image, ident)
    b = personalise(built.params, built.fs_image, ident)
    assert a.image == b.image  # re-flashing the same chip writes nothing new


def test_build_is_reproducible(built: fb.Build, tmp_path: Path) -> None:
    fw, _ = firmware_tree(tmp_path)
    m2 = fb.build(BOARD, tmp_path / "again", firmware_dir=fw)
    assert m2.fs_image["sha256"] == built.manifest.fs_image["sha256"]


def test_load_build_refuses_a_modified_image(built: fb.Build, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built.directory, copy)
    data = bytearray((copy / fb.FS_IMAGE).read_bytes())
    data[-1] ^= 1
    (copy / fb.FS_IMAGE).write_bytes(bytes(data))
    with pytest.raises(fb.BuildError, match="sha256"):
        fb.load_build(copy)
    with pytest.raises(fb.BuildError, match="built for board"):
        fb.load_build(built.directory, "esp32-c3-devkitm-1")


def test_cli_build_without_runtime(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.commands.flash import cli

    fw, _ = firmware_tree(tmp_path)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(
        ["build", "--board", "esp32-s3-devkitc-1", "--out", str(tmp_path / "s3"), "--firmware", str(fw)]
    )
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "runtime: none given" in out and "--runtime" in out
    m = fb.load_build(tmp_path / "s3").manifest
    assert m.fs_image["block_count"] == 1536 and m.fs_image["size"] == 6 << 20


# --- the firmware extracted from the image boots on the unix port -----------------------------------------------

FIRMWARE_MAIN = fb.FIRMWARE_DIR / "main.py"


@pytest.mark.skipif(not FIRMWARE_MAIN.exists(), reason="firmware/main.py has not landed yet: nothing to boot")
def test_extracted_firmware_boots_on_unix_port_with_provisioned_identity(
    built: fb.Build, tmp_path: Path
) -> None:
    """The files of a chip's image, extracted, run as the device on the unix port: it loads /identity.json,
    answers `id` on its console, and talks to the gateway address from the identity (a UDP socket standing
    in for the gateway's CoAP port, decoded with aiocoap) under its own identifier."""
    from aiocoap import Message

    gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gw.bind(("127.0.0.1", 0))
    gw.settimeout(15)
    ident = Identity("88.123.99/PUMP-000042", new_key(), (f"coap://127.0.0.1:{gw.getsockname()[1]}",), "coap")
    chip = personalise(built.params, built.fs_image, ident)
    root = tmp_path / "flash"
    proc = _run_chip(built, chip.image, root)
    assert not any(p.suffix == ".py" for p in (root / "carrier").rglob("*"))  # only the compiled .mpy run
    try:
        assert proc.stdin is not None and proc.stdout is not None
        datagram, _ = gw.recvfrom(2048)
        proc.stdin.write(b"id\n")
        proc.stdin.flush()
        lines = read_until(proc.stdout, b"id: ", timeout=20)
    finally:
        proc.kill()
        proc.wait()
        gw.close()
    text = b"".join(lines).decode()
    assert (
        f"app id={ident.identifier}" in text
    )  # the boot log names the identity it loaded from /identity.json
    assert f"id: {ident.identifier}" in text  # the console's `id` answers with it
    assert f"key: {ident.fingerprint}" in text  # the same key fingerprint the ledger records
    assert "board: esp32-devkitc" in text  # /board.json from the image
    path = Message.decode(datagram).opt.uri_path
    assert "/".join(path[1:3]) == ident.identifier, path  # /<resource>/<prefix>/<suffix>/...


def _run_chip(built: fb.Build, image: bytes, root: Path) -> subprocess.Popen[bytes]:
    """The files of a chip ``image`` written to ``root`` and its firmware started there under micropython (the
    unix board), console on pipes (stderr into stdout)."""
    for path, data in im.read_files(built.params, image).items():
        dest = root / path[1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return subprocess.Popen(
        [micropython_binary(), "main.py"],
        cwd=root,
        env=dict(os.environ, IDA_DATA=str(root), IDA_WDT_MS="0"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def read_until(stream: IO[bytes], marker: bytes, timeout: float, settle: float = 0.3) -> list[bytes]:
    """Lines from ``stream`` until one contains ``marker`` and ``settle`` seconds passed without more output
    (or the time is up). Reads the raw fd: select() does not see data already in a Python buffer."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    seen = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], settle)
        if not ready:
            if seen:
                break
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        seen = seen or marker in buf
    return buf.splitlines(keepends=True)


@pytest.mark.skipif(not FIRMWARE_MAIN.exists(), reason="firmware/main.py has not landed yet: nothing to boot")
def test_factory_image_device_reports_to_a_running_gateway(built: fb.Build, tmp_path: Path) -> None:
    """Issue 6's proof that the factory image works: the firmware extracted from a provisioned chip image
    (secure identity, as `ida flash` writes it) boots on the unix port and its first report, OSCORE-protected
    with the provisioned key, is stored by a running `ida gateway` (security = "oscore", same keystore)."""
    import urllib.error
    import urllib.request

    from tools.commands.flash.keystore import Keystore

    data = tmp_path / "gw"
    data.mkdir()
    ident_text = "88.123.99/PUMP-000043"
    key = new_key()
    Keystore.in_dir(data).put(ident_text, key)
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f'[coap]\nhost = "127.0.0.1"\nport = 0\nsecurity = "oscore"\n[http]\nhost = "127.0.0.1"\n'
        f'port = 0\n[data]\ndir = "{data}"\n[upstream]\nurls = ["hdl://127.0.0.1:9"]\n'
    )
    gw = subprocess.Popen(
        ida_command("gateway", "--config", str(conf)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    dev: subprocess.Popen[bytes] | None = None
    try:
        assert gw.stdout is not None
        lines = read_until(gw.stdout, b"http listening on", timeout=30)
        text = b"".join(lines).decode()
        coap = text.split("coap listening on ")[1].split()[0]
        http = text.split("http listening on ")[1].split()[0]

        ident = Identity(ident_text, key, (f"coap://{coap}",), "coap", secure=True)
        chip = personalise(built.params, built.fs_image, ident)
        dev = _run_chip(built, chip.image, tmp_path / "flash")
        url = f"http://{http}/api/devices/{ident_text}"
        deadline = time.monotonic() + 40
        record = None
        while record is None:
            assert time.monotonic() < deadline, "the factory-image device's report never reached the gateway"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    record = json.loads(r.read())
            except urllib.error.HTTPError as e:
                assert e.code == 404
                time.sleep(0.3)
    finally:
        if dev is not None:
            dev.kill()
            dev.wait()
        gw.terminate()
        gw.wait(10)
    assert record["id"] == ident_text and record["board"] == "esp32-devkitc", record
    assert record["transport"] == "coap"
