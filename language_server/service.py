"""gRPC `LanguageService`: waits for a request's image features, then streams vLLM's output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import grpc
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.exceptions import EngineDeadError

from language_server import metrics
from language_server.feature_cache import FeatureCache
from language_server.feature_store import FeatureMismatch, FeatureOverCapacity, FeatureStore, FeatureTimeout
from language_server.prompt import ChatRenderer, PromptError, count_images, messages_to_dicts
from proto import dvd_pb2, dvd_pb2_grpc
from transport.frames import ImageFeatures

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 128  # content keys are hex digests


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


def compact_json_grammar(schema: str) -> str:
    """The grammar of JSON matching `schema`, written without whitespace.

    vLLM's own JSON mode lets whitespace go between any two tokens unless the whole engine is set
    otherwise, and a weak model can then emit whitespace until max_tokens; so the schema is compiled
    here, per request, with xgrammar (vLLM's default structured-output backend), whitespace off.
    """
    import xgrammar

    try:
        json.loads(schema)
        return str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    except RuntimeError as exc:  # xgrammar's message names the unsupported part of the schema
        raise ValueError(f"json_schema cannot be used: {str(exc).rsplit(': ', 1)[-1]}") from None


def to_vllm_sampling(params: dvd_pb2.SamplingParams) -> SamplingParams:
    kwargs = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        if params.HasField(name):
            kwargs[name] = getattr(params, name)
    if params.json_schema or params.json_object:
        kwargs["structured_outputs"] = StructuredOutputsParams(
            grammar=compact_json_grammar(params.json_schema or '{"type": "object"}'))
    return SamplingParams(
        n=params.n or 1,
        max_tokens=params.max_tokens or None,
        stop=list(params.stop) or None,
        logprobs=params.top_logprobs if params.logprobs else None,
        ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        **kwargs,
    )


def _token_logprobs(token_ids, logprobs, top_n: int) -> list[dvd_pb2.TokenLogprob]:
    """vLLM's per-token candidates (the top `top_n` plus the sampled token) as proto messages."""
    result = []
    for token_id, candidates in zip(token_ids, logprobs or []):
        chosen = candidates[token_id]
        ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank)[:top_n]
        result.append(
            dvd_pb2.TokenLogprob(
                token_id=token_id,
                token=chosen.decoded_token or "",
                logprob=chosen.logprob,
                top=[dvd_pb2.TopLogprob(token_id=t, token=c.decoded_token or "", logprob=c.logprob) for t, c in ranked],
            )
        )
    return result


