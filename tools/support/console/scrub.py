"""Keep secrets out of transcripts and reports.

The firmware never prints the device key (only an 8-hex-digit fingerprint), but a transcript is a file that
leaves the site, so anything that looks like a secret is removed anyway:

* a field named like a secret (``key``, ``psk``, ``password``, ``secret``, ``token``...) in JSON
  (``"key": "..."``, ``"key": {"hex": "..."}``), in ``key: value`` text lines and in ``key=value`` log fields,
  unless its value is a key *fingerprint* (exactly 8 hex digits);
* the key argument of ``provision <id> <url> <key-hex>``;
* any run of 32 or more hex digits (a 16-byte key or longer), wherever it appears.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REDACTED", "SECRET_NAMES", "is_fingerprint", "scrub", "scrub_obj"]

REDACTED = "<redacted>"
SECRET_NAMES = ("key", "psk", "password", "passwd", "secret", "token", "private_key", "wifi_psk")

_NAMES = "|".join(sorted(SECRET_NAMES, key=len, reverse=True))
_FINGERPRINT = re.compile(r"[0-9a-fA-F]{8}")
_JSON_OBJ = re.compile(rf'("(?:{_NAMES})"\s*:\s*)\{{[^{{}}]*\}}', re.IGNORECASE)
_JSON_STR = re.compile(rf'("(?:{_NAMES})"\s*:\s*)"((?:[^"\\]|\\.)*)"', re.IGNORECASE)
_TEXT = re.compile(rf"(?m)^(\s*(?:{_NAMES})\s*:[ \t]*)(\S.*?)\s*$", re.IGNORECASE)
_KV = re.compile(rf"(?<![\w-])((?:{_NAMES})=)([^\s\"',;]+)", re.IGNORECASE)
_PROVISION = re.compile(r"(?m)^(\s*(?:> )?provision\s+\S+\s+\S+\s+)(\S+)")
_LONG_HEX = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f]{32,}(?![0-9A-Za-z])")


def is_fingerprint(value: Any) -> bool:
    return isinstance(value, str) and _FINGERPRINT.fullmatch(value) is not None


def _keep_fingerprint(m: re.Match[str]) -> str:
    return (
        m.group(0)
        if is_fingerprint(m.group(2))
        else m.group(1) + (f'"{REDACTED}"' if m.group(0).rstrip().endswith('"') else REDACTED)
    )


def scrub(text: str) -> str:
    """``text`` with everything that looks like a secret replaced by ``<redacted>``."""
    text = _JSON_OBJ.sub(lambda m: m.group(1) + f'"{REDACTED}"', text)
    text = _JSON_STR.sub(_keep_fingerprint, text)
    text = _TEXT.sub(_keep_fingerprint, text)
    text = _KV.sub(_keep_fingerprint, text)
    text = _PROVISION.sub(lambda m: m.group(1) + REDACTED, text)
    return _LONG_HEX.sub(REDACTED, text)


def scrub_obj(obj: Any) -> Any:
    """A copy of a JSON-like value with secret-named fields (other than fingerprints) and long hex redacted."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            secret = str(k).lower() in SECRET_NAMES
            out[k] = v if not secret or v is None or is_fingerprint(v) else REDACTED
            if out[k] is v:
                out[k] = scrub_obj(v)
        return out
    if isinstance(obj, list | tuple):
        return [scrub_obj(x) for x in obj]
    if isinstance(obj, str):
        return scrub(obj)
    return obj
