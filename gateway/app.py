"""FastAPI app: the OpenAI-compatible APIs (chat completions, responses, models), `/health` and `/metrics`.

Each API is a router of its own; all of them share the serving layer (`gateway.serving`)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import catalog, chat, metrics, ops, responses
from gateway.errors import APIError
from gateway.request_context import REQUEST_ARRIVAL_NS, REQUEST_ID, new_request_id
from gateway.serving import Serving
from gateway.settings import GatewaySettings
from gateway.tenants import UNKNOWN, Tenants, tenant_label

log = logging.getLogger(__name__)


class RequestContext:
    """ASGI middleware: a request id for logs and the `x-request-id` header; a cap on the body size (declared
    or streamed), checked before the body is read."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

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
        arrival = REQUEST_ARRIVAL_NS.set(time.time_ns())
        request_id = new_request_id()
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                metrics.REQUESTS.labels("413", UNKNOWN).inc()
                response = JSONResponse(APIError(413, self._too_large()).to_json(), status_code=413)
                return await response(scope, receive, send_with_id)
            await self.app(scope, self._limited(receive), send_with_id)
        finally:
            REQUEST_ID.reset(token)
            REQUEST_ARRIVAL_NS.reset(arrival)


def _lifespan(settings: GatewaySettings):
    """The serving layer: made at start-up on `app.state`, health-checking meanwhile, closed at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serving = Serving(settings)
        app.state.serving.start()
        yield
        await app.state.serving.close()

    return lifespan


def _openai_errors(app: FastAPI, settings: GatewaySettings) -> None:
    """Every error as OpenAI's error JSON, counted by status and tenant; a 429 or 503 carries a Retry-After."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.REQUESTS.labels(str(exc.status), tenant_label(request)).inc()
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
    app.state.tenants = Tenants(settings)
    metrics.start_series(app.state.tenants.names)
    app.state.response_store = responses.ResponseStore(settings.responses_store_max_bytes,
                                                       settings.responses_store_ttl_s)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    _openai_errors(app, settings)
    for api in (chat, responses, catalog, ops):
        app.include_router(api.router)
    return app