class LanguageService(dvd_pb2_grpc.LanguageServiceServicer):
    def __init__(self, engine, store: FeatureStore, renderer: ChatRenderer, description: dvd_pb2.ModelDescription,
                 *, model_dtype: torch.dtype, feature_timeout_s: float, cache: FeatureCache | None = None,
                 on_engine_dead=lambda: None):
        self._engine = engine
        self._store = store
        self._cache = cache
        self._renderer = renderer
        self._description = description
        self._model_dtype = model_dtype
        self._feature_timeout_s = feature_timeout_s
        self._active: dict[str, asyncio.Task] = {}
        self._on_engine_dead = on_engine_dead

    async def Generate(self, request: dvd_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        if not rid or rid in self._active:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS if rid else grpc.StatusCode.INVALID_ARGUMENT,
                                f"request id {rid!r} is empty or already in flight")
        self._active[rid] = asyncio.current_task()
        metrics.IN_FLIGHT.inc()
        outcome = "error"
        try:
            # aclosing: a hang-up that lands while gRPC writes a response closes this generator (GeneratorExit
            # at the yield) rather than cancelling an await; the inner generator, and vLLM's request with it,
            # must then end now, not whenever the garbage collector gets to it.
            async with contextlib.aclosing(self._generate(request, context)) as responses:
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

    async def _generate(self, request: dvd_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        start = time.perf_counter()
        image_count = count_images(request.messages)
        if image_count != request.image_count:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"messages hold {image_count} images but image_count is {request.image_count}")
        limit = self._description.max_images_per_request
        if image_count > limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{image_count} images in one request; this server takes at most {limit}")
        try:
            prompt = self._renderer.render(messages_to_dicts(request.messages))
            structured = request.sampling.json_schema or request.sampling.json_object
            # Compiling a JSON schema may take a while: not on the event loop.
            sampling = await asyncio.to_thread(to_vllm_sampling, request.sampling) if structured else \
                to_vllm_sampling(request.sampling)
        except (PromptError, ValueError, TypeError, VLLMClientError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        keys = list(request.image_keys)
        if keys and (len(keys) != image_count or not all(0 < len(k) <= MAX_KEY_LENGTH for k in keys)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(keys)} image keys for {image_count} "
                                f"images; each key must be 1 to {MAX_KEY_LENGTH} characters")
        images: list[ImageFeatures] = []
        received: list[ImageFeatures] = []  # sent for this request; the rest came from the cache
        cached_images = 0
        if image_count:
            timeout_s = request.feature_timeout_s or self._feature_timeout_s
            if timeout_s < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"feature_timeout_s {timeout_s} is negative")
            held, needed, same_as = self._lookup(keys) if keys else ({}, list(range(image_count)), {})
            cached_images = len(held)
            if keys:
                yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=needed))
            try:
                received = await self._store.claim(rid, image_count, timeout_s, needed) if needed else []
                check_features(received, self._description.hidden_size)
            except FeatureTimeout as exc:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid}: {exc}")
            except FeatureOverCapacity as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request {rid}: {exc}")
            except (FeatureMismatch, FeatureError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {exc}")
            for index, item in zip(needed, received):
                held[index] = item
                if keys and self._cache is not None:
                    self._cache.put(keys[index], item)
            images = [held[same_as.get(i, i)] for i in range(image_count)]
        features_ready = time.perf_counter()
        metrics.FEATURE_WAIT.observe(features_ready - start)

        engine_prompt: dict = {"prompt": prompt}
        if images:
            engine_prompt["multi_modal_data"] = {"image": [i.features.to(self._model_dtype) for i in images]}
            if keys:  # the image's identity for vLLM's prefix cache, instead of hashing its features
                engine_prompt["multi_modal_uuids"] = {"image": keys}
        completion_tokens = 0
        first_token = last_token = None
        try:
            async for output in self._engine.generate(engine_prompt, sampling, rid):
                now = time.perf_counter()
                responses = []
                for completion in output.outputs:  # with n > 1, deltas of one or more choices
                    if completion.token_ids and first_token is None:
                        first_token = now
                        metrics.TTFT.observe(now - start)
                    completion_tokens += len(completion.token_ids)
                    responses.append(dvd_pb2.GenerateResponse(
                        index=completion.index,
                        text=completion.text,
                        token_ids=completion.token_ids,
                        logprobs=_token_logprobs(completion.token_ids, completion.logprobs,
                                                 request.sampling.top_logprobs),
                        finish_reason=(completion.finish_reason or "stop") if completion.finished() else "",
                    ))
                last_token = now
                if output.finished:
                    if not responses:
                        responses.append(dvd_pb2.GenerateResponse())
                    responses[-1].usage.CopyFrom(dvd_pb2.Usage(
                        prompt_tokens=len(output.prompt_token_ids or []),
                        completion_tokens=completion_tokens,
                        image_tokens=sum(i.features.shape[0] for i in images),
                        cached_tokens=output.num_cached_tokens or 0,
                        cached_images=cached_images,
                    ))
                    metrics.PROMPT_TOKENS.inc(len(output.prompt_token_ids or []))
                    metrics.CACHED_PROMPT_TOKENS.inc(output.num_cached_tokens or 0)
                    first = first_token or now
                    responses[-1].timings.CopyFrom(dvd_pb2.GenerateTimings(
                        feature_wait_ms=(features_ready - start) * 1e3,
                        prefill_ms=(first - features_ready) * 1e3,
                        decode_ms=(now - first) * 1e3,
                        transfer_ms=max((i.received_unix_ns - i.sent_unix_ns for i in received), default=0) / 1e6,
                    ))
                for response in responses:
                    yield response
        except (ValueError, VLLMClientError) as exc:  # vLLM's input checks, e.g. a prompt over the context
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {exc}")
        except EngineDeadError:
            self._on_engine_dead()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the language engine died; this server is restarting")
        if first_token is not None:
            metrics.PREFILL.observe(first_token - features_ready)
            metrics.DECODE.observe(last_token - first_token)
            metrics.E2E.observe(last_token - start)
            if completion_tokens > 1:
                metrics.TPOT.observe((last_token - first_token) / (completion_tokens - 1))

    def _lookup(self, keys: list[str]) -> tuple[dict[int, ImageFeatures], list[int], dict[int, int]]:
        """Split a request's images by content key into those held here, those to be sent (the first of
        each missing key), and repeats of an earlier image of the same request."""
        held, needed, same_as, first = {}, [], {}, {}
        for index, key in enumerate(keys):
            if key in first:
                same_as[index] = first[key]
                continue
            first[key] = index
            item = self._cache.get(key) if self._cache is not None else None
            if item is None:
                needed.append(index)
                metrics.FEATURE_CACHE.labels("miss").inc()
            else:
                held[index] = item
                metrics.FEATURE_CACHE.labels("hit").inc()
                metrics.FEATURE_CACHE_BYTES_SAVED.inc(item.num_bytes)
        return held, needed, same_as

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
