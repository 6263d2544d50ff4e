"""The error the Handle codec raises about bytes it is given.

The codec reports what the bytes say (a message, its response code, its values, a referral's body) and
judges nothing else: whether a response code means "busy", "refused" or "referred" for a resolution is the
upstream layer's business (``gateway/upstream``). Bytes that do not parse -- truncated, oversized, lengths
that disagree, a version or a flag it cannot read -- raise :class:`HandleFormatError`, and nothing else does.
Encoding a value that does not fit a field (a negative index, a 70 KiB type) raises a plain ValueError: that
is the caller's mistake, not the peer's.
"""

from __future__ import annotations

__all__ = ["HandleFormatError"]


class HandleFormatError(ValueError):
    """Bytes that are not a well-formed Handle native-protocol message (or envelope, value, referral...).

    A ValueError too, so code that checks input can catch either."""
