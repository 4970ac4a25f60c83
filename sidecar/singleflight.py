"""Single-flight: concurrent requests for one key share one execution.

A popular original that is not cached yet gets many requests at once (a new recipe on the home
page, every size at once); without this each of them would run the CNN.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Generic, TypeVar

from sidecar.errors import Overloaded

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """At most one running ``fn`` per key; every caller of that key gets its result or error.

    The work runs as its own task: a caller that is cancelled (its client went away, its deadline
    passed) stops waiting, but the work goes on for the others, and its result still lands in
    whatever cache ``fn`` fills. ``max_keys`` bounds the distinct keys in flight: beyond it new
    keys are refused with ``Overloaded`` instead of queueing without limit.
    """

    def __init__(self, max_keys: int = 1024) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._tasks: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    async def run(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            if len(self._tasks) >= self.max_keys:
                raise Overloaded(f"{len(self._tasks)} keys in flight (max_keys={self.max_keys})")
            task = asyncio.ensure_future(fn())
            self._tasks[key] = task
            task.add_done_callback(partial(self._done, key))
        return await asyncio.shield(task)

    def _done(self, key: str, task: asyncio.Future[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        # Mark the exception retrieved: when every waiter was cancelled nobody else reads it,
        # and asyncio would log "Task exception was never retrieved" for an error we meant to drop.
        if not task.cancelled():
            task.exception()
