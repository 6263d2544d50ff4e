"""Fault knobs of the simulated node: added latency, failures, busy answers, truncation, silence.

One :class:`Knobs` object per node, read at every request, so tests and the CLI can change it while the
node runs (``node.knobs.busy_rate = 1.0``). Each request rolls one number: below ``failure_rate`` it
fails, below ``failure_rate + busy_rate`` it is answered "busy", else it is answered normally.

======================  ======================================  =========================================
knob                    Handle native (UDP / TCP)               REST (HTTP)
======================  ======================================  =========================================
latency, jitter         answer delayed by latency +- jitter     same
failure (error)         RC_ERROR (2) "simulated failure"        HTTP 500, responseCode 2
failure (drop)          UDP: no answer; TCP: connection closed  connection closed without a response
busy                    RC_SERVER_BUSY (3)                      HTTP 503, responseCode 3
truncate                UDP: one datagram with TC set, no body  (no effect)
silent                  nothing answered (TCP: held open)       request held open, never answered
======================  ======================================  =========================================
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Literal

__all__ = ["DropConnection", "Fault", "FailureMode", "Knobs"]

FailureMode = Literal["error", "drop", "mixed"]
FAILURE_MODES: tuple[FailureMode, ...] = ("error", "drop", "mixed")


class DropConnection(Exception):
    """Raised to a REST handler: close the connection without sending a response."""


class Fault(enum.Enum):
    """What the dice decided for one request."""

    NONE = "none"
    ERROR = "error"
    DROP = "drop"
    BUSY = "busy"


@dataclass
class Knobs:
    """``latency`` and ``jitter`` in seconds (delay = latency + uniform(-jitter, +jitter), at least 0);
    rates are probabilities in [0, 1] with ``failure_rate + busy_rate <= 1``; ``failure_mode`` says what a
    failure is: an RC_ERROR answer, a dropped request, or either with equal odds (``mixed``)."""

    latency: float = 0.0
    jitter: float = 0.0
    failure_rate: float = 0.0
    failure_mode: FailureMode = "mixed"
    busy_rate: float = 0.0
    truncate: bool = False
    silent: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the knob that is out of range."""
        if self.latency < 0 or self.jitter < 0:
            raise ValueError("latency and jitter must not be negative")
        for name in ("failure_rate", "busy_rate"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name.replace('_', ' ')} must be between 0 and 1, got {p}")
        if self.failure_rate + self.busy_rate > 1.0:
            raise ValueError("failure rate + busy rate must not exceed 1")
        if self.failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure mode must be one of {', '.join(FAILURE_MODES)}")

    def delay(self, rng: random.Random) -> float:
        """Seconds to wait before answering one request."""
        if not self.jitter:
            return self.latency
        return max(0.0, self.latency + rng.uniform(-self.jitter, self.jitter))

    def fault(self, rng: random.Random) -> Fault:
        """The fate of one request."""
        if not self.failure_rate and not self.busy_rate:
            return Fault.NONE
        r = rng.random()
        if r < self.failure_rate:
            if self.failure_mode == "mixed":
                return Fault.ERROR if rng.random() < 0.5 else Fault.DROP
            return Fault.ERROR if self.failure_mode == "error" else Fault.DROP
        if r < self.failure_rate + self.busy_rate:
            return Fault.BUSY
        return Fault.NONE
