"""Two asyncio steps the gateway's services take again and again: wait for an event with a time limit
(:func:`wait_set`), and cancel tasks and wait until they have ended (:func:`cancel_all`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_all", "wait_set"]


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set: True, or False when ``timeout`` seconds passed first (None: no limit)."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and return once each has ended (what they raise, their cancellation included, is
    dropped; a cancellation of the caller is not)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
