"""FastAPI app: OpenAI-compatible `/v1/chat/completions` and `/v1/models`, `/health`, `/metrics`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePath

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import metrics
from gateway.backends import LanguagePool, VisionPool, check_forever
from gateway.chat import PreparedChat, accepting, generate, load_images, prepare_chat
from gateway.errors import APIError
from gateway.images import ImageFetcher
from gateway.reasoning import ThinkSplitter
from gateway.request_context import REQUEST_ID, new_request_id
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


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was complete."""


def _usage(usage: dvd_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 total_tokens=usage.prompt_tokens + usage.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(image_tokens=usage.image_tokens,
                                                           cached_tokens=usage.cached_tokens))


def _logprobs(response: dvd_pb2.GenerateResponse) -> list[TokenLogprob]:
    def entry(cls, item, **extra):
        return cls(token=item.token, logprob=item.logprob, bytes=list(item.token.encode()), **extra)

    return [entry(TokenLogprob, t, top_logprobs=[entry(TopLogprob, c) for c in t.top]) for t in response.logprobs]


class ChoiceState:
    """One choice's output so far; splits off the thinking when thinking mode is on."""

    def __init__(self, thinking: bool):
        self.splitter = ThinkSplitter() if thinking else None
        self.content, self.reasoning, self.logprobs = [], [], []
        self.finish_reason: str | None = None
        self.tokens = 0
        self.first_at = self.last_at = None

    def add(self, response: dvd_pb2.GenerateResponse) -> tuple[str, str]:
        """(reasoning, content) deltas of one response; the choice's held-back text when it finishes."""
        now = time.perf_counter()
        if response.token_ids:
            self.first_at = self.first_at or now
            self.last_at = now
            self.tokens += len(response.token_ids)
        reasoning, content = self.splitter.feed(response.text) if self.splitter else ("", response.text)
        if response.finish_reason:
            self.finish_reason = response.finish_reason
            if self.splitter:
                tail = self.splitter.flush()
                reasoning, content = reasoning + tail[0], content + tail[1]
            if self.tokens > 1:
                metrics.TPOT.observe((self.last_at - self.first_at) / (self.tokens - 1))
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content


class RequestContext:
    """ASGI middleware: a request id for logs and the `x-request-id` header; API keys on `/v1/`; a cap on
    the body size (declared or streamed), checked before the body is parsed."""

    def __init__(self, app, api_keys: list[str], max_body_bytes: int):
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]
        self.max_body_bytes = max_body_bytes

    def authorized(self, scope) -> bool:
        if not self.api_keys or not scope["path"].startswith("/v1/"):
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = header.partition(b" ")
        return scheme.lower() == b"bearer" and any(hmac.compare_digest(key.strip(), k) for k in self.api_keys)

    def _too_large(self) -> str:
        return f"the request body is larger than the gateway's {self.max_body_bytes}-byte limit (max_body_bytes)"

    def _limited(self, receive):
        """`receive` that fails with 413 once the body streamed in exceeds the cap."""
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        return limited_receive

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = new_request_id()
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            if not self.authorized(scope):
                error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
                metrics.REQUESTS.labels("401").inc()
                response = JSONResponse(error.to_json(), status_code=401, headers={"www-authenticate": "Bearer"})
                return await response(scope, receive, send_with_id)
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                metrics.REQUESTS.labels("413").inc()
                response = JSONResponse(APIError(413, self._too_large()).to_json(), status_code=413)
                return await response(scope, receive, send_with_id)
            await self.app(scope, self._limited(receive), send_with_id)
        finally:
            REQUEST_ID.reset(token)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """The result of `awaitable`, which is cancelled (and `ClientGone` raised) if the client leaves first."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its generator is free again afterwards


def _lifespan(settings: GatewaySettings):
    """The app's clients and pools: made at start-up on `app.state`, health-checked meanwhile, closed at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        secret = settings.secret()
        tls = {"tls": settings, "server_name": settings.tls_server_name}  # settings hold the TLS files
        app.state.vision = VisionPool(settings.vision_servers, secret, **tls)
        app.state.language = LanguagePool(settings.language_servers, secret, **tls)
        app.state.fetcher = ImageFetcher(max_bytes=settings.max_image_bytes, timeout_s=settings.image_fetch_timeout_s,
                                         max_redirects=settings.image_fetch_max_redirects,
                                         allowed_networks=settings.image_fetch_allowed_networks)
        app.state.in_flight = 0
        health = asyncio.create_task(check_forever([app.state.vision, app.state.language],
                                                   settings.health_interval_s, settings.health_timeout_s))
        yield
        health.cancel()
        await app.state.fetcher.close()
        await app.state.vision.close()
        await app.state.language.close()

    return lifespan


