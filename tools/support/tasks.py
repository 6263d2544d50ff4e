"""The tasks an object runs beside its main work (a fleet's loops, a listener's connections, the demo's story):
:class:`TaskSet` keeps each one until it ends and cancels them together."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["TaskSet"]


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the set."""
        return self.add(asyncio.ensure_future(coro))

    def add(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep ``task`` (one started elsewhere, e.g. a stream server's connection) until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel(self) -> None:
        """Cancel every task of the set and wait until each has ended; what they raise is dropped."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
