"""gRPC `LanguageService`: waits for a request's image features, then streams vLLM's output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError

from language_server import metrics
from language_server.feature_cache import FeatureCache
from language_server.feature_store import FeatureMismatch, FeatureOverCapacity, FeatureStore, FeatureTimeout
from language_server.output import Choices, OutputParsers, ToolsRequest
from language_server.prompt import ChatRenderer, PromptError, count_images, messages_to_dicts
from language_server.sampling import to_vllm_sampling, token_logprobs
from proto import dvd_pb2, dvd_pb2_grpc
from transport.frames import ImageFeatures

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 128  # content keys are hex digests
MAX_CACHE_SALT_LENGTH = 128  # what vLLM's own API takes (the gateway sends a 64-character hex digest)
CACHE_SALT_FORBIDDEN = frozenset("@/\\\0")


class FeatureError(ValueError):
    """Features that must not reach the engine (vLLM can crash on malformed embeddings)."""


def check_features(images: list[ImageFeatures], hidden_size: int) -> None:
    """Shape, dtype, hidden size and finiteness of every image's features, before vLLM sees them."""
    for item in images:
        f = item.features
        if f.dim() != 2 or f.shape[1] != hidden_size:
            raise FeatureError(
                f"image {item.image_index}: features of shape {tuple(f.shape)}, the model needs [tokens, {hidden_size}]"
            )
        if f.shape[0] == 0 or f.shape[0] != sum(item.tile_tokens):
            raise FeatureError(f"image {item.image_index}: {f.shape[0]} rows for tile tokens {item.tile_tokens}")
        if not f.dtype.is_floating_point:
            raise FeatureError(f"image {item.image_index}: features of dtype {f.dtype}")
        if not torch.isfinite(f).all():
            raise FeatureError(f"image {item.image_index}: features hold NaN or infinity")


class GenerateError(Exception):
    """Why a Generate call stops, in words for its caller; `Generate` alone turns it into a gRPC status (`STATUS`)."""


class InvalidRequest(GenerateError):
    """The request, its prompt, its sampling parameters or its features cannot be served."""


class RequestInFlight(GenerateError):
    """A call with the same request id is still running."""


class FeaturesLate(GenerateError):
    """Not every image's features arrived within the feature timeout."""


class FeatureMemoryFull(GenerateError):
    """The request's features were dropped: the feature store was full."""


class EngineDead(GenerateError):
    """vLLM's engine died; the server restarts."""


STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    RequestInFlight: grpc.StatusCode.ALREADY_EXISTS,
    FeaturesLate: grpc.StatusCode.DEADLINE_EXCEEDED,
    FeatureMemoryFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineDead: grpc.StatusCode.UNAVAILABLE,
}


@dataclass
class FeaturePlan:
    """Where each of a request's images comes from: held in the cache, to be sent, or a repeat of an earlier one."""

    held: dict[int, ImageFeatures] = field(default_factory=dict)
    needed: list[int] = field(default_factory=list)
    same_as: dict[int, int] = field(default_factory=dict)


@dataclass
class Images:
    """A request's image features in prompt order."""

    features: list[ImageFeatures] = field(default_factory=list)
    received: list[ImageFeatures] = field(default_factory=list)  # sent for this request; the rest were cached
    cached: int = 0


@dataclass
class Timeline:
    """One call's clock and token count: its timings and its latency metrics."""

    start: float
    features_ready: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int = 0

    def tokens(self, now: float, count: int) -> None:
        if count and self.first_token is None:
            self.first_token = now
            metrics.TTFT.observe(now - self.start)
        self.completion_tokens += count

    def timings(self, now: float, received: list[ImageFeatures]) -> dvd_pb2.GenerateTimings:
        first = self.first_token or now
        return dvd_pb2.GenerateTimings(
            feature_wait_ms=(self.features_ready - self.start) * 1e3,
            prefill_ms=(first - self.features_ready) * 1e3,
            decode_ms=(now - first) * 1e3,
            transfer_ms=max((i.received_unix_ns - i.sent_unix_ns for i in received), default=0) / 1e6,
        )

    def observe(self) -> None:
        if self.first_token is None:
            return
        metrics.PREFILL.observe(self.first_token - self.features_ready)
        metrics.DECODE.observe(self.last_token - self.first_token)
        metrics.E2E.observe(self.last_token - self.start)
        if self.completion_tokens > 1:
            metrics.TPOT.observe((self.last_token - self.first_token) / (self.completion_tokens - 1))


