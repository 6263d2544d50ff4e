"""``ida broker``: Mosquitto configuration for the provisioned devices (docs/security-mqtt.md).

    ida broker config --data-dir DIR --out DIR --tls-cert server.crt --tls-key server.key --ca ca.crt
                      [--port 8883] [--bind 0.0.0.0] [--service-port 8884] [--service-bind 127.0.0.1]
                      [--broker-host NAME] [--plain-port 1883] [--gateway ida-gw ...]
                      [--outbox-topic 'ida/v1/north/{key}/report'] [--acl explicit|pattern]
    ida broker certs --out DIR --host broker.plant.example --host 192.168.4.1 [--days 825]

``config`` reads the keystore that ``ida flash`` fills (``<data dir>/keystore.json``) and writes into ``--out``:

| file | what |
|---|---|
| ``passwd-devices`` | Mosquitto password file: username = the device's topic key (``devicemsg.topic_key``), password = :func:`mqtt_password` of its key, stored as Mosquitto's PBKDF2-SHA512 ``$7$`` hash |
| ``passwd-gateways`` | the gateway users (random passwords, kept in ``gateway-<name>.secret`` and reused on the next run) |
| ``passwd`` | both, for the plain bench listener (only with ``--plain-port``) |
| ``acl`` | each device may publish only ``status req rpt cfgack`` and receive only ``res ack cfg`` of its own subtree; a gateway reads ``req rpt cfgack status`` and writes ``res ack cfg`` of every device (and the outbox topic) |
| ``mosquitto.conf`` | ``per_listener_settings true``; device TLS listener (client id forced to the username, so no device can take over another's session), gateway TLS listener, and with ``--plain-port`` a plain loopback listener marked INSECURE, for the factory bench |
| ``gateway-<name>.toml`` | the ``[mqtt]`` section for that gateway (``mqtts://`` URL, username, password file, CA) |

Passwords and hashes are written 0600; no key, password or hash is ever printed. Running it again after more
devices were flashed rewrites the files (gateway passwords are kept); Mosquitto reloads them on SIGHUP.

``certs`` makes a small private CA and a server certificate for the broker (P-256 ECDSA, ``cryptography``), for a
site without a PKI and for tests.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proto import devicemsg
from tools.errors import CliError

PASSWORD_TAG = b"ida/mqtt/password/v1"  # firmware/carrier/mqtt.py password() uses the same
HASH_ITERATIONS = 101  # mosquitto_passwd's default for $7$ (PBKDF2-SHA512)
DEVICE_PUBLISH = ("status", "req", "rpt", "cfgack")
DEVICE_RECEIVE = ("res", "ack", "cfg")
GATEWAY_READ = ("req", "rpt", "cfgack", "status")
GATEWAY_WRITE = ("res", "ack", "cfg")
DEFAULT_GATEWAY = "ida-gw"
ACL_MODES = ("explicit", "pattern")
_GATEWAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

PASSWD_DEVICES = "passwd-devices"
PASSWD_GATEWAYS = "passwd-gateways"
PASSWD_ALL = "passwd"
ACL_FILE = "acl"
CONF_FILE = "mosquitto.conf"


class BrokerConfigError(ValueError):
    """A configuration that cannot be generated (message says why)."""


# -- credentials ----------------------------------------------------------------------------------------------
def mqtt_password(key: bytes) -> str:
    """A device's MQTT password: derived from its key, never the key (the firmware's ``mqtt.password``)."""
    return hashlib.sha256(PASSWORD_TAG + key).digest()[:16].hex()


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = HASH_ITERATIONS) -> str:
    """Mosquitto's password-file hash ``$7$<iterations>$<salt b64>$<PBKDF2-HMAC-SHA512 b64>`` (Mosquitto >= 2.0)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_hash(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (what Mosquitto checks at CONNECT)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(parts[3]), int(parts[2]))
    return hmac.compare_digest(digest, base64.b64decode(parts[4]))


