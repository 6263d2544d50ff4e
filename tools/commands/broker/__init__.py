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

Modules: ``credentials`` (passwords, hashes, usernames, ACL lines), ``tls`` (``TlsFiles``, ``make_certs``),
``generate`` (``generate``, ``mosquitto_conf``, the file names), ``files`` (atomic writes with a mode),
``errors`` (``BrokerConfigError``), ``cli`` (the command).
"""

from .cli import add_arguments, run
from .credentials import (
    DEVICE_PUBLISH,
    DEVICE_RECEIVE,
    GATEWAY_READ,
    GATEWAY_WRITE,
    HASH_ITERATIONS,
    PASSWORD_TAG,
    check_hash,
    device_acl,
    device_patterns,
    gateway_acl,
    mosquitto_hash,
    mqtt_password,
    outbox_acl_topic,
    username_problem,
)
from .errors import BrokerConfigError
from .generate import (
    ACL_FILE,
    ACL_MODES,
    CONF_FILE,
    DEFAULT_GATEWAY,
    PASSWD_ALL,
    PASSWD_DEVICES,
    PASSWD_GATEWAYS,
    Generated,
    gateway_secret,
    generate,
    mosquitto_conf,
)
from .tls import TlsFiles, make_certs

__all__ = [
    "ACL_FILE",
    "ACL_MODES",
    "CONF_FILE",
    "DEFAULT_GATEWAY",
    "DEVICE_PUBLISH",
    "DEVICE_RECEIVE",
    "GATEWAY_READ",
    "GATEWAY_WRITE",
    "HASH_ITERATIONS",
    "PASSWD_ALL",
    "PASSWD_DEVICES",
    "PASSWD_GATEWAYS",
    "PASSWORD_TAG",
    "BrokerConfigError",
    "Generated",
    "TlsFiles",
    "add_arguments",
    "check_hash",
    "device_acl",
    "device_patterns",
    "gateway_acl",
    "gateway_secret",
    "generate",
    "make_certs",
    "mosquitto_conf",
    "mosquitto_hash",
    "mqtt_password",
    "outbox_acl_topic",
    "run",
    "username_problem",
]
