"""One chat completion across the servers: Encode and Generate run concurrently under one request id.

The language server waits for the features that the vision server sends it directly; the gateway
only carries control messages. An Encode failure cancels the Generate; leaving early (client gone,
error) cancels both. A server that cannot be reached before it produced anything is ejected and the
call goes to another server of its kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import grpc

from contracts.content_keys import content_key, frame_keys
from gateway import metrics
from gateway.backends import Backend, LanguagePool, VisionPool
from gateway.errors import APIError, from_grpc
from gateway.images import ImageFetcher, decode_data_url, decode_video_data_url
from gateway.reasoning import R1_SYSTEM_PROMPT
from gateway.schemas import ChatCompletionRequest, JSONObjectFormat, JSONSchemaResponseFormat
from gateway.settings import GatewaySettings
from proto import dvd_pb2

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "ignore_eos")


@dataclass
class ImageSource:
    url: str
    max_tiles: int
    video_frames: int = 0  # a video: this many frames, each counted as one image

    @property
    def images(self) -> int:
        return self.video_frames or 1


@dataclass
class PreparedChat:
    request_id: str
    model: str
    messages: list[dvd_pb2.ChatMessage]
    sources: list[ImageSource]
    sampling: dvd_pb2.SamplingParams
    thinking: bool = False
    images: list[dvd_pb2.ImageInput] = field(default_factory=list)  # one per source
    image_keys: list[str] = field(default_factory=list)  # one per image (video frame); empty: no feature cache

    @property
    def n(self) -> int:
        return self.sampling.n or 1

    @property
    def image_count(self) -> int:
        """Images the language server waits for: every video frame is one."""
        return sum(source.images for source in self.sources)


def _thinking(request: ChatCompletionRequest) -> bool:
    kwargs = request.chat_template_kwargs or {}
    unknown = set(kwargs) - {"enable_thinking"}
    if unknown:
        raise APIError(400, f"chat_template_kwargs: only enable_thinking is supported, got {sorted(unknown)}",
                       param="chat_template_kwargs")
    if not isinstance(kwargs.get("enable_thinking", False), bool):
        raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                       param="chat_template_kwargs")
    return kwargs.get("enable_thinking", False)


def _sampling(request: ChatCompletionRequest, settings: GatewaySettings) -> dvd_pb2.SamplingParams:
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if request.n > settings.max_n:
        raise APIError(400, f"n={request.n} is more than the {settings.max_n} choices this server allows", param="n")
    if request.n > 1 and request.temperature == 0:
        raise APIError(400, "n > 1 needs sampling: with temperature 0 every choice would be the same",
                       param="n")
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise APIError(400, "stop takes up to 16 non-empty strings", param="stop")
    sampling = dvd_pb2.SamplingParams(
        max_tokens=request.max_completion_tokens or request.max_tokens or 0,
        stop=stop,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
        n=request.n,
    )
    for name in SAMPLING_FIELDS:
        if getattr(request, name) is not None:
            setattr(sampling, name, getattr(request, name))
    if isinstance(request.response_format, JSONObjectFormat):
        sampling.json_object = True
    elif isinstance(request.response_format, JSONSchemaResponseFormat):
        sampling.json_schema = json.dumps(request.response_format.json_schema.schema_)
    return sampling


def prepare_chat(request: ChatCompletionRequest, settings: GatewaySettings, request_id: str) -> PreparedChat:
    """Validate and convert an OpenAI request; image bytes are loaded later by `load_images`."""
    thinking = _thinking(request)
    messages, sources = [], []
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        parts = []
        if isinstance(message.content, str) or message.content is None:
            parts.append(dvd_pb2.ContentPart(text=message.content or ""))
        else:
            for part in message.content:
                if part.type == "text":
                    parts.append(dvd_pb2.ContentPart(text=part.text))
                    continue
                if role != "user":
                    raise APIError(400, f"images are only accepted in user messages, not {message.role}",
                                   param="messages")
                if part.type == "video_url":  # "Frame1: <image>\nFrame2: <image>\n...", as the model card does
                    source = ImageSource(part.video_url.url, 1, part.video_url.num_frames or settings.video_frames)
                    for frame in range(source.video_frames):
                        parts += [dvd_pb2.ContentPart(text=f"Frame{frame + 1}: "), dvd_pb2.ContentPart(image=True)]
                else:
                    max_tiles = 1 if part.image_url.detail == "low" else settings.max_tiles
                    source = ImageSource(part.image_url.url, max_tiles)
                    parts.append(dvd_pb2.ContentPart(image=True))
                sources.append(source)
        messages.append(dvd_pb2.ChatMessage(role=role, content=parts))
    if thinking:  # the model card's way: the R1 prompt as the system prompt, the request's own after it
        if messages[0].role == "system":
            messages[0].content.insert(0, dvd_pb2.ContentPart(text=R1_SYSTEM_PROMPT + "\n\n"))
        else:
            messages.insert(0, dvd_pb2.ChatMessage(role="system", content=[dvd_pb2.ContentPart(text=R1_SYSTEM_PROMPT)]))
    return PreparedChat(request_id, request.model, messages, sources, _sampling(request, settings), thinking)


async def load_images(chat: PreparedChat, settings: GatewaySettings, fetcher: ImageFetcher,
                      vision_weights: str = "") -> None:
    """Decode data URLs (in threads) and download http(s) URLs, all of a request's images at once; with the
    feature cache on, name each by content (`vision_weights`: the vision pool's weights fingerprint)."""

    async def load(index: int, source: ImageSource) -> dvd_pb2.ImageInput:
        if source.video_frames:
            data = await asyncio.to_thread(decode_video_data_url, source.url, max_bytes=settings.max_video_bytes,
                                           index=index)
            return dvd_pb2.ImageInput(data=data, video_frames=source.video_frames)
        if source.url.startswith("data:"):
            data = await asyncio.to_thread(decode_data_url, source.url, max_bytes=settings.max_image_bytes,
                                           index=index)
        elif source.url.startswith(("http://", "https://")):
            data = await fetcher.fetch(source.url, index=index)
        else:
            raise APIError(400, f"image {index}: only data:, http: and https: image URLs are supported, "
                                f"got {source.url[:40]!r}", param="messages")
        return dvd_pb2.ImageInput(data=data, max_tiles=source.max_tiles)

    tasks = [asyncio.ensure_future(load(i, s)) for i, s in enumerate(chat.sources)]
    try:
        chat.images = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # the first failure ends the others
            task.cancel()
    if settings.feature_cache and chat.images:
        chat.image_keys = await asyncio.to_thread(content_keys, chat.model, vision_weights, chat.images)


def content_keys(model: str, weights: str, images: list[dvd_pb2.ImageInput]) -> list[str]:
    """One key per image (video frame): the model, the vision weights, and everything of the input that
    changes its features."""
    keys = []
    for image in images:
        keys += frame_keys(content_key(image.data, model, weights, image.max_tiles, image.video_frames),
                           image.video_frames)
    return keys


def _inputs_for(chat: PreparedChat, indices) -> list[dvd_pb2.ImageInput]:
    """The inputs holding the images `indices`, each told where its first image sits in the request."""
    wanted, inputs, first = set(indices), [], 0
    for source, image in zip(chat.sources, chat.images):
        if wanted & set(range(first, first + source.images)):
            selected = dvd_pb2.ImageInput()
            selected.CopyFrom(image)
            selected.image_index = first
            inputs.append(selected)
        first += source.images
    return inputs


ENCODE_REPLY_GRACE_S = 5.0


def _unavailable(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAVAILABLE


async def _encode(vision: VisionPool, request_id: str, images, feature_endpoint: str, timeout_s: float,
                  image_count: int = 0):
    tried: set[str] = set()
    while True:
        with vision.lease(vision.candidates(exclude=tried)) as backend:
            request = dvd_pb2.EncodeRequest(request_id=request_id, images=images, feature_endpoint=feature_endpoint,
                                            image_count=image_count)
            try:
                reply = await backend.stub.Encode(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                metrics.BACKEND_REQUESTS.labels("vision", backend.address, exc.code().name.lower()).inc()
                error = from_grpc(exc, f"vision server {backend.address}")
                if not _unavailable(exc):
                    raise error from None
                # Unreachable: nothing, or a duplicate the language server drops, was sent. Try another.
                backend.mark_down(exc.details() or "unavailable")
                tried.add(backend.address)
                if not vision.candidates(exclude=tried):
                    raise error from None
                log.warning("request %s: vision server %s unavailable; retrying Encode on another", request_id,
                            backend.address)
                continue
            metrics.BACKEND_REQUESTS.labels("vision", backend.address, "ok").inc()
            return reply


class _Unreachable(Exception):
    """The language server failed before producing anything: the request may go elsewhere."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


def accepting(servers: list[Backend], chat: PreparedChat) -> list[Backend]:
    """The language servers that take the request's images, by the limit each advertises (`Describe`); a 400
    naming the limit when none does. The gateway keeps no limit of its own: the language server's is the rule."""
    fits = [b for b in servers if chat.image_count <= b.description.max_images_per_request]
    if servers and not fits:
        limit = max(b.description.max_images_per_request for b in servers)
        raise APIError(400, f"{chat.image_count} images in one request; the language server takes at most {limit} "
                            "(each video frame counts as one)", param="messages")
    return fits


async def generate(vision: VisionPool, language: LanguagePool, chat: PreparedChat, timeout_s: float,
                   max_extra_load: int = 0):
    """Yields the language servers' `GenerateResponse`s; raises `APIError` on any failure."""
    tried: set[str] = set()
    while True:
        described = accepting([b for b in await language.describe() if b.address not in tried], chat)
        if not described:
            raise APIError(503, "no language server is available")
        with language.lease(described, prefer=language.holders.best(chat.image_keys),
                            max_extra_load=max_extra_load) as backend:
            # A retry gets its own id: the first server may still hold features under the first one.
            request_id = chat.request_id if not tried else f"{chat.request_id}-{len(tried)}"
            try:
                async for response in _generate_on(backend, vision, chat, request_id, timeout_s):
                    yield response
                language.holders.record(chat.image_keys, backend.address)
                return
            except _Unreachable as exc:
                backend.mark_down(exc.error.message)
                tried.add(backend.address)
                if not language.candidates(exclude=tried):
                    raise exc.error from None
                log.warning("request %s: language server %s unavailable; retrying on another", chat.request_id,
                            backend.address)


async def _generate_on(backend: Backend, vision: VisionPool, chat: PreparedChat, request_id: str, timeout_s: float):
    call = backend.stub.Generate(
        dvd_pb2.GenerateRequest(request_id=request_id, messages=chat.messages, sampling=chat.sampling,
                                image_count=chat.image_count, image_keys=chat.image_keys),
        timeout=timeout_s,
    )

    def start_encode(images: list[dvd_pb2.ImageInput], image_count: int = 0) -> asyncio.Future:
        return asyncio.ensure_future(
            _encode(vision, request_id, images, backend.description.feature_endpoint, timeout_s, image_count))

    # Without content keys Encode starts at once; with them, once the server has said what it lacks.
    encode = None
    if chat.images and not chat.image_keys:
        encode = start_encode(chat.images)
        metrics.IMAGES.labels("vision").inc(chat.image_count)
    responses = call.__aiter__()
    produced, outcome = False, "cancelled"
    try:
        while True:
            next_response = asyncio.ensure_future(responses.__anext__())
            if encode is not None and not encode.done():
                await asyncio.wait({next_response, encode}, return_when=asyncio.FIRST_COMPLETED)
                if encode.done() and encode.exception() is not None:
                    next_response.cancel()
                    outcome = "encode_failed"
                    raise encode.exception()
            try:
                response = await next_response
            except StopAsyncIteration:
                break
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name.lower()
                if encode is not None and encode.done() and encode.exception() is not None:
                    raise encode.exception() from None
                error = from_grpc(exc, f"language server {backend.address}")
                if _unavailable(exc) and not produced:
                    raise _Unreachable(error) from None
                if _unavailable(exc):
                    backend.mark_down(exc.details() or "unavailable")
                raise error from None
            if response.HasField("missing"):
                missing = response.missing.image_indices
                inputs = _inputs_for(chat, missing)
                if inputs:
                    encode = start_encode(inputs, chat.image_count)
                metrics.IMAGES.labels("vision").inc(len(missing))
                metrics.IMAGES.labels("cache").inc(chat.image_count - len(missing))
                continue
            produced = True
            if response.HasField("usage") and encode is not None:
                _log_timings(request_id, encode.result() if encode.done() else None, response)
            yield response
        outcome = "ok"
        if encode is not None and not encode.done():
            # Generation ended, so every feature arrived and the Encode reply is moments behind: let it land
            # rather than cancel a call that has done its work (and leave it uncounted).
            await asyncio.wait({encode}, timeout=ENCODE_REPLY_GRACE_S)
    finally:
        metrics.BACKEND_REQUESTS.labels("language", backend.address, outcome).inc()
        if encode is not None and not encode.done():
            encode.cancel()
        if not call.done():
            call.cancel()  # the language server cancels its task and vLLM aborts the request


def _log_timings(request_id: str, encoded: dvd_pb2.EncodeResponse | None, last: dvd_pb2.GenerateResponse) -> None:
    e = encoded.timings if encoded else dvd_pb2.EncodeTimings()
    t = last.timings
    log.info("request %s: preprocess %.1f ms, encode %.1f ms, send %.1f ms, transfer %.1f ms, feature wait %.1f ms, "
             "prefill %.1f ms, decode %.1f ms", request_id, e.preprocess_ms, e.encode_ms, e.send_ms,
             t.transfer_ms, t.feature_wait_ms, t.prefill_ms, t.decode_ms)