def username_problem(username: str) -> str | None:
    """Why a username cannot go into Mosquitto's password/ACL files, or None."""
    if not username:
        return "empty"
    if ":" in username:
        return "contains ':' (the password file's separator)"
    if username != username.strip() or any(c in username for c in "\r\n\0"):
        return "leading/trailing white space or a line break"
    return None


# -- ACL ------------------------------------------------------------------------------------------------------
def device_acl(username: str) -> list[str]:
    """The explicit ACL block of one device: its own subtree, each leaf in one direction only."""
    base = f"{devicemsg.TOPIC_ROOT}/{username}"
    return (
        [f"user {username}"]
        + [f"topic write {base}/{leaf}" for leaf in DEVICE_PUBLISH]
        + [f"topic read {base}/{leaf}" for leaf in DEVICE_RECEIVE]
    )


def device_patterns() -> list[str]:
    """The same rules as one ``pattern`` block (``%u`` = the username = the topic key)."""
    base = f"{devicemsg.TOPIC_ROOT}/%u"
    return [f"pattern write {base}/{leaf}" for leaf in DEVICE_PUBLISH] + [
        f"pattern read {base}/{leaf}" for leaf in DEVICE_RECEIVE
    ]


def gateway_acl(username: str, outbox_topics: Sequence[str] = ()) -> list[str]:
    """A gateway: reads what devices send, writes what they receive, for every device (``+``); shared
    subscriptions (``$share/<group>/…``) are checked by Mosquitto against the topic without the prefix."""
    lines = [f"user {username}"]
    lines += [f"topic read {devicemsg.TOPIC_ROOT}/+/{leaf}" for leaf in GATEWAY_READ]
    lines += [f"topic write {devicemsg.TOPIC_ROOT}/+/{leaf}" for leaf in GATEWAY_WRITE]
    lines += [f"topic write {outbox_acl_topic(t)}" for t in outbox_topics]
    return lines


def outbox_acl_topic(topic: str) -> str:
    """The ACL topic of an ``[outbox] mqtt_topic``: its ``{key}`` placeholder becomes ``+``."""
    return topic.replace("{key}", "+")


