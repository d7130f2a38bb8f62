"""Repeated images, piece by piece: the language server's feature cache, partial claims of the feature
store, the vision server's in-flight dedup, the gateway's content keys and its affinity map."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch

from contracts.content_keys import content_key, frame_keys
from gateway.generation import inputs_for
from gateway.images import content_keys
from gateway.jobs import ImageSource, Job
from gateway.pools import FeatureHolders
from language_server.feature_cache import FeatureCache
from language_server.feature_store import FeatureStore, FeatureTimeout
from proto import dvd_pb2
from transport.frames import ImageFeatures
from vision_server.in_flight import InFlight


def features(request_id: str, index: int, count: int, rows: int = 4, hidden: int = 8) -> ImageFeatures:
    return ImageFeatures(request_id, index, count, [rows], torch.full((rows, hidden), float(index)))


# ---------------------------------------------------------------- language server: cache


def test_cache_evicts_the_least_recently_used_under_its_byte_budget():
    item = features("r", 0, 1)  # 4 x 8 float32 = 128 bytes
    cache = FeatureCache(max_bytes=3 * item.num_bytes)
    for key in "abc":
        cache.put(key, features("r", 0, 1))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", features("r", 0, 1))
    assert "b" not in cache and {"a", "c", "d"} == {k for k in "abcd" if k in cache}
    assert cache.num_bytes == 3 * item.num_bytes


def test_cache_replaces_a_key_and_refuses_an_item_over_its_budget():
    cache = FeatureCache(max_bytes=200)
    cache.put("a", features("r", 0, 1))
    cache.put("a", features("r", 1, 2))
    assert len(cache) == 1 and cache.num_bytes == 128 and cache.get("a").image_index == 1
    cache.put("huge", features("r", 0, 1, rows=100))
    assert "huge" not in cache and "a" in cache


def test_a_replaced_key_counts_its_bytes_once_with_room_to_spare():
    cache = FeatureCache(max_bytes=10_000)
    for index in (0, 1, 2):
        cache.put("a", features("r", index, 3))
    assert len(cache) == 1 and cache.num_bytes == 128 and cache.get("a").image_index == 2


def test_an_item_of_exactly_the_budget_is_kept():
    cache = FeatureCache(max_bytes=128)
    cache.put("a", features("r", 0, 1))
    assert "a" in cache and cache.num_bytes == 128


# ---------------------------------------------------------------- language server: partial claims


def test_claim_of_some_images_waits_for_those_only_and_drops_the_others():
    async def run():
        dropped = []
        store = FeatureStore(on_drop=lambda reason, n: dropped.append(reason))
        claim = asyncio.create_task(store.claim("r", 3, timeout_s=5, indices=[2, 0]))
        await asyncio.sleep(0)
        assert store.put(features("r", 0, 3))
        assert not store.put(features("r", 1, 3))  # cached at the language server: not needed
        assert not claim.done()
        assert store.put(features("r", 2, 3))
        images = await claim
        assert [i.image_index for i in images] == [2, 0]
        assert dropped == ["not_needed"] and store.num_bytes == 0 and len(store) == 0

    asyncio.run(run())


def test_claim_of_no_image_returns_at_once_and_a_partial_timeout_names_the_wanted_count():
    async def run():
        store = FeatureStore()
        assert await store.claim("r", 2, timeout_s=0, indices=[]) == []
        store.put(features("s", 0, 2))
        with pytest.raises(FeatureTimeout, match="only 0 of 1 images"):
            await store.claim("s", 2, timeout_s=0.05, indices=[1])
        assert store.num_bytes == 0

    asyncio.run(run())


# ---------------------------------------------------------------- vision server: in-flight dedup


def test_identical_work_in_flight_runs_once_and_later_work_runs_again():
    async def run():
        in_flight: InFlight[int] = InFlight()
        calls = []

        async def work():
            calls.append(1)
            await asyncio.sleep(0.01)
            return len(calls)

        results = await asyncio.gather(*(in_flight.run("k", work) for _ in range(3)))
        assert results == [(1, False), (1, True), (1, True)] and len(in_flight) == 0
        assert await in_flight.run("k", work) == (2, False)  # nothing in flight any more: encoded again

    asyncio.run(run())


def test_shared_work_survives_one_caller_leaving_and_stops_when_all_have_left():
    async def run():
        in_flight: InFlight[str] = InFlight()
        release, cancelled = asyncio.Event(), asyncio.Event()

        async def work():
            try:
                await release.wait()
                return "done"
            except asyncio.CancelledError:
                cancelled.set()
                raise

        first = asyncio.create_task(in_flight.run("k", work))
        second = asyncio.create_task(in_flight.run("k", work))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await second == ("done", True) and not cancelled.is_set()

        release.clear()
        third = asyncio.create_task(in_flight.run("k", work))
        await asyncio.sleep(0)
        third.cancel()
        await asyncio.wait_for(cancelled.wait(), 5)
        assert len(in_flight) == 0

    asyncio.run(run())


def test_work_abandoned_by_every_caller_is_forgotten_at_once_and_a_new_caller_starts_afresh():
    """The last caller leaving cancels the work and forgets it then, not when the cancelled work has unwound: a
    caller in between would otherwise join work that is being cancelled. The unwinding raises nothing."""
    async def run():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        in_flight: InFlight[str] = InFlight()

        async def forever():
            await asyncio.Event().wait()

        async def fresh():
            return "fresh"

        first = asyncio.create_task(in_flight.run("k", forever))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert len(in_flight) == 0  # forgotten before the cancelled work has unwound
        await asyncio.sleep(0)  # it unwinds now; its done callback finds nothing to forget
        assert errors == []
        assert await in_flight.run("k", fresh) == ("fresh", False)

    asyncio.run(run())


def test_failed_work_fails_every_caller_and_is_forgotten():
    async def run():
        in_flight: InFlight[int] = InFlight()

        async def work():
            await asyncio.sleep(0)
            raise ValueError("bad tiles")

        results = await asyncio.gather(in_flight.run("k", work), in_flight.run("k", work), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results) and len(in_flight) == 0

    asyncio.run(run())


def test_content_key_covers_bytes_and_settings_and_names_each_video_frame():
    assert content_key(b"png", 12, 0, None) == content_key(b"png", 12, 0, None)
    assert len({content_key(b"png", 12, 0, None), content_key(b"png!", 12, 0, None), content_key(b"png", 6, 0, None),
                content_key(b"png", 12, 0, "vir")}) == 4
    assert frame_keys("k") == ["k"] and frame_keys("k", 3) == ["k.0", "k.1", "k.2"]


def test_a_content_key_is_the_documented_digest_so_gateways_of_two_releases_agree():
    """During a rolling update old and new gateways share the language servers' feature caches and the vision
    server's dedup: a key is the SHA-256 of the settings' reprs joined and ended by NUL, then the bytes."""
    assert content_key(b"png", 12, 0, None) == hashlib.sha256(b"12\x000\x00None\x00png").hexdigest()
    assert content_key(b"") == hashlib.sha256(b"\x00").hexdigest()


# ---------------------------------------------------------------- gateway: keys, subsets, affinity


def test_gateway_keys_one_per_image_and_frame_and_depend_on_model_weights_and_tiles():
    images = [dvd_pb2.ImageInput(data=b"a", max_tiles=12), dvd_pb2.ImageInput(data=b"v", video_frames=3),
              dvd_pb2.ImageInput(data=b"a", max_tiles=12)]
    keys = content_keys("m", "w1", images)
    assert len(keys) == 5 and keys[0] == keys[4] and len(set(keys)) == 4
    assert keys[1].endswith(".0") and keys[3].endswith(".2")
    assert content_keys("other", "w1", images[:1]) != keys[:1]
    assert content_keys("m", "w2", images[:1]) != keys[:1]  # new vision weights: cached features are not found
    assert content_keys("m", "w1", [dvd_pb2.ImageInput(data=b"a", max_tiles=1)]) != keys[:1]


def test_only_the_inputs_holding_missing_images_are_encoded_with_their_positions():
    chat = Job("r", "m", [], [ImageSource("a", 12), ImageSource("v", 1, 3), ImageSource("b", 12)],
                        dvd_pb2.SamplingParams())
    chat.images = [dvd_pb2.ImageInput(data=b"a"), dvd_pb2.ImageInput(data=b"v", video_frames=3),
                   dvd_pb2.ImageInput(data=b"b")]
    assert [(i.data, i.image_index) for i in inputs_for(chat, [4])] == [(b"b", 4)]
    assert [(i.data, i.image_index) for i in inputs_for(chat, [0, 2])] == [(b"a", 0), (b"v", 1)]
    assert inputs_for(chat, []) == []
    assert chat.images[2].image_index == 0  # the request's own inputs are untouched


def test_affinity_prefers_the_server_holding_most_keys_and_forgets_the_oldest():
    holders = FeatureHolders(max_keys=3)
    assert holders.best(["a"]) is None
    holders.record(["a", "b"], "s1")
    holders.record(["c"], "s2")
    assert holders.best(["a", "b", "c"]) == "s1"
    holders.record(["d", "e"], "s2")  # a and b are forgotten
    assert holders.best(["a", "b", "c"]) == "s2"