class LanguageService(dvd_pb2_grpc.LanguageServiceServicer):
    def __init__(self, engine, store: FeatureStore, renderer: ChatRenderer, description: dvd_pb2.ModelDescription,
                 *, model_dtype: torch.dtype, feature_timeout_s: float, cache: FeatureCache | None = None,
                 on_engine_dead=lambda: None, parsers: OutputParsers | None = None, vocab_size: int | None = None):
        self._engine = engine
        self._store = store
        self._cache = cache
        self._renderer = renderer
        self._description = description
        self._model_dtype = model_dtype
        self._feature_timeout_s = feature_timeout_s
        self._active: dict[str, asyncio.Task] = {}
        self.peak_in_flight = 0
        self._on_engine_dead = on_engine_dead
        self._parsers = parsers  # None: no tools, no thinking split (tests with a fake engine)
        self._vocab_size = vocab_size

    async def Generate(self, request: dvd_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        # aclosing: a hang-up that lands while gRPC writes a response closes this generator (GeneratorExit
        # at the yield) rather than cancelling an await; the inner generators, and vLLM's request with them,
        # must then end now, not whenever the garbage collector gets to them.
        try:
            async with contextlib.aclosing(self._tracked(request)) as responses:
                async for response in responses:
                    yield response
        except GenerateError as exc:
            await context.abort(STATUS[type(exc)], str(exc))

    async def _tracked(self, request: dvd_pb2.GenerateRequest):
        """`_generate` under its request id (for `Abort`), counted in the metrics; its features released after."""
        rid = request.request_id
        if not rid or rid in self._active:
            raise (RequestInFlight if rid else InvalidRequest)(f"request id {rid!r} is empty or already in flight")
        self._active[rid] = asyncio.current_task()
        metrics.IN_FLIGHT.inc()
        if len(self._active) > self.peak_in_flight:
            self.peak_in_flight = len(self._active)
            metrics.IN_FLIGHT_PEAK.set(self.peak_in_flight)
        outcome = "error"
        try:
            async with contextlib.aclosing(self._generate(request)) as responses:
                async for response in responses:
                    yield response
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(outcome).inc()
            self._active.pop(rid, None)
            self._store.release(rid)

    async def _generate(self, request: dvd_pb2.GenerateRequest):
        """The call's steps; each raises a `GenerateError` to stop it."""
        timeline = Timeline(start=time.perf_counter())
        image_count, keys, timeout_s = self.validate(request)
        prompt, sampling, tools = await self.prompt_and_sampling(request)
        plan = self.plan_features(keys, image_count)
        if keys:  # the gateway has the vision server encode and send only these
            yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=plan.needed))
        images = await self.features(request.request_id, image_count, plan, keys, timeout_s)
        timeline.features_ready = time.perf_counter()
        metrics.FEATURE_WAIT.observe(timeline.features_ready - timeline.start)
        engine_prompt = self.engine_prompt(prompt, images, keys, request.cache_salt)
        choices = self._parsers.choices(tools, request.enable_thinking) if self._parsers else None
        async with contextlib.aclosing(self.run_engine(engine_prompt, sampling, request.request_id)) as outputs:
            async for output in outputs:
                for response in self.responses(output, request.sampling.top_logprobs, images, timeline, choices):
                    yield response
        timeline.observe()

    def validate(self, request: dvd_pb2.GenerateRequest) -> tuple[int, list[str], float]:
        """The request's image count, content keys and feature timeout, each checked against the others and
        this server's limits."""
        image_count = count_images(request.messages)
        if image_count != request.image_count:
            raise InvalidRequest(f"messages hold {image_count} images but image_count is {request.image_count}")
        limit = self._description.max_images_per_request
        if image_count > limit:
            raise InvalidRequest(f"{image_count} images in one request; this server takes at most {limit}")
        keys = list(request.image_keys)
        if keys and (len(keys) != image_count or not all(0 < len(k) <= MAX_KEY_LENGTH for k in keys)):
            raise InvalidRequest(f"{len(keys)} image keys for {image_count} images; each key must be 1 to "
                                 f"{MAX_KEY_LENGTH} characters")
        timeout_s = request.feature_timeout_s or self._feature_timeout_s
        if image_count and timeout_s < 0:
            raise InvalidRequest(f"feature_timeout_s {timeout_s} is negative")
        if len(request.cache_salt) > MAX_CACHE_SALT_LENGTH or set(request.cache_salt) & CACHE_SALT_FORBIDDEN:
            raise InvalidRequest(f"cache_salt must be at most {MAX_CACHE_SALT_LENGTH} characters, none of "
                                 f"{' '.join(sorted(map(repr, CACHE_SALT_FORBIDDEN)))}")
        return image_count, keys, timeout_s

    async def prompt_and_sampling(self, request: dvd_pb2.GenerateRequest
                                  ) -> tuple[str, SamplingParams, ToolsRequest | None]:
        """The chat template's prompt, vLLM's sampling parameters and the request's tools (None: no tools)."""
        try:
            tools = self.tools(request)
            prompt = self._renderer.render(messages_to_dicts(request.messages),
                                           tools=tools.tool_dicts if tools else None)
            structured = request.sampling.json_schema or request.sampling.json_object or (tools and tools.json_schema)
            # Compiling a JSON schema may take a while: not on the event loop.
            sampling = await asyncio.to_thread(to_vllm_sampling, request.sampling, tools, self._vocab_size) \
                if structured else to_vllm_sampling(request.sampling, tools, self._vocab_size)
        except (PromptError, ValueError, TypeError, VLLMClientError) as exc:
            raise InvalidRequest(str(exc)) from None
        return prompt, sampling, tools

    def tools(self, request: dvd_pb2.GenerateRequest) -> ToolsRequest | None:
        """The request's tools as vLLM's tool parser takes them; None without tools."""
        if not request.HasField("tools"):
            return None
        if self._parsers is None:
            raise ValueError("this server has no tool call parser")
        return self._parsers.tools_request(request.tools)

    def plan_features(self, keys: list[str], image_count: int) -> FeaturePlan:
        """Split a request's images by content key into those held here, those to be sent (the first of
        each missing key), and repeats of an earlier image of the same request; without keys, all are sent."""
        if not keys:
            return FeaturePlan(needed=list(range(image_count)))
        plan, first = FeaturePlan(), {}
        for index, key in enumerate(keys):
            if key in first:
                plan.same_as[index] = first[key]
                continue
            first[key] = index
            item = self._cache.get(key) if self._cache is not None else None
            if item is None:
                plan.needed.append(index)
                metrics.FEATURE_CACHE.labels("miss").inc()
            else:
                plan.held[index] = item
                metrics.FEATURE_CACHE.labels("hit").inc()
                metrics.FEATURE_CACHE_BYTES_SAVED.inc(item.num_bytes)
        return plan

    async def features(self, rid: str, image_count: int, plan: FeaturePlan, keys: list[str],
                       timeout_s: float) -> Images:
        """Wait for the features sent for this request, check them, keep them in the cache by key, and put
        every image in prompt order."""
        try:
            received = await self._store.claim(rid, image_count, timeout_s, plan.needed) if plan.needed else []
            check_features(received, self._description.hidden_size)
        except FeatureTimeout as exc:
            raise FeaturesLate(f"request {rid}: {exc}") from None
        except FeatureOverCapacity as exc:
            raise FeatureMemoryFull(f"request {rid}: {exc}") from None
        except (FeatureMismatch, FeatureError) as exc:
            raise InvalidRequest(f"request {rid}: {exc}") from None
        by_index = {**plan.held, **dict(zip(plan.needed, received))}
        if keys and self._cache is not None:
            for index, item in zip(plan.needed, received):
                self._cache.put(keys[index], item)
        return Images([by_index[plan.same_as.get(i, i)] for i in range(image_count)], received, len(plan.held))

    def engine_prompt(self, prompt: str, images: Images, keys: list[str], cache_salt: str = "") -> dict:
        """vLLM's input: the prompt, each image's features in the model's dtype, their content keys, and the
        prefix cache's salt (vLLM hashes it into the prompt's first block: other salts find none of its blocks)."""
        engine_prompt: dict = {"prompt": prompt}
        if cache_salt:
            engine_prompt["cache_salt"] = cache_salt
        if images.features:
            engine_prompt["multi_modal_data"] = {"image": [i.features.to(self._model_dtype) for i in images.features]}
            if keys:  # the image's identity for vLLM's prefix cache, instead of hashing its features
                engine_prompt["multi_modal_uuids"] = {"image": keys}
        return engine_prompt

    async def run_engine(self, engine_prompt: dict, sampling: SamplingParams, rid: str):
        """vLLM's outputs for the request; vLLM refusing its input, or dying, stops the call."""
        try:
            async for output in self._engine.generate(engine_prompt, sampling, rid):
                yield output
        except (ValueError, VLLMClientError) as exc:  # vLLM's input checks, e.g. a prompt over the context
            raise InvalidRequest(f"request {rid}: {exc}") from None
        except EngineDeadError:
            self._on_engine_dead()
            raise EngineDead("the language engine died; this server is restarting") from None

    @staticmethod
    def responses(output, top_logprobs: int, images: Images, timeline: Timeline,
                  choices: Choices | None = None) -> list[dvd_pb2.GenerateResponse]:
        """One vLLM output as responses, one per choice it advances (its text split into content, reasoning
        and tool calls by `choices`, when given); the last output's last response also carries the usage and
        the timings."""
        now = time.perf_counter()
        responses = []
        for completion in output.outputs:  # with n > 1, deltas of one or more choices
            timeline.tokens(now, len(completion.token_ids))
            finish_reason = (completion.finish_reason or "stop") if completion.finished() else ""
            response = dvd_pb2.GenerateResponse(
                index=completion.index,
                text=completion.text,
                token_ids=completion.token_ids,
                logprobs=token_logprobs(completion.token_ids, completion.logprobs, top_logprobs),
                finish_reason=finish_reason,
            )
            if choices is not None:
                choices.split(response, list(completion.token_ids))
            responses.append(response)
        timeline.last_token = now
        if output.finished:
            prompt_tokens, cached_tokens = len(output.prompt_token_ids or []), output.num_cached_tokens or 0
            metrics.PROMPT_TOKENS.inc(prompt_tokens)
            metrics.CACHED_PROMPT_TOKENS.inc(cached_tokens)
            if not responses:
                responses.append(dvd_pb2.GenerateResponse())
            last = responses[-1]
            last.usage.CopyFrom(dvd_pb2.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=timeline.completion_tokens,
                image_tokens=sum(i.features.shape[0] for i in images.features), cached_tokens=cached_tokens,
                cached_images=images.cached))
            last.timings.CopyFrom(timeline.timings(now, images.received))
        return responses

    async def Abort(self, request: dvd_pb2.AbortRequest, context) -> dvd_pb2.AbortResponse:
        task = self._active.get(request.request_id)
        self._store.release(request.request_id)
        if task is None:
            return dvd_pb2.AbortResponse(found=False)
        task.cancel()  # vLLM aborts the request when its generate() is cancelled
        return dvd_pb2.AbortResponse(found=True)

    async def Health(self, request, context) -> dvd_pb2.HealthResponse:
        ready = not getattr(self._engine, "errored", False)
        return dvd_pb2.HealthResponse(ready=ready, model=self._description.model)

    async def Describe(self, request, context) -> dvd_pb2.ModelDescription:
        return self._description
