"""The feature store hands each Generate call exactly its own images, in order, and stays bounded."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from language_server.feature_store import FeatureMismatch, FeatureOverCapacity, FeatureStore, FeatureTimeout
from launcher import wait_until_async
from transport.frames import ImageFeatures

pytestmark = pytest.mark.timeout(30)

HIDDEN = 8
ITEM_BYTES = 4 * HIDDEN * 2  # make_item's default: 4 tokens of bf16


def run(coro, deadline_s: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, deadline_s))


def make_item(request_id: str, index: int, count: int, tokens: int = 4) -> ImageFeatures:
    """Features whose values say whose they are: every element is `index`, tagged by the request id."""
    features = torch.full((tokens, HIDDEN), float(index), dtype=torch.bfloat16)
    features[:, 0] = float(hash(request_id) % 251)
    return ImageFeatures(request_id, index, count, [tokens], features)


class Drops:
    """The store's `on_drop` callback, recording `(reason, num_bytes)` in order."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def __call__(self, reason: str, num_bytes: int) -> None:
        self.events.append((reason, num_bytes))

    def __eq__(self, other) -> bool:
        return self.events == other

    @property
    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.events]


def new_store(**kwargs) -> tuple[FeatureStore, Drops]:
    drops = Drops()
    return FeatureStore(on_drop=drops, **kwargs), drops


def assert_is(images: list[ImageFeatures], request_id: str, count: int) -> None:
    assert [(i.request_id, i.image_index) for i in images] == [(request_id, n) for n in range(count)]
    for n, image in enumerate(images):
        assert torch.equal(image.features, make_item(request_id, n, count).features)


# --- arrival before and after the claim -----------------------------------------------------------------


def test_features_that_arrived_before_the_claim_are_returned_in_index_order():
    async def body():
        store, drops = new_store()
        for index in (2, 0, 1):
            assert store.put(make_item("r", index, 3))
        assert store.num_bytes == 3 * ITEM_BYTES
        images = await store.claim("r", 3, timeout_s=1.0)
        assert_is(images, "r", 3)
        assert store.num_bytes == 0 and len(store) == 0
        assert drops == []

    run(body())


def test_features_sent_before_the_claim_that_the_server_holds_are_dropped_and_counted():
    """The gateway encodes at once what it predicts the server lacks; a wrong guess sends an image the server
    holds, and the claim (which wants only the missing ones) drops it, freeing its bytes."""

    async def body():
        store, drops = new_store()
        for index in (0, 1):
            assert store.put(make_item("r", index, 3))
        images = await store.claim("r", 3, timeout_s=0.0, indices=[1])
        assert [i.image_index for i in images] == [1]
        assert drops == [("not_needed", ITEM_BYTES)]
        assert store.num_bytes == 0

        claim = asyncio.create_task(store.claim("s", 2, timeout_s=5.0, indices=[0]))
        await asyncio.sleep(0)
        assert not store.put(make_item("s", 1, 2))  # arriving after the claim said it is not needed
        assert drops.events[-1] == ("not_needed", ITEM_BYTES)
        store.put(make_item("s", 0, 2))
        assert [i.image_index for i in await claim] == [0]

    run(body())


def test_claim_with_everything_present_succeeds_even_with_a_zero_timeout():
    async def body():
        store, _ = new_store()
        store.put(make_item("r", 0, 1))
        assert_is(await store.claim("r", 1, timeout_s=0), "r", 1)

    run(body())


def test_features_that_arrive_after_the_claim_wake_it_in_index_order():
    async def body():
        store, drops = new_store()
        claim = asyncio.create_task(store.claim("r", 3, timeout_s=2.0))
        await asyncio.sleep(0.01)
        assert not claim.done()
        for index in (1, 2):
            store.put(make_item("r", index, 3))
            await asyncio.sleep(0.01)
            assert not claim.done()
        store.put(make_item("r", 0, 3))
        assert_is(await claim, "r", 3)
        assert store.num_bytes == 0 and len(store) == 0
        assert drops == []

    run(body())


