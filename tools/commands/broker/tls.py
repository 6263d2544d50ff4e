"""The broker's TLS material: :class:`TlsFiles` (checked: the certificate chains to the CA and matches its key)
and :func:`make_certs`, a small private CA and a server certificate (P-256 ECDSA, ``cryptography``) for a site
without a PKI and for tests."""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BrokerConfigError
from .files import write_file

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

__all__ = ["TlsFiles", "make_certs"]


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    def check(self) -> None:
        """The server certificate chains to the CA and matches the key (a broken chain would otherwise only
        show as every device failing its handshake)."""
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization

        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
            ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
            key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        except OSError as e:
            raise BrokerConfigError(f"cannot read TLS file: {e}") from None
        except ValueError as e:
            raise BrokerConfigError(
                f"TLS files must be PEM (certificate, CA, unencrypted key): {e}"
            ) from None
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise BrokerConfigError(
                f"{self.cert} is not issued by {self.ca}: {e or 'bad signature'}"
            ) from None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
            serialization.Encoding.DER, pub
        ):
            raise BrokerConfigError(f"{self.key} is not the key of {self.cert}")


def make_certs(out: Path, hosts: Sequence[str], days: int = 825) -> TlsFiles:
    """A private CA (``ca.crt``, ``ca.key``) and a server certificate for ``hosts`` (DNS names or IP addresses,
    in the subjectAltName) signed by it (``server.crt``, ``server.key``). Keys are written 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise BrokerConfigError("give at least one --host (the name or address devices connect to)")
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ida broker CA")])
    usage = _key_usage("digital_signature", "key_cert_sign", "crl_sign")  # a CA's key signs, nothing else
    ca = _signed(
        ca_name,
        ca_key.public_key(),
        ca_name,
        ca_key,
        max(days, 3650),
        [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True)],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _signed(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
        key.public_key(),
        ca_name,
        ca_key,
        days,
        [
            (x509.SubjectAlternativeName(sans), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    files = TlsFiles(out / "server.crt", out / "server.key", out / "ca.crt")
    write_file(out / "ca.key", ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    write_file(files.key, key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    write_file(files.ca, ca.public_bytes(pem), 0o644)
    write_file(files.cert, cert.public_bytes(pem), 0o644)
    return files


def _signed(
    subject: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate for ``subject``'s ``public_key``, signed by ``issuer_key`` (SHA-256), valid from five minutes
    ago (clock skew) for ``days`` days, with ``extensions`` (each with whether it is critical)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = _dt.datetime.now(_dt.UTC)
    builder = x509.CertificateBuilder(
        issuer_name=issuer,
        subject_name=subject,
        public_key=public_key,
        serial_number=x509.random_serial_number(),
        not_valid_before=now - _dt.timedelta(minutes=5),
        not_valid_after=now + _dt.timedelta(days=days),
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A KeyUsage extension that allows ``allowed`` (its argument names: ``key_cert_sign``...) and nothing else."""
    import inspect

    from cryptography import x509

    return x509.KeyUsage(**{name: name in allowed for name in inspect.signature(x509.KeyUsage).parameters})
