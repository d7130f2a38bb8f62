"""The serving layer every API shares: the app's servers and clients, and the one way to run a `Job`.

An API route turns its request into a `Job` (`gateway/jobs.py`), and `Serving.run` does the rest: the cache
scope of its tenant (`gateway/tenants.py`), admission (429 at the gateway's limit or the tenant's own) and the
in-flight counts, the request's images (`gateway/images.py`), Encode and Generate (`gateway/generation.py`),
and the one stream of the language server's `GenerateResponse`s that the route renders, streamed or folded
into one body. A client that hangs up before its answer starts gets a 499 and
its servers' calls are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway import metrics
from gateway.errors import APIError
from gateway.generation import accepting, generate
from gateway.images import ImageFetcher, load_images
from gateway.jobs import Job, Responses
from gateway.pools import LanguagePool, VisionPool, check_forever
from gateway.settings import GatewaySettings
from gateway.tenants import Tenant

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was complete."""


@dataclass
class Load:
    """What one tenant has in progress."""

    requests: int = 0
    tiles: int = 0  # the most tiles its requests' images can take


class Serving:
    """The app's servers and clients (made at start-up, closed at the end) and the one way to run a `Job`."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        secret = settings.secret()
        tls = {"tls": settings, "server_name": settings.tls_server_name}  # settings hold the TLS files
        self.vision = VisionPool(settings.vision_servers, secret, **tls)
        self.language = LanguagePool(settings.language_servers, secret, **tls)
        self.fetcher = ImageFetcher(max_bytes=settings.max_image_bytes, timeout_s=settings.image_fetch_timeout_s,
                                    max_redirects=settings.image_fetch_max_redirects,
                                    allowed_networks=settings.image_fetch_allowed_networks)
        self.in_flight = 0
        self.loads: defaultdict[str, Load] = defaultdict(Load)  # by tenant name
        self.peak_in_flight = 0
        self._health: asyncio.Task | None = None

    def start(self) -> None:
        self._health = asyncio.create_task(check_forever([self.vision, self.language],
                                                         self.settings.health_interval_s,
                                                         self.settings.health_timeout_s,
                                                         self.settings.ejected_check_interval_s))

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
        await self.fetcher.close()
        await self.vision.close()
        await self.language.close()

    async def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        described = await self.language.describe()
        if not described:
            raise APIError(503, "no language server is available")
        return PurePath(described[0].description.model).name

    async def check_model(self, requested: str) -> str:
        model = await self.model_name()
        if requested != model:
            raise APIError(404, f"model {requested!r} is not served here; this gateway serves {model!r}",
                           param="model")
        return model

    async def run(self, request: Request, job: Job, tenant: Tenant, cache_salt: str | None = None, *,
                  stream: bool, render_stream: Callable[[Responses], AsyncIterator[str]],
                  render_body: Callable[[Responses], Awaitable[dict]]) -> Response:
        """Run `job` for `tenant` (its caches scoped by the tenant and `cache_salt`) and answer with
        `render_stream`'s server-sent events or `render_body`'s JSON.

        Everything up to the first response (admission, images, a server's refusal) fails as an HTTP
        status; after it, a streamed answer reports failures in-band (the renderer's part)."""
        job.tenant, job.cache_scope = tenant.name, tenant.cache_scope(cache_salt)
        admission = self._admit(tenant, job)
        try:
            return await self._answer(request, job, admission, render_body, render_stream if stream else None)
        except ClientGone:
            log.info("client disconnected; request abandoned")
            admission.finish("499")
            return Response(status_code=499)
        except BaseException:
            admission.finish("error")  # counted by the error handler
            raise

    async def _answer(self, request: Request, job: Job, admission: _Admission,
                      render_body: Callable[[Responses], Awaitable[dict]],
                      render_stream: Callable[[Responses], AsyncIterator[str]] | None) -> Response:
        """The answer once the first response is in: a stream (`render_stream` given), else the whole body."""
        responses = self._generate(job)  # starts at the first response asked for
        try:
            await _unless_disconnected(request, self._prepare(job))
            first = await _unless_disconnected(request, anext(responses))
            metrics.TTFT.labels(job.tenant).observe(time.perf_counter() - admission.start)
            if render_stream is not None:
                events = render_stream(_prepend(first, responses))
                responses = None  # the stream owns it now
                return StreamingResponse(admission.watch(events), media_type="text/event-stream")
            body = await _unless_disconnected(request, render_body(_prepend(first, responses)))
        finally:
            if responses is not None:
                await responses.aclose()  # cancels the servers' calls if they still run
        admission.finish("200")
        return JSONResponse(body)

    def _admit(self, tenant: Tenant, job: Job) -> _Admission:
        """Count the job in, or 429 when the gateway or the tenant is at its limit. A tenant's request whose
        tiles alone exceed its tile limit runs when the tenant has nothing else in progress."""
        load, tiles = self.loads[tenant.name], job.most_tiles
        if tenant.max_in_flight and load.requests >= tenant.max_in_flight:
            raise APIError(429, f"tenant {tenant.name!r} has its limit of {tenant.max_in_flight} requests in "
                                "progress; retry later")
        if tenant.max_tiles_in_flight and load.requests and load.tiles + tiles > tenant.max_tiles_in_flight:
            raise APIError(429, f"tenant {tenant.name!r} has requests in progress that may take {load.tiles} tiles; "
                                f"with this one's {tiles} that passes its limit of {tenant.max_tiles_in_flight}; "
                                "retry later")
        limit = self.settings.max_in_flight
        if limit and self.in_flight >= limit:
            raise APIError(429, f"the gateway is serving its limit of {limit} requests; retry later")
        return _Admission(self, load, job)

    async def _prepare(self, job: Job) -> None:
        accepting(await self.language.describe(), job)  # before any image is downloaded
        await load_images(job, self.settings, self.fetcher, self.vision.weights)

    def _generate(self, job: Job) -> Responses:
        return generate(self.vision, self.language, job, self.settings.request_timeout_s,
                        self.settings.affinity_max_extra_load)


class _Admission:
    """One admitted request: counted in flight (the gateway's and its tenant's) until `finish`, then by status."""

    def __init__(self, serving: Serving, load: Load, job: Job):
        self.serving, self.load, self.tenant, self.tiles = serving, load, job.tenant, job.most_tiles
        self.start = time.perf_counter()
        self.finished = False
        serving.in_flight += 1
        load.requests += 1
        load.tiles += self.tiles
        metrics.IN_FLIGHT.labels(self.tenant).inc()
        if serving.in_flight > serving.peak_in_flight:
            serving.peak_in_flight = serving.in_flight
            metrics.IN_FLIGHT_PEAK.set(serving.peak_in_flight)

    def finish(self, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.serving.in_flight -= 1
        self.load.requests -= 1
        self.load.tiles -= self.tiles
        metrics.IN_FLIGHT.labels(self.tenant).dec()
        metrics.E2E.labels(self.tenant).observe(time.perf_counter() - self.start)
        if status != "error":  # errors are counted by the error handler
            metrics.REQUESTS.labels(status, self.tenant).inc()

    async def watch(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """`events`, finishing the admission when they end (499 when the client left)."""
        status = "200"
        try:
            async for event in events:
                yield event
        except asyncio.CancelledError:
            status = "499"
            raise
        finally:
            await events.aclose()
            self.finish(status)


async def _prepend(first, rest: Responses) -> Responses:
    try:
        yield first
        async for response in rest:
            yield response
    finally:
        await rest.aclose()


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


def get_serving(request: Request) -> Serving:
    """The app's `Serving` (a route dependency)."""
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]
