"""Deciding which tiles the encoder runs next: pure Python, no tensors, driven by tests without a device.

Tiles of all waiting images are batched across requests under a tile budget. A batch leaves when it is
full or when its oldest tile has waited `max_wait_s`. Requests share a batch round-robin, a fair share
each, starting one place further every batch, so a 40-tile image never holds back a 1-tile one: the
small one rides in the very next batch.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class ImageJob:
    """One image waiting for the encoder; `payload` is whatever the runner needs (pixel values...)."""

    request_id: str
    image_index: int
    num_tiles: int
    payload: object = None
    enqueued: float = field(default_factory=time.monotonic)
    next_tile: int = 0  # tiles before this one are scheduled

    @property
    def tiles_left(self) -> int:
        return self.num_tiles - self.next_tile


@dataclass(frozen=True)
class TileSlice:
    """Tiles [start, stop) of one image, placed in a batch."""

    job: ImageJob
    start: int
    stop: int

    @property
    def num_tiles(self) -> int:
        return self.stop - self.start


class TileScheduler:
    def __init__(self, max_batch_tiles: int = 32, max_wait_s: float = 0.005):
        if max_batch_tiles < 1:
            raise ValueError("max_batch_tiles must be at least 1")
        self.max_batch_tiles = max_batch_tiles
        self.max_wait_s = max_wait_s
        self._requests: OrderedDict[str, list[ImageJob]] = OrderedDict()  # arrival order
        self._rotation = 0

    @property
    def tiles_waiting(self) -> int:
        return sum(job.tiles_left for jobs in self._requests.values() for job in jobs)

    def add(self, job: ImageJob) -> None:
        if job.num_tiles < 1:
            raise ValueError(f"image {job.image_index} of request {job.request_id} has no tiles")
        self._requests.setdefault(job.request_id, []).append(job)

    def cancel(self, request_id: str) -> None:
        """Forget a request's tiles that are not yet scheduled."""
        self._requests.pop(request_id, None)

    def wait_s(self, now: float | None = None) -> float | None:
        """Seconds until a batch is due (0: now); None when nothing waits."""
        if not self._requests:
            return None
        if self.tiles_waiting >= self.max_batch_tiles:
            return 0.0
        now = time.monotonic() if now is None else now
        oldest = min(jobs[0].enqueued for jobs in self._requests.values())
        return max(0.0, oldest + self.max_wait_s - now)

    def next_batch(self, now: float | None = None, *, force: bool = False) -> list[TileSlice]:
        """The next batch if one is due (or `force`), else []."""
        due = self.wait_s(now)
        if due is None or (due > 0 and not force):
            return []
        batch: list[TileSlice] = []
        budget = self.max_batch_tiles
        order = list(self._requests)
        start = self._rotation % len(order)
        order = order[start:] + order[:start]
        self._rotation += 1
        while budget and order:
            share = max(1, math.ceil(budget / len(order)))
            for request_id in list(order):
                jobs = self._requests[request_id]
                take = min(share, budget)
                while take and jobs:
                    job = jobs[0]
                    n = min(take, job.tiles_left)
                    batch.append(TileSlice(job, job.next_tile, job.next_tile + n))
                    job.next_tile += n
                    take -= n
                    budget -= n
                    if not job.tiles_left:
                        jobs.pop(0)
                if not jobs:
                    del self._requests[request_id]
                    order.remove(request_id)
                if not budget:
                    break
        return batch