def _openai_errors(app: FastAPI, settings: GatewaySettings) -> None:
    """Every error as OpenAI's error JSON, counted by status; a 429 or 503 carries a Retry-After."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.REQUESTS.labels(str(exc.status)).inc()
        headers = dict(exc.headers)
        if exc.status in (429, 503):
            headers.setdefault("retry-after", str(settings.retry_after_s))
        if exc.status >= 500:
            log.warning("%d: %s", exc.status, exc.message)
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "this server does not support this parameter"
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
        return await api_error(request, APIError(400, f"{where}: {message}" if where else message, param=where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's generic "error parsing the body"
            message = f"the body is not valid UTF-8 JSON: {exc.__cause__}"
        return await api_error(request, APIError(exc.status_code, message))


def create_app(settings: GatewaySettings) -> FastAPI:
    app = FastAPI(title="DvD gateway", lifespan=_lifespan(settings))
    app.add_middleware(RequestContext, api_keys=settings.api_keys, max_body_bytes=settings.max_body_bytes)
    _openai_errors(app, settings)

    async def served_model_name() -> str:
        if settings.served_model_name:
            return settings.served_model_name
        described = await app.state.language.describe()
        if not described:
            raise APIError(503, "no language server is available")
        return PurePath(described[0].description.model).name

    @app.get("/health")
    async def health():
        vision_up = await app.state.vision.check(settings.health_timeout_s)
        language_up = await app.state.language.check(settings.health_timeout_s)
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
        state = request.app.state
        if settings.max_in_flight and state.in_flight >= settings.max_in_flight:
            raise APIError(429, f"the gateway is serving its limit of {settings.max_in_flight} requests; "
                                "retry later")
        state.in_flight += 1
        metrics.IN_FLIGHT.inc()
        start = time.perf_counter()
        released = False

        def release(status: str) -> None:
            nonlocal released
            if not released:
                released = True
                state.in_flight -= 1
                metrics.IN_FLIGHT.dec()
                metrics.E2E.observe(time.perf_counter() - start)
                if status != "error":  # errors are counted by the error handler
                    metrics.REQUESTS.labels(status).inc()

        responses = None
        try:
            model = await served_model_name()
            if body.model != model:
                raise APIError(404, f"model {body.model!r} is not served here; this gateway serves {model!r}",
                               param="model")
            chat = prepare_chat(body, settings, REQUEST_ID.get())
            log.info("chat completion: %d messages, %d images, n=%d, stream=%s, user=%r", len(chat.messages),
                     len(chat.sources), chat.n, body.stream, body.user)

            async def first_response():
                accepting(await state.language.describe(), chat)  # before any image is downloaded
                await load_images(chat, settings, state.fetcher, state.vision.weights)
                return await anext(responses)

            responses = generate(state.vision, state.language, chat, settings.request_timeout_s,
                                 settings.affinity_max_extra_load)
            first = await _unless_disconnected(request, first_response())  # errors here become HTTP statuses
            metrics.TTFT.observe(time.perf_counter() - start)
            if body.stream:
                stream = _stream(chat, model, body, first, responses, release)
                responses = None  # the stream owns it now
                return StreamingResponse(stream, media_type="text/event-stream")
            completion = await _unless_disconnected(request, _complete(chat, model, body, first, responses))
        except ClientGone:
            log.info("client disconnected; request abandoned")
            release("499")
            return Response(status_code=499)
        except BaseException:
            release("error")
            raise
        finally:
            if responses is not None:
                await responses.aclose()  # cancels the servers' calls if they still run
        release("200")
        return JSONResponse(completion.model_dump())

    return app


async def _complete(chat: PreparedChat, model: str, body: ChatCompletionRequest, first, responses) -> ChatCompletion:
    choices = [ChoiceState(chat.thinking) for _ in range(chat.n)]
    usage = None
    response = first
    while response is not None:
        choices[response.index].add(response)
        choices[response.index].logprobs += _logprobs(response)
        if response.HasField("usage"):
            usage = response.usage
        response = await anext(responses, None)
    return ChatCompletion(
        id=f"chatcmpl-{chat.request_id}", created=int(time.time()), model=model,
        choices=[Choice(index=i, finish_reason=c.finish_reason,
                        message=AssistantMessage(content="".join(c.content),
                                                 reasoning_content="".join(c.reasoning) if chat.thinking else None),
                        logprobs=ChoiceLogprobs(content=c.logprobs) if body.logprobs else None)
                 for i, c in enumerate(choices)],
        usage=_usage(usage or dvd_pb2.Usage()),
    )


async def _stream(chat: PreparedChat, model: str, body: ChatCompletionRequest, first, responses,
                  release) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices, usage=None) -> str:
        payload = ChatCompletionChunk(id=f"chatcmpl-{chat.request_id}", created=created, model=model,
                                      choices=choices, usage=usage)
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"

    status = "200"
    choices = [ChoiceState(chat.thinking) for _ in range(chat.n)]
    try:
        for index in range(chat.n):
            yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        usage = None
        response = first
        while response is not None:
            reasoning, content = choices[response.index].add(response)
            logprobs = ChoiceLogprobs(content=_logprobs(response)) if body.logprobs else None
            # The last token's chunk carries the finish reason, as vLLM's server sends it (one chunk, one gap).
            if reasoning or content or logprobs or response.finish_reason:
                delta = Delta(content=content or None, reasoning_content=reasoning or None)
                yield chunk([ChunkChoice(index=response.index, delta=delta, logprobs=logprobs,
                                         finish_reason=response.finish_reason or None)])
            if response.HasField("usage"):
                usage = response.usage
            response = await anext(responses, None)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=_usage(usage or dvd_pb2.Usage()))
        yield "data: [DONE]\n\n"
    except APIError as exc:  # headers are gone: report in-band, as OpenAI's API does
        status = str(exc.status)
        yield f"data: {json.dumps(exc.to_json())}\n\n"
    except asyncio.CancelledError:
        status = "499"
        raise
    finally:
        await responses.aclose()
        release(status)
