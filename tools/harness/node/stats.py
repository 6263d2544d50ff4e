"""The counters of one simulated node (:attr:`NodeServer.stats`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NodeStats"]


@dataclass
class NodeStats:
    """Requests per protocol (``udp``, ``tcp``, ``http``; a UDP request counts once however many datagrams it
    took), answers per response code (native RC or REST ``responseCode``), dropped requests per reason
    (``silent``, ``failure``, ``malformed``), UDP answers sent truncated, and datagrams sent."""

    requests: Counter[str] = field(default_factory=Counter)
    answers: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    datagrams_sent: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "answers": {str(k): v for k, v in sorted(self.answers.items())},
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "datagrams_sent": self.datagrams_sent,
        }

    def summary(self) -> str:
        """One line: ``requests udp=3 tcp=1 http=2; answers 1=5 100=1; dropped -; truncated 0``."""

        def pairs(c: Counter[Any]) -> str:
            return " ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv_: str(kv_[0]))) or "-"

        return (
            f"requests {pairs(self.requests)}; answers {pairs(self.answers)}; "
            f"dropped {pairs(self.dropped)}; truncated {self.truncated}"
        )
