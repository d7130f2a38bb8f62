"""Features waiting for their Generate call, keyed by request id, bounded in time and bytes.

Features may arrive before or after the Generate call that claims them. Unclaimed features expire
after a TTL; everything held counts against a byte cap; anything dropped is counted by reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from transport.frames import ImageFeatures

log = logging.getLogger(__name__)


class FeatureTimeout(TimeoutError):
    """A request's features did not all arrive in time."""


class FeatureMismatch(ValueError):
    """Arrived features contradict the Generate call (image count)."""


class FeatureOverCapacity(RuntimeError):
    """A request's features were dropped because the store was full."""


@dataclass
class _Pending:
    images: dict[int, ImageFeatures] = field(default_factory=dict)
    image_count: int | None = None  # known once a header or the Generate call says so
    wanted: set[int] | None = None  # the images the Generate call waits for (the rest may be cached there)
    num_bytes: int = 0
    created: float = field(default_factory=time.monotonic)
    claimed: bool = False
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    error: Exception | None = None  # raised by the claim

    def arrived(self) -> bool:
        wanted = range(self.image_count) if self.wanted is None else self.wanted
        return self.image_count is not None and all(i in self.images for i in wanted)


class FeatureStore:
    """Holds features per request until claimed; all methods run on one event loop."""

    def __init__(self, *, ttl_s: float = 60.0, max_bytes: int = 4 << 30, on_drop=None):
        self._pending: dict[str, _Pending] = {}
        self._finished: dict[str, float] = {}  # request id -> when; late features for it are dropped
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._on_drop = on_drop or (lambda reason, n: None)
        self.num_bytes = 0
        self.peak_bytes = 0  # the most held at once

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, item: ImageFeatures) -> bool:
        """Store one image's features; False (and counted) when dropped."""
        if item.request_id in self._finished:
            return self._drop("late", item.num_bytes)
        entry = self._pending.get(item.request_id)
        if entry is None:
            entry = self._pending[item.request_id] = _Pending()
        if entry.image_count is not None and item.image_count != entry.image_count:
            entry.error = FeatureMismatch(
                f"features for image {item.image_index} say the request has {item.image_count} images, "
                f"expected {entry.image_count}"
            )
            entry.complete.set()
            return self._drop("image_count_mismatch", item.num_bytes)
        if item.image_index in entry.images:
            return self._drop("duplicate", item.num_bytes)
        if entry.wanted is not None and item.image_index not in entry.wanted:
            return self._drop("not_needed", item.num_bytes)
        if self.num_bytes + item.num_bytes > self._max_bytes:
            if entry.claimed:  # fail the waiting Generate now rather than at its timeout
                entry.error = FeatureOverCapacity(
                    f"features of image {item.image_index} dropped: the server holds too many features"
                )
                entry.complete.set()
            elif not entry.images:
                del self._pending[item.request_id]
            return self._drop("over_capacity", item.num_bytes)
        entry.image_count = item.image_count
        entry.images[item.image_index] = item
        entry.num_bytes += item.num_bytes
        self.num_bytes += item.num_bytes
        self.peak_bytes = max(self.peak_bytes, self.num_bytes)
        if entry.arrived():
            entry.complete.set()
        return True

    async def claim(self, request_id: str, image_count: int, timeout_s: float,
                    indices: list[int] | None = None) -> list[ImageFeatures]:
        """Wait for the images `indices` (default: all `image_count`) of `request_id`, remove them, and
        return them in that order."""
        indices = list(range(image_count)) if indices is None else indices
        entry = self._pending.get(request_id)
        if entry is None:
            entry = self._pending[request_id] = _Pending()
        entry.claimed = True
        if entry.image_count is not None and entry.image_count != image_count:
            self.release(request_id)
            raise FeatureMismatch(f"features say {entry.image_count} images, the request has {image_count}")
        entry.image_count = image_count
        entry.wanted = set(indices)
        for index in set(entry.images) - entry.wanted:  # sent before the server said it holds them
            unneeded = entry.images.pop(index)
            entry.num_bytes -= unneeded.num_bytes
            self.num_bytes -= unneeded.num_bytes
            self._drop("not_needed", unneeded.num_bytes)
        if entry.arrived():
            entry.complete.set()
        try:
            if not entry.complete.is_set():  # wait_for gives up at once on a timeout <= 0, even when set
                await asyncio.wait_for(entry.complete.wait(), timeout_s)
        except asyncio.TimeoutError:
            arrived = len(entry.wanted & entry.images.keys())
            self.release(request_id)
            raise FeatureTimeout(
                f"only {arrived} of {len(indices)} images' features arrived within {timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            self.release(request_id)
            raise
        if entry.error:
            self.release(request_id)
            raise entry.error
        images = [entry.images[i] for i in indices]
        self.release(request_id)
        return images

    def release(self, request_id: str) -> None:
        """Forget a request: free its features and drop any that arrive later (until the TTL)."""
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            self.num_bytes -= entry.num_bytes
        self._finished[request_id] = time.monotonic()

    def expire(self, now: float | None = None) -> int:
        """Drop unclaimed features older than the TTL; returns how many requests were dropped."""
        now = time.monotonic() if now is None else now
        stale = [rid for rid, e in self._pending.items() if not e.claimed and now - e.created > self._ttl_s]
        for rid in stale:
            entry = self._pending.pop(rid)
            self.num_bytes -= entry.num_bytes
            self._drop("expired", entry.num_bytes)
            log.warning("request %s: dropped %d unclaimed images' features after %g s", rid, len(entry.images),
                        self._ttl_s)
        for rid in [rid for rid, t in self._finished.items() if now - t > self._ttl_s]:
            del self._finished[rid]
        return len(stale)

    async def expire_forever(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.expire()

    def _drop(self, reason: str, num_bytes: int) -> bool:
        self._on_drop(reason, num_bytes)
        return False
