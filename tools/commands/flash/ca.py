"""The broker's CA certificate for devices that talk MQTT over TLS (``mqtts://``).

``ida flash build --ca FILE`` puts it into the batch filesystem image as ``/ca.crt`` (so per chip only the
identity file differs) and the identity names it: ``"ca": "ca.crt"`` (``firmware/carrier/identity.py``; the
firmware loads it with ``load_verify_locations(cadata=DER)``, ``firmware/carrier/tls.py``).

The file may be PEM or DER; it is stored as DER (what mbedTLS takes, and a third smaller than PEM). The device
trusts exactly one CA, so a PEM file with several certificates is refused rather than cut to its first one.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CaError
from .identity import CA_PATH

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class CaCert:
    der: bytes
    subject: str
    not_after: str  # ISO 8601 UTC
    sha256: str  # of the DER

    def manifest(self, source: str) -> dict[str, str | int]:
        """The build manifest's ``ca`` entry."""
        return {
            "file": CA_PATH,
            "source": source,
            "size": len(self.der),
            "sha256": self.sha256,
            "subject": self.subject,
            "not_after": self.not_after,
        }


def to_der(data: bytes, name: str = "<ca>") -> bytes:
    """PEM (exactly one certificate) or DER -> DER."""
    if b"-----BEGIN" in data:
        blocks = _PEM.findall(data)
        if len(blocks) != 1:
            raise CaError(f"{name}: holds {len(blocks)} PEM certificates; the device trusts exactly one CA")
        try:
            return base64.b64decode(re.sub(rb"\s+", b"", blocks[0]), validate=True)
        except (binascii.Error, ValueError):
            raise CaError(f"{name}: the PEM certificate is not valid base64") from None
    return data


def load_ca(path: str | os.PathLike[str], now: _dt.datetime | None = None) -> CaCert:
    """Read and check a CA certificate: an X.509 certificate, not marked ``CA:FALSE``, not expired."""
    from cryptography import x509

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CaError(f"cannot read the CA file {p}: {e.strerror}") from None
    der = to_der(raw, str(p))
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise CaError(f"{p}: not an X.509 certificate in PEM or DER ({e})") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as e:  # a malformed extension
        raise CaError(f"{p}: the certificate's extensions cannot be parsed ({e})") from None
    if bc is not None and not bc.ca:
        raise CaError(
            f"{p}: {cert.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA:FALSE)"
        )
    not_after = cert.not_valid_after_utc
    if not_after <= (now or _dt.datetime.now(_dt.UTC)):
        raise CaError(
            f"{p}: the CA certificate expired on {not_after:%Y-%m-%d}; devices would refuse the broker"
        )
    return CaCert(
        der,
        cert.subject.rfc4514_string(),
        not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        hashlib.sha256(der).hexdigest(),
    )
