"""Identical images in flight at once are encoded once.

Several requests of one conversation, or one request naming the same image twice, often carry the same
bytes. The first caller's encode runs; later callers with the same content key (`contracts/content_keys.py`)
await its result. The work is cancelled only when every caller waiting on it has gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Shared(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


class InFlight(Generic[T]):
    """Runs `work()` once per key among callers that overlap in time; all methods run on one event loop."""

    def __init__(self):
        self._shared: dict[str, _Shared[T]] = {}

    def __len__(self) -> int:
        return len(self._shared)

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The result of `work()` for `key`, and whether it was another caller's work."""
        shared = self._shared.get(key)
        joined = shared is not None
        if shared is None:
            shared = self._shared[key] = _Shared(asyncio.ensure_future(work()))
            shared.task.add_done_callback(lambda task: self._forget(key, task))
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task), joined
        finally:
            shared.waiters -= 1
            if not shared.waiters and not shared.task.done():
                shared.task.cancel()
                self._forget(key, shared.task)

    def _forget(self, key: str, task: asyncio.Task) -> None:
        if key in self._shared and self._shared[key].task is task:
            del self._shared[key]
