# MQTT over TLS on the device, the parts without a broker (tests/integration/test_mqtt_security.py has the broker ones):
# mqtts:// identities, the CA file name and where it is looked up, PEM to DER, the TLS context (verification
# required), errors that close the connection instead of raising, and the INSECURE warning of plain mode.
import binascii
from mptest import eq, ok, raises
from fwfakes import FakeHal, tmpdir, rmtree
from carrier import identity, log, mqtt, mqttdevice, mqttmsg, tls

KEY = "00112233445566778899aabbccddeeff"


def _d(**kw):
    d = {"id": "88.123.99/PUMP-0001", "key": KEY, "transport": "mqtt", "mqtt": "mqtts://broker.plant"}
    d.update(kw)
    return d


def test_mqtts_identity():
    i = identity.parse(_d())
    eq(i.mqtt, ("broker.plant", 8883))
    ok(i.mqtt_tls)
    eq((i.ca_file, i.ca_path), (None, "ca.crt"))
    i = identity.parse(_d(mqtt="mqtts://10.0.0.2:18883", ca="site-ca.der"))
    eq((i.mqtt, i.ca_path), (("10.0.0.2", 18883), "site-ca.der"))
    eq(identity.to_dict(i)["ca"], "site-ca.der")
    i = identity.parse(_d(mqtt="mqtt://broker.plant"))
    ok(not i.mqtt_tls)
    eq(i.mqtt, ("broker.plant", 1883))
    ok("ca" not in identity.to_dict(i))
    raises(identity.IdentityError, identity.parse, _d(ca=""))
    raises(identity.IdentityError, identity.parse, _d(ca=5))
    raises(identity.IdentityError, identity.parse, _d(mqtt="mqtts://"))


def test_ca_path_under_the_data_root():
    root = tmpdir("tls")
    try:
        h = FakeHal(root)
        identity.save(h, identity.parse(_d()))
        eq(identity.load(h).ca_path, root + "ca.crt")
        identity.save(h, identity.parse(_d(ca="/flash/ca.der")))
        eq(identity.load(h).ca_path, "/flash/ca.der")
    finally:
        rmtree(root[:-1])


DER = bytes(range(40)) * 3
PEM = (
    b"-----BEGIN CERTIFICATE-----\r\n"
    + binascii.b2a_base64(DER[:60]).strip()
    + b"\r\n"
    + binascii.b2a_base64(DER[60:]).strip()
    + b"\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nAAAA\n"
)


def test_pem_to_der_takes_the_first_certificate():
    eq(tls.pem_to_der(PEM), DER)
    raises(mqttmsg.MQTTError, tls.pem_to_der, b"-----BEGIN CERTIFICATE-----\nAAAA")


def test_tls_context_requires_verification():
    import ssl

    e = raises(mqttmsg.MQTTError, tls.context, "/nonexistent/ca.crt")
    ok("no CA file" in str(e))
    root = tmpdir("tlsctx")
    try:
        with open(root + "bad.der", "wb") as f:
            f.write(b"\x30\x03\x02\x01\x00")  # DER, but not a certificate
        raises(ValueError, tls.context, root + "bad.der")
    finally:
        rmtree(root[:-1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    eq(ctx.verify_mode, ssl.CERT_NONE)  # why tls.context sets CERT_REQUIRED itself


def test_transport_tls_or_insecure_warning():
    lines = []
    old = log.sink
    log.sink = lines.append
    try:
        t = mqttdevice.Transport(identity.parse(_d(ca="/x/ca.der")))
        eq(t.client.ca_path, "/x/ca.der")
        eq(t.client.sni, "broker.plant")
        eq(lines, [])
        t = mqttdevice.Transport(identity.parse(_d(mqtt="mqtt://127.0.0.1:1884")))
        eq(t.client.ca_path, None)
        ok(len(lines) == 1 and "INSECURE plain mode" in lines[0] and "127.0.0.1:1884" in lines[0], lines)
        ok(KEY not in lines[0] and mqtt.password(bytes.fromhex(KEY)).decode() not in lines[0])
    finally:
        log.sink = old


def test_missing_ca_is_a_reconnect_not_a_crash():
    t = mqttdevice.Transport(identity.parse(_d(mqtt="mqtts://127.0.0.1:9", ca="/nonexistent/ca.crt")))
    t.start(0)
    t.poll(0)  # the session's first attempt: no CA file -> closed with a reason, backoff, no exception
    eq(t.client.state, mqtt.IDLE)
    ok(t.client.reason.startswith("tls no CA file"), t.client.reason)
    ok(t.session.attempts == 1)
