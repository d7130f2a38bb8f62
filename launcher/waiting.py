"""Waiting on state with a deadline: the one poll loop of the launcher, the tests and the benchmarks.

Nothing here depends on speed: a condition is polled until it holds or its deadline passes, and the failure
names what was awaited. An HTTP, gRPC or socket error while polling (a server not listening yet) counts as
"not yet", not as a failure.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import httpx

T = TypeVar("T")

NOT_YET: tuple[type[BaseException], ...] = (httpx.HTTPError, grpc.RpcError, ValueError, OSError)

What = str | Callable[[], str]  # what is awaited, or a function that describes the state seen at the deadline


def _timed_out(timeout_s: float, what: What) -> TimeoutError:
    return TimeoutError(f"not within {timeout_s:g} s: {what() if callable(what) else what}")


def wait_until(condition: Callable[[], T], timeout_s: float, what: What, *, interval_s: float = 0.2,
               not_yet: tuple[type[BaseException], ...] = NOT_YET) -> T:
    """Poll `condition` every `interval_s` until it returns something true, and return that; raise
    TimeoutError naming `what` after `timeout_s`. An exception in `not_yet` counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if value := condition():
                return value
        except not_yet:
            pass
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what)
        time.sleep(interval_s)


async def wait_until_async(condition: Callable[[], T | Awaitable[T]], timeout_s: float, what: What, *,
                           interval_s: float = 0.01, not_yet: tuple[type[BaseException], ...] = NOT_YET) -> T:
    """`wait_until` inside an event loop: `condition` (a plain or an async function) is polled between
    `asyncio.sleep`s, so the tasks it waits for keep running. The default interval suits in-process state."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except not_yet:
            pass
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what)
        await asyncio.sleep(interval_s)