# -- TLS material -------------------------------------------------------------------------------------------
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
    from cryptography.hazmat.primitives import hashes, serialization
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
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ida broker CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=max(days, 3650)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    files = TlsFiles(out / "server.crt", out / "server.key", out / "ca.crt")
    _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    _write(files.key, key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    _write(files.ca, ca.public_bytes(pem), 0o644)
    _write(files.cert, cert.public_bytes(pem), 0o644)
    return files


# -- generation ---------------------------------------------------------------------------------------------
@dataclass
class Generated:
    out: Path
    devices: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (identifier, why)
    gateways: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def gateway_secret(out: Path, name: str) -> Path:
    return out / f"gateway-{name}.secret"


def _gateway_password(out: Path, name: str) -> str:
    path = gateway_secret(out, name)
    try:
        pw = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32,128}", pw):
            return pw
    except FileNotFoundError:
        pass
    pw = secrets.token_hex(24)
    _write(path, (pw + "\n").encode(), 0o600)
    return pw


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic: a 0600/0644 temp file, fsynced, renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _lines(lines: Iterable[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def generate(
    data_dir: Path,
    out: Path,
    *,
    tls: TlsFiles | None,
    port: int = 8883,
    bind: str = "0.0.0.0",
    service_port: int = 8884,
    service_bind: str = "127.0.0.1",
    broker_host: str = "localhost",
    plain_port: int | None = None,
    gateways: Sequence[str] = (DEFAULT_GATEWAY,),
    outbox_topics: Sequence[str] = (),
    acl_mode: str = "explicit",
    keystore: Path | None = None,
) -> Generated:
    """Write the password files, the ACL, mosquitto.conf and each gateway's TOML snippet into ``out``."""
    from tools.commands.flash.keystore import Keystore

    if tls is None and plain_port is None:
        raise BrokerConfigError("give --tls-cert, --tls-key and --ca (or --plain-port for a factory bench)")
    if acl_mode not in ACL_MODES:
        raise BrokerConfigError(f"--acl must be one of {', '.join(ACL_MODES)}")
    for name in gateways:
        if not _GATEWAY_NAME.fullmatch(name):
            raise BrokerConfigError(
                f"gateway name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)"
            )
    if len(set(gateways)) != len(gateways):
        raise BrokerConfigError("gateway names must differ")
    if tls is not None:
        tls.check()
    store = Keystore(keystore) if keystore else Keystore.in_dir(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = Generated(out=out, gateways=list(gateways))

    device_lines: list[str] = []
    acl: list[str] = [
        f"# generated by `ida broker config` from {store.path}; run it again instead of editing",
        f"# devices: publish {' '.join(DEVICE_PUBLISH)}, receive {' '.join(DEVICE_RECEIVE)}, own subtree only",
    ]
    if acl_mode == "pattern":
        acl += device_patterns()
    for ident in store.identifiers():
        key = store.get(ident)
        username = devicemsg.topic_key(ident)
        why = username_problem(username)
        if key is None or why:
            res.skipped.append((ident, why or "no key"))
            continue
        device_lines.append(f"{username}:{mosquitto_hash(mqtt_password(key))}")
        if acl_mode == "explicit":
            acl += device_acl(username)
        res.devices += 1
    gateway_lines = []
    for name in gateways:
        gateway_lines.append(f"{name}:{mosquitto_hash(_gateway_password(out, name))}")
        acl += gateway_acl(name, outbox_topics)

    _write(out / PASSWD_DEVICES, _lines(device_lines), 0o600)
    _write(out / PASSWD_GATEWAYS, _lines(gateway_lines), 0o600)
    _write(out / ACL_FILE, _lines(acl), 0o644)
    res.files += [out / PASSWD_DEVICES, out / PASSWD_GATEWAYS, out / ACL_FILE]
    if plain_port is not None:
        _write(out / PASSWD_ALL, _lines(device_lines + gateway_lines), 0o600)
        res.files.append(out / PASSWD_ALL)
    _write(
        out / CONF_FILE,
        mosquitto_conf(out, tls, port, bind, service_port, service_bind, plain_port, res.devices).encode(),
        0o644,
    )
    res.files.append(out / CONF_FILE)
    for name in gateways:
        path = out / f"gateway-{name}.toml"
        if tls is not None:
            url = f"mqtts://{broker_host}:{service_port}"
        else:
            url = f"mqtt://127.0.0.1:{plain_port}"
        toml = [
            f"# [mqtt] of gateway {name!r} (generated by `ida broker config`)",
            "[mqtt]",
            f'url = "{url}"',
            f'username = "{name}"',
            f'password_file = "{gateway_secret(out, name).resolve()}"',
        ]
        if tls is not None:
            toml.append(f'ca_file = "{tls.ca.resolve()}"')
        _write(path, _lines(toml), 0o644)
        res.files.append(path)
    return res


def mosquitto_conf(
    out: Path,
    tls: TlsFiles | None,
    port: int,
    bind: str,
    service_port: int,
    service_bind: str,
    plain_port: int | None,
    devices: int,
) -> str:
    o = out.resolve()
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        f"# generated by `ida broker config` at {now} for {devices} devices; run it again instead of editing.",
        "# Use as the broker's config (mosquitto -c) or merge: per_listener_settings is global.",
        "per_listener_settings true",
    ]

    def security(passwd: str) -> list[str]:
        return ["allow_anonymous false", f"password_file {o / passwd}", f"acl_file {o / ACL_FILE}"]

    def tls_lines() -> list[str]:
        assert tls is not None
        return [
            f"certfile {tls.cert.resolve()}",
            f"keyfile {tls.key.resolve()}",
            f"cafile {tls.ca.resolve()}",
            "tls_version tlsv1.2",
        ]

    if tls is not None:
        lines += [
            "",
            "# devices: TLS, username/password, client id forced to the username (no session takeover)",
            f"listener {port} {bind}",
            "protocol mqtt",
            *security(PASSWD_DEVICES),
            "use_username_as_clientid true",
            *tls_lines(),
        ]
        lines += [
            "",
            "# gateways: TLS, their own users (keep this listener on the gateways' network)",
            f"listener {service_port} {service_bind}",
            "protocol mqtt",
            *security(PASSWD_GATEWAYS),
            *tls_lines(),
        ]
    if plain_port is not None:
        lines += [
            "",
            "# INSECURE plain mode: no TLS, passwords and traffic in clear. FACTORY BENCH ONLY, loopback.",
            f"listener {plain_port} 127.0.0.1",
            "protocol mqtt",
            *security(PASSWD_ALL),
        ]
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)
    c = sub.add_parser("config", help="password file, ACL and mosquitto.conf for the devices in the keystore")
    c.add_argument("--data-dir", help="where keystore.json is (default $IDA_DATA or ./data)")
    c.add_argument("--keystore", type=Path, help="keystore file (default <data dir>/keystore.json)")
    c.add_argument("--out", type=Path, required=True, help="directory for the generated files")
    c.add_argument("--tls-cert", type=Path, help="broker certificate (PEM)")
    c.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    c.add_argument("--ca", type=Path, help="CA that issued it (PEM); devices and gateways verify against it")
    c.add_argument("--port", type=int, default=8883, help="device TLS listener port (default 8883)")
    c.add_argument("--bind", default="0.0.0.0", help="device listener address (default 0.0.0.0)")
    c.add_argument("--service-port", type=int, default=8884, help="gateway TLS listener port (default 8884)")
    c.add_argument("--service-bind", default="127.0.0.1", help="gateway listener address (default 127.0.0.1)")
    c.add_argument(
        "--broker-host",
        default="localhost",
        help="name of the broker in its certificate, for the gateway's URL (default localhost)",
    )
    c.add_argument(
        "--plain-port", type=int, help="also a plain loopback listener: INSECURE, factory bench only"
    )
    c.add_argument(
        "--gateway",
        action="append",
        metavar="NAME",
        help=f"gateway user (repeatable; default {DEFAULT_GATEWAY})",
    )
    c.add_argument(
        "--outbox-topic",
        action="append",
        default=[],
        metavar="TOPIC",
        help="[outbox] mqtt_topic the gateways may publish to ({key} allowed)",
    )
    c.add_argument(
        "--acl",
        choices=ACL_MODES,
        default="explicit",
        help="explicit per-device entries (default) or one %%u pattern block (large fleets)",
    )
    k = sub.add_parser("certs", help="a private CA and a server certificate for the broker")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--host", action="append", required=True, help="DNS name or IP of the broker (repeatable)")
    k.add_argument("--days", type=int, default=825, help="server certificate lifetime (default 825)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.broker_command == "certs":
            files = make_certs(args.out, args.host, args.days)
            print(f"CA {files.ca}, server certificate {files.cert} for {', '.join(args.host)}; keys 0600")
            return 0
        tls_args = (args.tls_cert, args.tls_key, args.ca)
        if any(tls_args) and not all(tls_args):
            raise BrokerConfigError("--tls-cert, --tls-key and --ca go together")
        tls = TlsFiles(*tls_args) if all(tls_args) else None
        data = Path(args.data_dir or os.environ.get("IDA_DATA") or "data")
        res = generate(
            data,
            args.out,
            tls=tls,
            port=args.port,
            bind=args.bind,
            service_port=args.service_port,
            service_bind=args.service_bind,
            broker_host=args.broker_host,
            plain_port=args.plain_port,
            gateways=args.gateway or (DEFAULT_GATEWAY,),
            outbox_topics=args.outbox_topic,
            acl_mode=args.acl,
            keystore=args.keystore,
        )
    except BrokerConfigError as e:
        raise CliError(str(e)) from None
    print(f"{res.devices} devices, gateways {', '.join(res.gateways)} -> {res.out}")
    for path in res.files:
        print(f"  {path}")
    for ident, why in res.skipped:
        print(f"  skipped {ident}: {why}")
    if tls is None:
        print("  WARNING: no TLS listener: INSECURE plain mode, factory bench only")
    return 0