def test_some_features_before_and_some_after_the_claim():
    async def body():
        store, _ = new_store()
        store.put(make_item("r", 1, 2))
        claim = asyncio.create_task(store.claim("r", 2, timeout_s=2.0))
        await asyncio.sleep(0.01)
        store.put(make_item("r", 0, 2))
        assert_is(await claim, "r", 2)

    run(body())


# --- timeouts, TTL and cancellation ---------------------------------------------------------------------


def test_claim_timeout_names_how_many_arrived_and_frees_their_bytes():
    async def body():
        store, drops = new_store()
        store.put(make_item("r", 0, 3))
        store.put(make_item("r", 2, 3))
        # A claim with a far longer timeout, begun first, still waits when this one gives up on its own 0.05 s.
        patient = asyncio.create_task(store.claim("patient", 1, timeout_s=60))
        await asyncio.sleep(0)
        with pytest.raises(FeatureTimeout, match=r"only 2 of 3 images' features arrived within 0\.05 s"):
            await store.claim("r", 3, timeout_s=0.05)
        assert not patient.done()
        patient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await patient
        assert store.num_bytes == 0 and len(store) == 0
        # The missing image, arriving at last, is not kept for anyone.
        assert not store.put(make_item("r", 1, 3))
        assert drops == [("late", ITEM_BYTES)]
        assert store.num_bytes == 0

    run(body())


def test_claim_timeout_with_nothing_arrived_says_zero():
    async def body():
        store, _ = new_store()
        with pytest.raises(FeatureTimeout, match="only 0 of 2 "):
            await store.claim("r", 2, timeout_s=0.02)
        assert len(store) == 0

    run(body())


def test_unclaimed_features_expire_after_the_ttl(caplog):
    async def body():
        store, drops = new_store(ttl_s=10.0)
        store.put(make_item("old", 0, 2))
        store.put(make_item("old", 1, 2))
        now = time.monotonic()
        assert store.expire() == 0  # on its own clock: nothing is old yet
        assert store.expire(now=now + 5.0) == 0
        assert store.num_bytes == 2 * ITEM_BYTES
        assert store.expire(now=now + 10.5) == 1
        assert drops == [("expired", 2 * ITEM_BYTES)]
        assert store.num_bytes == 0 and len(store) == 0

    with caplog.at_level("WARNING", logger="language_server.feature_store"):
        run(body())
    assert caplog.messages == ["request old: dropped 2 unclaimed images' features after 10 s"]


def test_the_expiry_loop_expires_unclaimed_features_on_its_own():
    async def body():
        store, drops = new_store(ttl_s=0.0)
        loop = asyncio.create_task(store.expire_forever(interval_s=0.01))
        store.put(make_item("old", 0, 2))
        await wait_until_async(lambda: len(store) == 0, 5, "the loop expires the unclaimed features")
        assert drops.reasons == ["expired"]
        loop.cancel()

    run(body())


def test_claimed_features_do_not_expire_while_their_claim_waits():
    async def body():
        store, drops = new_store(ttl_s=1.0)
        store.put(make_item("waiting", 0, 2))
        store.put(make_item("idle", 0, 1))
        claim = asyncio.create_task(store.claim("waiting", 2, timeout_s=2.0))
        await asyncio.sleep(0.01)
        assert store.expire(now=time.monotonic() + 100.0) == 1
        assert drops.reasons == ["expired"]
        store.put(make_item("waiting", 1, 2))
        assert_is(await claim, "waiting", 2)

    run(body())


