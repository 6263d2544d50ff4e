"""The error of ``ida broker``: a configuration that cannot be generated."""

from __future__ import annotations

__all__ = ["BrokerConfigError"]


class BrokerConfigError(ValueError):
    """A configuration that cannot be generated (message says why)."""
