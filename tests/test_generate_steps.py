"""The language server's Generate, step by step, without vLLM: each step raises one `GenerateError`, and
`Generate` alone turns it into a gRPC status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
import torch
from vllm.v1.engine.exceptions import EngineDeadError

from language_server.feature_cache import FeatureCache
from language_server.feature_store import FeatureStore
from language_server.prompt import ChatRenderer
from language_server.service import FeaturesLate, GenerateError, InvalidRequest, LanguageService
from proto import dvd_pb2
from transport.frames import ImageFeatures

HIDDEN = 8
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content if m.content is string else 'parts' }}\n{% endfor %}"


class FakeEngine:
    """Answers every prompt with one finished two-token choice; or fails as vLLM does, with `error`."""

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.prompts: list[dict] = []

    async def generate(self, prompt: dict, sampling, request_id: str):
        self.prompts.append(prompt)
        if self.error is not None:
            raise self.error
        choice = SimpleNamespace(index=0, text="hi", token_ids=[7, 8], logprobs=None, finish_reason="length",
                                 finished=lambda: True)
        yield SimpleNamespace(outputs=[choice], finished=True, prompt_token_ids=[1, 2, 3], num_cached_tokens=0)


class Aborted(Exception):
    pass


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)


def make_service(engine: FakeEngine | None = None, cache: FeatureCache | None = None, **kwargs) -> LanguageService:
    description = dvd_pb2.ModelDescription(model="m", hidden_size=HIDDEN, max_images_per_request=3)
    return LanguageService(engine or FakeEngine(), FeatureStore(), ChatRenderer(TEMPLATE), description,
                           model_dtype=torch.float32, feature_timeout_s=5.0, cache=cache, **kwargs)


def make_request(images: int = 0, *, image_count: int | None = None, keys=(), request_id: str = "r1",
                 feature_timeout_s: float = 0.0) -> dvd_pb2.GenerateRequest:
    parts = [dvd_pb2.ContentPart(text="look")] + [dvd_pb2.ContentPart(image=True) for _ in range(images)]
    return dvd_pb2.GenerateRequest(
        request_id=request_id, messages=[dvd_pb2.ChatMessage(role="user", content=parts)],
        sampling=dvd_pb2.SamplingParams(max_tokens=2), image_count=images if image_count is None else image_count,
        image_keys=list(keys), feature_timeout_s=feature_timeout_s)


def features(index: int, count: int, request_id: str = "r1", rows: int = 4) -> ImageFeatures:
    return ImageFeatures(request_id, index, count, [rows], torch.full((rows, HIDDEN), float(index)))


def generate(service: LanguageService, request: dvd_pb2.GenerateRequest) -> list[dvd_pb2.GenerateResponse]:
    async def run():
        return [response async for response in service.Generate(request, FakeContext())]

    return asyncio.run(run())


@pytest.mark.parametrize("request_, message", [
    (make_request(2, image_count=1), "messages hold 2 images but image_count is 1"),
    (make_request(4), "4 images in one request; this server takes at most 3"),
    (make_request(2, keys=["a"]), "1 image keys for 2 images"),
    (make_request(1, keys=["k" * 129]), "each key must be 1 to 128 characters"),
    (make_request(1, feature_timeout_s=-1), "feature_timeout_s -1.0 is negative"),
], ids=["count", "limit", "key count", "key length", "timeout"])
def test_validation_names_what_is_wrong(request_, message):
    with pytest.raises(InvalidRequest, match=message):
        make_service().validate(request_)


def test_a_prompt_the_template_cannot_take_is_an_invalid_request():
    request = make_request()
    request.messages[0].role = "root"
    with pytest.raises(InvalidRequest, match="role 'root' is not one of"):
        asyncio.run(make_service().prompt_and_sampling(request))


def test_features_that_do_not_arrive_in_time_are_late():
    service = make_service()
    plan = service.plan_features([], 1)

    async def claim():
        await service.features("r1", 1, plan, [], timeout_s=0.01)

    with pytest.raises(FeaturesLate, match="only 0 of 1"):
        asyncio.run(claim())


@pytest.mark.parametrize("request_, prepare, code, message", [
    (make_request(request_id=""), None, grpc.StatusCode.INVALID_ARGUMENT, "is empty or already in flight"),
    (make_request(), lambda s: s._active.setdefault("r1", None), grpc.StatusCode.ALREADY_EXISTS, "already in flight"),
    (make_request(4), None, grpc.StatusCode.INVALID_ARGUMENT, "this server takes at most 3"),
    (make_request(1, feature_timeout_s=0.01), None, grpc.StatusCode.DEADLINE_EXCEEDED, "request r1: only 0 of 1"),
], ids=["no id", "id in flight", "too many images", "features late"])
def test_generate_maps_each_error_to_its_grpc_status(request_, prepare, code, message):
    service = make_service()
    if prepare:
        prepare(service)
    with pytest.raises(Aborted) as aborted:
        generate(service, request_)
    assert aborted.value.args[0] == code and message in aborted.value.args[1]


@pytest.mark.parametrize("error, code", [
    (ValueError("prompt longer than the context"), grpc.StatusCode.INVALID_ARGUMENT),
    (EngineDeadError(), grpc.StatusCode.UNAVAILABLE),
], ids=["vLLM refuses", "engine dead"])
def test_engine_failures_end_the_call_with_their_status(error, code):
    died = []
    service = make_service(FakeEngine(error), on_engine_dead=lambda: died.append(True))
    with pytest.raises(Aborted) as aborted:
        generate(service, make_request())
    assert aborted.value.args[0] == code
    assert died == ([True] if code == grpc.StatusCode.UNAVAILABLE else [])
    assert not service._active  # the request id is free again


def test_cached_repeated_and_sent_images_reach_the_engine_in_prompt_order_with_usage():
    cache = FeatureCache(1 << 20)
    cache.put("a", features(0, 3, request_id="earlier"))
    engine = FakeEngine()
    service = make_service(engine, cache)
    service._store.put(features(1, 3, rows=6))  # "b" is sent; the second "a" repeats the first

    responses = generate(service, make_request(3, keys=["a", "b", "a"]))

    assert list(responses[0].missing.image_indices) == [1]
    assert [r.text for r in responses[1:]] == ["hi"]
    usage = responses[-1].usage
    assert (usage.image_tokens, usage.cached_images, usage.completion_tokens) == (4 + 6 + 4, 1, 2)
    sent = engine.prompts[0]
    assert [t.shape[0] for t in sent["multi_modal_data"]["image"]] == [4, 6, 4]
    assert sent["multi_modal_uuids"] == {"image": ["a", "b", "a"]}
    assert cache.get("b") is not None  # kept for the next turn


def test_every_generate_error_has_a_status():
    from language_server.service import STATUS

    assert set(STATUS) == set(GenerateError.__subclasses__())
