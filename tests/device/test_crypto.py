# carrier.crypto against the published vectors: RFC 4231 (HMAC-SHA256, all 7 cases), RFC 5869 (HKDF-SHA256,
# cases 1-3), RFC 3610 (AES-CCM packet vectors 1-4: M = 8, L = 2, exactly AES-CCM-16-64-128), plus tamper and
# in-place checks and the heap cost of one encryption.
import gc
from mptest import eq, ok, note
from carrier import crypto


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


def test_rfc4231_hmac_sha256():
    cases = (
        (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        (
            b"Jefe",
            b"what do ya want for nothing?",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
        (
            bytes(range(1, 26)),
            b"\xcd" * 50,
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
        ),
        (b"\x0c" * 20, b"Test With Truncation", "a3b6167473100ee06e0c796c2955552b"),  # truncated to 128 bits
        (
            b"\xaa" * 131,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        ),
        (
            b"\xaa" * 131,
            b"This is a test using a larger than block-size key and a larger than block-size data. "
            b"The key needs to be hashed before being used by the HMAC algorithm.",
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        ),
    )
    for i, (key, data, want) in enumerate(cases):
        mac = crypto.hmac_sha256(key, data)
        eq(mac[: len(want) // 2], h(want), "RFC 4231 case %d" % (i + 1))
    # parts are concatenated
    eq(crypto.hmac_sha256(b"Jefe", b"what do ya ", b"want for nothing?"), h(cases[1][2]))


def test_rfc5869_hkdf_sha256():
    eq(
        crypto.hkdf(bytes(range(13)), b"\x0b" * 22, bytes(range(0xF0, 0xFA)), 42),
        h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
        "case 1",
    )
    eq(
        crypto.hkdf(bytes(range(0x60, 0xB0)), bytes(range(0x50)), bytes(range(0xB0, 0x100)), 82),
        h(
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09da3275600c2f"
            "09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"
        ),
        "case 2",
    )
    eq(
        crypto.hkdf(b"", b"\x0b" * 22, b"", 42),
        h("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
        "case 3",
    )


KEY = bytes(range(0xC0, 0xD0))
# RFC 3610 section 8, packet vectors 1-4: (nonce, header (= AAD) length, payload end, encrypted output)
CCM_VECTORS = (
    ("00000003020100A0A1A2A3A4A5", 8, 0x1F, "588C979A61C663D2F066D0C2C0F989806D5F6B61DAC38417E8D12CFDF926E0"),
    (
        "00000004030201A0A1A2A3A4A5",
        8,
        0x20,
        "72C91A36E135F8CF291CA894085C87E3CC15C439C9E43A3BA091D56E10400916",
    ),
    (
        "00000005040302A0A1A2A3A4A5",
        8,
        0x21,
        "51B1E5F44A197D1DA46B0F8E2D282AE871E838BB64DA8596574ADAA76FBD9FB0C5",
    ),
    ("00000006050403A0A1A2A3A4A5", 12, 0x1F, "A28C6865939A9A79FAAA5C4C2A9D4A91CDAC8C96C861B9C9E61EF1"),
)


def test_rfc3610_ccm_packet_vectors():
    c = crypto.CCM(KEY)
    for i, (nonce, alen, end, want) in enumerate(CCM_VECTORS):
        nonce = h(nonce)
        aad = bytes(range(alen))
        pt = bytes(range(alen, end))
        out = bytearray(len(pt) + crypto.TAG)
        n = c.encrypt(nonce, aad, pt, len(pt), out)
        eq(bytes(out[:n]), h(want), "RFC 3610 packet vector %d" % (i + 1))
        back = bytearray(len(pt))
        eq(c.decrypt(nonce, aad, out, n, back), len(pt))
        eq(bytes(back), pt)


def test_ccm_in_place_and_tamper_detection():
    c = crypto.CCM(KEY)
    nonce, alen, end, want = CCM_VECTORS[0]
    nonce = h(nonce)
    aad = bytes(range(alen))
    buf = bytearray(64)
    pt = bytes(range(alen, end))
    buf[: len(pt)] = pt
    n = c.encrypt(nonce, aad, buf, len(pt), buf)
    eq(bytes(buf[:n]), h(want))
    good = bytes(buf[:n])
    # every single-bit flip in ciphertext or tag is rejected, as is a changed AAD or nonce
    for i in range(n):
        b = bytearray(good)
        b[i] ^= 1
        eq(c.decrypt(nonce, aad, b, n, bytearray(n)), -1, "flip at %d" % i)
    eq(c.decrypt(nonce, aad[:-1] + b"\xff", good, n, bytearray(n)), -1, "aad")
    eq(c.decrypt(nonce[:-1] + b"\x00", aad, good, n, bytearray(n)), -1, "nonce")
    eq(c.decrypt(nonce, aad, good, 7, bytearray(8)), -1, "shorter than a tag")
    mv = memoryview(buf)
    eq(c.decrypt(nonce, aad, mv, n, mv), len(pt))  # in place
    eq(bytes(buf[: len(pt)]), pt)
    # empty plaintext: the tag alone authenticates the AAD
    t = bytearray(8)
    eq(c.encrypt(nonce, aad, b"", 0, t), 8)
    eq(c.decrypt(nonce, aad, t, 8, bytearray(0)), 0)


def test_ccm_heap_per_message():
    c = crypto.CCM(KEY)
    nonce = h(CCM_VECTORS[0][0])
    aad = bytes(20)
    buf = bytearray(200)
    c.encrypt(nonce, aad, buf, 100, buf)  # warm up
    gc.collect()
    before = gc.mem_alloc()
    c.encrypt(nonce, aad, buf, 100, buf)
    n = c.decrypt(nonce, aad, buf, 108, buf)
    used = gc.mem_alloc() - before
    eq(n, 100)
    note("AES-CCM encrypt+decrypt of 100 bytes allocated", used, "bytes of heap")
    ok(used <= 256, "CCM should not allocate per message (%d)" % used)