def test_finished_requests_are_forgotten_after_the_ttl():
    async def body():
        store, drops = new_store(ttl_s=1.0)
        store.release("r")
        assert not store.put(make_item("r", 0, 1))
        store.expire(now=time.monotonic())
        assert not store.put(make_item("r", 0, 1))  # finished less than the TTL ago: still late
        store.expire(now=time.monotonic() + 2.0)
        # A request id reused after the TTL is a new request.
        assert store.put(make_item("r", 0, 1))
        assert drops.reasons == ["late", "late"]

    run(body())


def test_cancelling_a_claim_releases_the_request():
    async def body():
        store, drops = new_store()
        store.put(make_item("r", 0, 2))
        claim = asyncio.create_task(store.claim("r", 2, timeout_s=5.0))
        await asyncio.sleep(0.01)
        claim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claim
        assert store.num_bytes == 0 and len(store) == 0
        assert not store.put(make_item("r", 1, 2))
        assert drops.reasons == ["late"]

    run(body())


# --- what gets dropped ----------------------------------------------------------------------------------


def test_features_that_fill_the_store_exactly_are_kept():
    async def body():
        store, drops = new_store(max_bytes=2 * ITEM_BYTES)
        assert store.put(make_item("a", 0, 2)) and store.put(make_item("a", 1, 2))
        assert store.num_bytes == 2 * ITEM_BYTES and drops == []

    run(body())


