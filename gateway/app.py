"""FastAPI app: OpenAI-compatible `/v1/chat/completions` and `/v1/models`, `/health`, `/metrics`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePath

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import metrics
from gateway.backends import LanguagePool, VisionPool, healthy
from gateway.chat import PreparedChat, generate, prepare_chat
from gateway.errors import APIError
from gateway.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from gateway.settings import GatewaySettings
from proto import dvd_pb2

log = logging.getLogger(__name__)


def _usage(usage: dvd_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 total_tokens=usage.prompt_tokens + usage.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(image_tokens=usage.image_tokens))


def _logprobs(response: dvd_pb2.GenerateResponse) -> list[TokenLogprob]:
    def entry(cls, item, **extra):
        return cls(token=item.token, logprob=item.logprob, bytes=list(item.token.encode()), **extra)

    return [entry(TokenLogprob, t, top_logprobs=[entry(TopLogprob, c) for c in t.top]) for t in response.logprobs]


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.vision = VisionPool(settings.vision_servers)
        app.state.language = LanguagePool(settings.language_servers)
        yield
        await app.state.vision.close()
        await app.state.language.close()

    app = FastAPI(title="DvD gateway", lifespan=lifespan)

    async def served_model_name() -> str:
        if settings.served_model_name:
            return settings.served_model_name
        described = await app.state.language.describe()
        if not described:
            raise APIError(503, "no language server is available")
        return PurePath(described[0].description.model).name

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.REQUESTS.labels(str(exc.status)).inc()
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return await api_error(request, APIError(400, message, param=where))

    @app.get("/health")
    async def health():
        checks = [healthy(b) for b in app.state.vision.backends + app.state.language.backends]
        results = await asyncio.gather(*checks)
        vision_up = sum(results[: len(app.state.vision.backends)])
        language_up = sum(results[len(app.state.vision.backends):])
        status = 200 if vision_up and language_up else 503
        return JSONResponse({"vision_servers_up": vision_up, "language_servers_up": language_up},
                            status_code=status)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=await served_model_name(), created=int(time.time()))])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = await served_model_name()
        if body.model != model:
            raise APIError(404, f"model {body.model!r} is not served here; this gateway serves {model!r}",
                           param="model")
        chat = await asyncio.to_thread(prepare_chat, body, settings)
        start = time.perf_counter()
        metrics.IN_FLIGHT.inc()
        responses = generate(request.app.state.vision, request.app.state.language, chat, settings.request_timeout_s)
        try:
            first = await anext(responses)  # errors before any output become HTTP statuses
        except BaseException:
            metrics.IN_FLIGHT.dec()
            await responses.aclose()
            raise
        metrics.TTFT.observe(time.perf_counter() - start)
        if body.stream:
            stream = _stream(chat, model, body, first, responses, start)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"x-request-id": chat.request_id})
        try:
            completion = await _complete(chat, model, body, first, responses)
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.E2E.observe(time.perf_counter() - start)
        metrics.REQUESTS.labels("200").inc()
        return JSONResponse(completion.model_dump(), headers={"x-request-id": chat.request_id})

    return app


async def _complete(chat: PreparedChat, model: str, body: ChatCompletionRequest, first, responses) -> ChatCompletion:
    text, logprobs, last = [first.text], _logprobs(first), first
    async for response in responses:
        text.append(response.text)
        logprobs += _logprobs(response)
        last = response
    return ChatCompletion(
        id=f"chatcmpl-{chat.request_id}", created=int(time.time()), model=model,
        choices=[Choice(message=AssistantMessage(content="".join(text)), finish_reason=last.finish_reason,
                        logprobs=ChoiceLogprobs(content=logprobs) if body.logprobs else None)],
        usage=_usage(last.usage),
    )


async def _stream(chat: PreparedChat, model: str, body: ChatCompletionRequest, first, responses,
                  start: float) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices, usage=None) -> str:
        payload = ChatCompletionChunk(id=f"chatcmpl-{chat.request_id}", created=created, model=model,
                                      choices=choices, usage=usage)
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"

    status = "200"
    try:
        yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
        response = first
        while True:
            logprobs = ChoiceLogprobs(content=_logprobs(response)) if body.logprobs else None
            if response.text or logprobs:
                yield chunk([ChunkChoice(delta=Delta(content=response.text), logprobs=logprobs)])
            if response.finish_reason:
                yield chunk([ChunkChoice(delta=Delta(), finish_reason=response.finish_reason)])
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], usage=_usage(response.usage))
                break
            response = await anext(responses)
        yield "data: [DONE]\n\n"
    except APIError as exc:  # headers are gone: report in-band, as OpenAI's API does
        status = str(exc.status)
        yield f"data: {json.dumps(exc.to_json())}\n\n"
    except asyncio.CancelledError:
        status = "499"
        raise
    finally:
        await responses.aclose()
        metrics.IN_FLIGHT.dec()
        metrics.E2E.observe(time.perf_counter() - start)
        metrics.REQUESTS.labels(status).inc()
