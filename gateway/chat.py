"""One chat completion across the servers: Encode and Generate run concurrently under one request id.

The language server waits for the features that the vision server sends it directly; the gateway
only carries control messages. An Encode failure cancels the Generate; leaving early (client gone,
error) cancels both.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import grpc

from gateway.backends import BackendPool, LanguagePool
from gateway.errors import APIError, from_grpc
from gateway.images import decode_data_url
from gateway.schemas import ChatCompletionRequest
from gateway.settings import GatewaySettings
from proto import dvd_pb2

log = logging.getLogger(__name__)


@dataclass
class PreparedChat:
    request_id: str
    messages: list[dvd_pb2.ChatMessage]
    images: list[dvd_pb2.ImageInput]
    sampling: dvd_pb2.SamplingParams


def new_request_id() -> str:
    """Unguessable, so that nobody can claim another request's features."""
    return uuid.uuid4().hex


def prepare_chat(request: ChatCompletionRequest, settings: GatewaySettings) -> PreparedChat:
    """Validate and convert an OpenAI request; decodes base64 images (call it off the event loop)."""
    messages, images = [], []
    for message in request.messages:
        parts = []
        if isinstance(message.content, str) or message.content is None:
            parts.append(dvd_pb2.ContentPart(text=message.content or ""))
        else:
            for part in message.content:
                if part.type == "text":
                    parts.append(dvd_pb2.ContentPart(text=part.text))
                    continue
                if message.role != "user":
                    raise APIError(400, f"images are only accepted in user messages, not {message.role}",
                                   param="messages")
                if len(images) == settings.max_images_per_request:
                    raise APIError(400, f"more than {settings.max_images_per_request} images in one request",
                                   param="messages")
                data = decode_data_url(part.image_url.url, max_bytes=settings.max_image_bytes, index=len(images))
                max_tiles = 1 if part.image_url.detail == "low" else settings.max_tiles
                images.append(dvd_pb2.ImageInput(data=data, max_tiles=max_tiles))
                parts.append(dvd_pb2.ContentPart(image=True))
        messages.append(dvd_pb2.ChatMessage(role=message.role, content=parts))

    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    sampling = dvd_pb2.SamplingParams(
        max_tokens=request.max_completion_tokens or request.max_tokens or 0,
        stop=[request.stop] if isinstance(request.stop, str) else (request.stop or []),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
    )
    for name in ("temperature", "top_p", "seed"):
        if getattr(request, name) is not None:
            setattr(sampling, name, getattr(request, name))
    return PreparedChat(new_request_id(), messages, images, sampling)


async def _encode(vision: BackendPool, chat: PreparedChat, feature_endpoint: str, timeout_s: float):
    with vision.lease() as backend:
        request = dvd_pb2.EncodeRequest(request_id=chat.request_id, images=chat.images,
                                        feature_endpoint=feature_endpoint)
        try:
            return await backend.stub.Encode(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, f"vision server {backend.address}") from None


async def generate(vision: BackendPool, language: LanguagePool, chat: PreparedChat, timeout_s: float):
    """Yields the language server's `GenerateResponse`s; raises `APIError` on any failure."""
    described = await language.describe()
    with language.lease(described) as backend:
        call = backend.stub.Generate(
            dvd_pb2.GenerateRequest(request_id=chat.request_id, messages=chat.messages, sampling=chat.sampling,
                                    image_count=len(chat.images)),
            timeout=timeout_s,
        )
        encode = None
        if chat.images:
            encode = asyncio.create_task(_encode(vision, chat, backend.description.feature_endpoint, timeout_s))
        responses = call.__aiter__()
        try:
            while True:
                next_response = asyncio.ensure_future(responses.__anext__())
                if encode is not None and not encode.done():
                    await asyncio.wait({next_response, encode}, return_when=asyncio.FIRST_COMPLETED)
                    if encode.done() and encode.exception() is not None:
                        next_response.cancel()
                        raise encode.exception()
                try:
                    response = await next_response
                except StopAsyncIteration:
                    break
                except grpc.aio.AioRpcError as exc:
                    if encode is not None and encode.done() and encode.exception() is not None:
                        raise encode.exception() from None
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        backend.description = None  # a restarted server may listen for features elsewhere
                    raise from_grpc(exc, f"language server {backend.address}") from None
                if response.finish_reason and encode is not None:
                    _log_timings(chat.request_id, encode.result() if encode.done() else None, response)
                yield response
        finally:
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
