"""The tile scheduler: budgets, waiting, fairness across requests (pure Python, no device)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_server.scheduler import ImageJob, TileScheduler


def job(request_id: str, tiles: int, index: int = 0, at: float = 0.0) -> ImageJob:
    return ImageJob(request_id, index, tiles, enqueued=at)


def test_a_partial_batch_waits_until_its_oldest_tile_is_due():
    scheduler = TileScheduler(max_batch_tiles=8, max_wait_s=0.01)
    scheduler.add(job("a", 3, at=100.0))
    assert scheduler.next_batch(now=100.005) == []
    assert abs(scheduler.wait_s(now=100.005) - 0.005) < 1e-9
    batch = scheduler.next_batch(now=100.011)
    assert [(s.job.request_id, s.start, s.stop) for s in batch] == [("a", 0, 3)]
    assert scheduler.wait_s() is None


def test_a_full_batch_leaves_at_once_and_never_exceeds_the_budget():
    scheduler = TileScheduler(max_batch_tiles=8, max_wait_s=10)
    scheduler.add(job("a", 13, at=0.0))
    first = scheduler.next_batch(now=0.0)
    assert sum(s.num_tiles for s in first) == 8
    assert scheduler.next_batch(now=0.0) == []  # 5 left, not full, not yet due
    rest = scheduler.next_batch(now=10.0)
    assert [(s.start, s.stop) for s in rest] == [(8, 13)]


def test_a_small_request_is_not_starved_by_a_large_image():
    scheduler = TileScheduler(max_batch_tiles=8, max_wait_s=0)
    scheduler.add(job("large", 40, at=0.0))
    scheduler.add(job("small", 1, at=0.001))
    batch = scheduler.next_batch(now=0.002)
    assert {s.job.request_id for s in batch} == {"large", "small"}  # in the very first batch
    assert sum(s.num_tiles for s in batch) == 8


def test_requests_share_a_batch_fairly():
    scheduler = TileScheduler(max_batch_tiles=12, max_wait_s=0)
    for name in "abc":
        scheduler.add(job(name, 20))
    batch = scheduler.next_batch(now=1.0)
    per_request = {}
    for s in batch:
        per_request[s.job.request_id] = per_request.get(s.job.request_id, 0) + s.num_tiles
    assert per_request == {"a": 4, "b": 4, "c": 4}


def test_cancel_drops_only_unscheduled_tiles_of_that_request():
    scheduler = TileScheduler(max_batch_tiles=4, max_wait_s=0)
    scheduler.add(job("a", 6))
    scheduler.add(job("b", 2))
    scheduler.next_batch(now=1.0)
    scheduler.cancel("a")
    leftover = scheduler.next_batch(now=2.0)
    assert {s.job.request_id for s in leftover} <= {"b"}


@settings(max_examples=200, deadline=None)
@given(
    images=st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 40)), min_size=1, max_size=12),
    budget=st.integers(1, 64),
)
def test_every_tile_is_scheduled_exactly_once_in_order_within_budget(images, budget):
    scheduler = TileScheduler(max_batch_tiles=budget, max_wait_s=0)
    jobs = [job(name, tiles, index=i) for i, (name, tiles) in enumerate(images)]
    for j in jobs:
        scheduler.add(j)
    seen = {id(j): [] for j in jobs}
    for _ in range(10_000):
        batch = scheduler.next_batch(now=1.0)
        if not batch:
            break
        assert 0 < sum(s.num_tiles for s in batch) <= budget
        for s in batch:
            seen[id(s.job)].append((s.start, s.stop))
    assert scheduler.wait_s() is None
    for j in jobs:
        covered = [t for start, stop in seen[id(j)] for t in range(start, stop)]
        assert covered == list(range(j.num_tiles))  # each tile once, in order


def test_the_default_scheduler_batches_32_tiles_and_waits_5_ms():
    scheduler = TileScheduler()
    scheduler.add(job("a", 40, at=0.0))
    assert abs(scheduler.wait_s(now=0.0)) == 0.0  # 40 tiles waiting: a full batch is due
    assert sum(s.num_tiles for s in scheduler.next_batch(now=0.0)) == 32
    assert abs(scheduler.wait_s(now=0.0) - 0.005) < 1e-12  # 8 left: due when the oldest has waited 5 ms


def test_exactly_a_full_batch_leaves_at_once():
    scheduler = TileScheduler(max_batch_tiles=8, max_wait_s=10)
    scheduler.add(job("a", 8, at=0.0))
    assert scheduler.wait_s(now=0.0) == 0.0
    assert [(s.start, s.stop) for s in scheduler.next_batch(now=0.0)] == [(0, 8)]


def test_without_a_given_time_the_wait_counts_from_the_clock():
    scheduler = TileScheduler(max_batch_tiles=8, max_wait_s=10)
    scheduler.add(ImageJob("a", 0, 1))  # enqueued now, on the monotonic clock
    assert 0 < scheduler.wait_s() <= 10


def test_batches_take_turns_in_arrival_order_when_the_budget_is_smaller_than_the_requests():
    """One tile a batch: each request in turn, from the first arrival on, one place further every batch."""
    scheduler = TileScheduler(max_batch_tiles=1, max_wait_s=0)
    for name in "abc":
        scheduler.add(job(name, 10))
    order = [scheduler.next_batch(now=1.0)[0].job.request_id for _ in range(9)]
    assert order == list("abcabcabc")


def test_a_budget_smaller_than_the_requests_gives_one_tile_each_in_turn():
    scheduler = TileScheduler(max_batch_tiles=2, max_wait_s=0)
    for name in "abc":
        scheduler.add(job(name, 5))
    assert [(s.job.request_id, s.num_tiles) for s in scheduler.next_batch(now=1.0)] == [("a", 1), ("b", 1)]


def test_cancelling_a_request_it_does_not_hold_changes_nothing():
    scheduler = TileScheduler(max_batch_tiles=4, max_wait_s=0)
    scheduler.add(job("a", 2))
    scheduler.cancel("gone")
    assert [(s.job.request_id, s.start, s.stop) for s in scheduler.next_batch(now=1.0)] == [("a", 0, 2)]


def test_bad_budgets_and_empty_images_are_refused_by_name():
    with pytest.raises(ValueError, match="^max_batch_tiles must be at least 1$"):
        TileScheduler(max_batch_tiles=0)
    with pytest.raises(ValueError, match="^image 2 of request r has no tiles$"):
        TileScheduler().add(job("r", 0, index=2))
