"""What a ``with`` block does to the objects of the tools, written once.

* :class:`Closable` -- ``with obj:`` hands over the object and closes it at the end (a console, a ledger file,
  a process and its pipes): the subclass writes only :meth:`~Closable.close`.
* :class:`Startable` -- ``with obj:`` starts it and stops it at the end (a server of a benchmark run): the
  subclass writes :meth:`~Startable.start` (returning the object) and :meth:`~Startable.stop`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self

__all__ = ["Closable", "Startable"]


class Closable(ABC):
    @abstractmethod
    def close(self) -> None:
        """Release what the object holds; safe to call again."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Startable(ABC):
    @abstractmethod
    def start(self) -> Self:
        """Start it; returns the object."""

    @abstractmethod
    def stop(self) -> None:
        """Stop it; safe to call when it is not running."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
