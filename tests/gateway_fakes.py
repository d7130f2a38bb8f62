"""Fast in-process gateway tests: the real app on `httpx.ASGITransport`, the official `openai` client, and
scripted gRPC servicers in place of the vision and language servers (real gRPC servers on loopback).

The servicers play the servers' side of the protocol by script, so that retries, cancels, 429s, `missing`
replies and tool-call streaming can be checked in milliseconds; the real-stack tests run the real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import httpx
import openai

from gateway.app import create_app
from gateway.settings import GatewaySettings
from proto import dvd_pb2, dvd_pb2_grpc

MODEL = "tiny"


class FakeVision(dvd_pb2_grpc.VisionServiceServicer):
    """Answers every Encode (after `delay_s`); records what it was asked and when."""

    def __init__(self, delay_s: float = 0.0):
        self.requests: list[dvd_pb2.EncodeRequest] = []
        self.cancelled = 0
        self.called = asyncio.Event()
        self.delay_s = delay_s

    async def Health(self, request, context):  # noqa: N802
        return dvd_pb2.HealthResponse(ready=True, model="tiny", weights="w")

    async def Encode(self, request, context):  # noqa: N802
        self.requests.append(request)
        self.called.set()
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return dvd_pb2.EncodeResponse(images=[dvd_pb2.ImageEncoding(image_index=i.image_index)
                                              for i in request.images])


Script = Callable[[dvd_pb2.GenerateRequest, "FakeLanguage"], object]  # an async generator of responses


async def say_ok(request: dvd_pb2.GenerateRequest, server: FakeLanguage):
    """The usual script: says it holds nothing it was not sent, then answers "ok"."""
    if request.image_keys:
        yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=range(request.image_count)))
    yield dvd_pb2.GenerateResponse(text="ok", token_ids=[1], finish_reason="stop",
                                   usage=dvd_pb2.Usage(prompt_tokens=3, completion_tokens=1))


@dataclass
class FakeLanguage(dvd_pb2_grpc.LanguageServiceServicer):
    """Runs `script` for every Generate; records the requests, and the calls cancelled by the gateway."""

    script: Script = say_ok
    max_images: int = 4
    requests: list[dvd_pb2.GenerateRequest] = field(default_factory=list)
    cancelled: int = 0

    async def Health(self, request, context):  # noqa: N802
        return dvd_pb2.HealthResponse(ready=True, model="tiny")

    async def Describe(self, request, context):  # noqa: N802
        return dvd_pb2.ModelDescription(model=f"/checkpoints/{MODEL}", hidden_size=64, max_model_len=4096,
                                        feature_endpoint="tcp://127.0.0.1:9", max_images_per_request=self.max_images)

    async def Generate(self, request, context):  # noqa: N802
        self.requests.append(request)
        try:
            async for response in self.script(request, self):
                yield response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def _serve(add, servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def gateway(language: list[FakeLanguage] | FakeLanguage | None = None, vision: FakeVision | None = None,
                  language_addresses: list[str] = (), **settings):
    """The gateway app in process before the fakes; yields (an `openai.AsyncOpenAI`, an `httpx.AsyncClient`)."""
    languages = language if isinstance(language, list) else [language or FakeLanguage()]
    vision = vision or FakeVision()
    servers = [await _serve(dvd_pb2_grpc.add_VisionServiceServicer_to_server, vision)]
    for servicer in languages:
        servers.append(await _serve(dvd_pb2_grpc.add_LanguageServiceServicer_to_server, servicer))
    app = create_app(GatewaySettings(vision_servers=[servers[0][1]],
                                     language_servers=[*language_addresses, *(a for _, a in servers[1:])],
                                     **settings))
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
            client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=(settings.get("api_keys") or ["x"])[0],
                                        http_client=http, max_retries=0)
            await http.get("/health")  # the servers checked once: the vision weights' fingerprint is known
            yield client, http
    finally:
        for server, _ in servers:
            await server.stop(None)


def run(coroutine):
    return asyncio.run(coroutine)