def test_over_capacity_drops_only_the_newcomer():
    async def body():
        store, drops = new_store(max_bytes=5 * ITEM_BYTES // 2)
        assert store.peak_bytes == 0  # nothing held yet
        assert store.put(make_item("a", 0, 2))
        assert store.put(make_item("b", 0, 1))
        assert not store.put(make_item("c", 0, 1))  # a request with nothing held yet
        assert not store.put(make_item("a", 1, 2))  # a request that already holds an image
        assert drops == [("over_capacity", ITEM_BYTES), ("over_capacity", ITEM_BYTES)]
        assert store.num_bytes == 2 * ITEM_BYTES
        assert len(store) == 2  # "c" left no empty entry behind
        assert_is(await store.claim("b", 1, timeout_s=1.0), "b", 1)
        # The freed room takes the next arrival; "a" still holds its first image.
        assert store.put(make_item("a", 1, 2))
        assert_is(await store.claim("a", 2, timeout_s=1.0), "a", 2)
        assert store.num_bytes == 0
        assert store.peak_bytes == 2 * ITEM_BYTES  # the high-water mark: the cap was never passed

    run(body())


def test_an_image_larger_than_the_cap_fails_a_waiting_claim_at_once():
    async def body():
        store, drops = new_store(max_bytes=ITEM_BYTES)
        claim = asyncio.create_task(store.claim("r", 1, timeout_s=30))
        await asyncio.sleep(0.01)
        assert not store.put(make_item("r", 0, 1, tokens=8))
        with pytest.raises(FeatureOverCapacity, match="image 0 dropped"):
            await asyncio.wait_for(claim, 5)
        assert drops.reasons == ["over_capacity"]
        assert store.num_bytes == 0 and len(store) == 0

    run(body())


def test_duplicate_images_are_dropped_and_counted_once():
    async def body():
        store, drops = new_store()
        first = make_item("r", 0, 2)
        assert store.put(first)
        assert not store.put(make_item("r", 0, 2))
        assert drops == [("duplicate", ITEM_BYTES)]
        assert store.num_bytes == ITEM_BYTES
        store.put(make_item("r", 1, 2))
        images = await store.claim("r", 2, timeout_s=1.0)
        assert images[0] is first

    run(body())


def test_features_for_a_finished_request_are_dropped_as_late():
    async def body():
        store, drops = new_store()
        store.put(make_item("done", 0, 1))
        await store.claim("done", 1, timeout_s=1.0)
        store.release("done")  # what the service does when Generate ends
        assert not store.put(make_item("done", 0, 1))
        assert drops == [("late", ITEM_BYTES)]
        assert store.num_bytes == 0 and len(store) == 0

    run(body())


def test_features_for_an_aborted_request_are_dropped_as_late():
    async def body():
        store, drops = new_store()
        store.put(make_item("aborted", 0, 2))
        store.release("aborted")
        assert store.num_bytes == 0 and len(store) == 0
        assert not store.put(make_item("aborted", 1, 2))
        assert drops.reasons == ["late"]

    run(body())


# --- image-count mismatches -----------------------------------------------------------------------------


def test_claim_with_a_different_image_count_than_the_headers_raises_mismatch():
    async def body():
        store, _ = new_store()
        store.put(make_item("r", 0, 2))
        with pytest.raises(FeatureMismatch, match="features say 2 images, the request has 3"):
            await store.claim("r", 3, timeout_s=1.0)
        assert store.num_bytes == 0 and len(store) == 0

    run(body())


def test_header_with_a_different_image_count_than_the_claim_fails_the_waiting_claim():
    async def body():
        store, drops = new_store()
        claim = asyncio.create_task(store.claim("r", 2, timeout_s=2.0))
        await asyncio.sleep(0.01)
        store.put(make_item("r", 0, 2))
        assert not store.put(make_item("r", 1, 3))
        with pytest.raises(FeatureMismatch, match="image 1 say the request has 3 images, expected 2"):
            await claim
        assert drops == [("image_count_mismatch", ITEM_BYTES)]
        assert store.num_bytes == 0 and len(store) == 0

    run(body())


def test_headers_that_disagree_with_each_other_fail_the_later_claim():
    async def body():
        store, drops = new_store()
        store.put(make_item("r", 0, 2))
        store.put(make_item("r", 1, 4))
        assert drops.reasons == ["image_count_mismatch"]
        with pytest.raises(FeatureMismatch, match="say the request has 4 images, expected 2"):
            await store.claim("r", 2, timeout_s=1.0)
        assert store.num_bytes == 0 and len(store) == 0

    run(body())


# --- isolation between requests ------------------------------------------------------------------------


def test_two_requests_never_see_each_others_features():
    async def body():
        store, drops = new_store()
        a = asyncio.create_task(store.claim("a", 2, timeout_s=2.0))
        store.put(make_item("b", 1, 2))
        await asyncio.sleep(0.01)
        store.put(make_item("a", 1, 2))
        store.put(make_item("b", 0, 2))
        await asyncio.sleep(0.01)
        assert not a.done()
        store.put(make_item("a", 0, 2))
        assert_is(await a, "a", 2)
        assert_is(await store.claim("b", 2, timeout_s=1.0), "b", 2)
        assert drops == []

    run(body())


@st.composite
def interleavings(draw):
    counts = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    request_ids = [f"req-{n}" for n in range(len(counts))]
    arrivals = draw(st.permutations([(rid, i) for rid, c in zip(request_ids, counts) for i in range(c)]))
    claim_first = draw(st.lists(st.booleans(), min_size=len(counts), max_size=len(counts)))
    return dict(zip(request_ids, counts)), arrivals, dict(zip(request_ids, claim_first))


@settings(max_examples=60, deadline=None)
@given(case=interleavings())
def test_any_interleaving_of_arrivals_and_claims_gives_each_request_its_own_images(case):
    counts, arrivals, claim_first = case

    async def body():
        store, drops = new_store()
        claims = {
            rid: asyncio.create_task(store.claim(rid, counts[rid], timeout_s=2.0))
            for rid in counts
            if claim_first[rid]
        }
        await asyncio.sleep(0)
        for rid, index in arrivals:
            assert store.put(make_item(rid, index, counts[rid]))
            await asyncio.sleep(0)
        for rid in counts:
            if rid not in claims:
                claims[rid] = asyncio.create_task(store.claim(rid, counts[rid], timeout_s=2.0))
        for rid, claim in claims.items():
            assert_is(await claim, rid, counts[rid])
        assert drops == []
        assert store.num_bytes == 0 and len(store) == 0

    run(body())
