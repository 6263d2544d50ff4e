"""What a device or a gateway may do on the broker: MQTT passwords derived from the device keys, Mosquitto's
``$7$`` password hashes, usernames fit for its files, and the ACL lines (each device its own subtree, each leaf
in one direction; gateways every device)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from proto import devicemsg

__all__ = [
    "DEVICE_PUBLISH",
    "DEVICE_RECEIVE",
    "GATEWAY_READ",
    "GATEWAY_WRITE",
    "HASH_ITERATIONS",
    "PASSWORD_TAG",
    "check_hash",
    "device_acl",
    "device_patterns",
    "gateway_acl",
    "mosquitto_hash",
    "mqtt_password",
    "outbox_acl_topic",
    "username_problem",
]

PASSWORD_TAG = b"ida/mqtt/password/v1"  # firmware/carrier/mqtt.py password() uses the same
HASH_ITERATIONS = 101  # mosquitto_passwd's default for $7$ (PBKDF2-SHA512)
DEVICE_PUBLISH = ("status", "req", "rpt", "cfgack")
DEVICE_RECEIVE = ("res", "ack", "cfg")
GATEWAY_READ = ("req", "rpt", "cfgack", "status")
GATEWAY_WRITE = ("res", "ack", "cfg")


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
