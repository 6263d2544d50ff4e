# TLS for the MQTT connection (mqtts://, docs/security-mqtt.md): a client context that accepts only a broker
# certificate chaining to the identity's CA file. mqtt.py imports it only when the identity asks for TLS, so a
# plain-TCP or CoAP device never loads it.
import ssl
import binascii

from carrier.mqttmsg import MQTTError


def pem_to_der(data):
    """The first certificate of a PEM file as DER (MicroPython's mbedTLS may lack the PEM parser)."""
    a = data.find(b"\n", data.find(b"-----BEGIN"))
    b = data.find(b"-----END", a)
    if a < 0 or b < 0:
        raise MQTTError("CA file is neither PEM nor DER")
    return binascii.a2b_base64(data[a + 1:b].replace(b"\r", b"").replace(b"\n", b""))


def context(ca_path):
    """A TLS client context that accepts only a broker certificate chaining to the CA in ca_path."""
    try:
        with open(ca_path, "rb") as f:
            data = f.read()
    except OSError:
        raise MQTTError("no CA file " + ca_path)
    if data.startswith(b"-----BEGIN"):
        data = pem_to_der(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # MicroPython's client default is CERT_NONE; verify_mode is a property of ssl.py (missing from the stubs)
    ctx.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]
    ctx.load_verify_locations(cadata=data)
    return ctx
