"""The serving layer every API shares: one request across the servers, Encode and Generate under one id.

An API route turns its request into a `Job` (messages, images, sampling, tools), and `Serving.run`
does the rest: admission (429), image loading, content keys, Encode and Generate with retries on
another server, and the one stream of the language server's `GenerateResponse`s that the route
renders, streamed or folded into one body.

The language server waits for the features that the vision server sends it directly; the gateway
only carries control messages. Encode leaves as soon as the images are loaded, for every image the
chosen language server is not believed to hold (the affinity map's prediction); the language
server's `missing` reply only corrects a misprediction. An Encode failure cancels the Generate;
leaving early (client gone, error) cancels both. A server that cannot be reached before it produced
anything is ejected and the call goes to another server of its kind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Annotated

import grpc
from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from contracts.content_keys import content_key, frame_keys
from gateway import metrics
from gateway.errors import APIError, from_grpc
from gateway.images import ImageFetcher, decode_data_url, decode_video_data_url
from gateway.pools import Backend, LanguagePool, VisionPool, check_forever
from gateway.request_context import REQUEST_ARRIVAL_NS
from gateway.settings import GatewaySettings
from proto import dvd_pb2

log = logging.getLogger(__name__)

ENCODE_REPLY_GRACE_S = 5.0


@dataclass
class ImageSource:
    url: str
    max_tiles: int
    video_frames: int = 0  # a video: this many frames, each counted as one image

    @property
    def images(self) -> int:
        return self.video_frames or 1

    @classmethod
    def image(cls, url: str, detail: str, max_tiles: int) -> ImageSource:
        """An image at the request's detail: "low" is one tile, "high" and "auto" up to `max_tiles`."""
        return cls(url, 1 if detail == "low" else max_tiles)


@dataclass
class Job:
    """One API request in the servers' terms; image bytes are loaded by `Serving.run`."""

    request_id: str
    model: str
    messages: list[dvd_pb2.ChatMessage]
    sources: list[ImageSource]
    sampling: dvd_pb2.SamplingParams
    thinking: bool = False
    tools: dvd_pb2.Tools | None = None
    arrival_unix_ns: int = field(default_factory=lambda: REQUEST_ARRIVAL_NS.get() or time.time_ns())
    images: list[dvd_pb2.ImageInput] = field(default_factory=list)  # one per source
    image_keys: list[str] = field(default_factory=list)  # one per image (video frame); empty: no feature cache

    @property
    def n(self) -> int:
        return self.sampling.n or 1

    @property
    def image_count(self) -> int:
        """Images the language server waits for: every video frame is one."""
        return sum(source.images for source in self.sources)


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was complete."""


Responses = AsyncIterator[dvd_pb2.GenerateResponse]


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
        self._health: asyncio.Task | None = None

    def start(self) -> None:
        self._health = asyncio.create_task(check_forever([self.vision, self.language],
                                                         self.settings.health_interval_s,
                                                         self.settings.health_timeout_s))

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

    async def run(self, request: Request, job: Job, *, stream: bool,
                  render_stream: Callable[[Responses], AsyncIterator[str]],
                  render_body: Callable[[Responses], Awaitable[dict]]) -> Response:
        """Run `job` and answer with `render_stream`'s server-sent events or `render_body`'s JSON.

        Everything up to the first response (admission, images, a server's refusal) fails as an HTTP
        status; after it, a streamed answer reports failures in-band (the renderer's part)."""
        admission = self._admit()
        responses = None
        try:
            await _unless_disconnected(request, self._prepare(job))
            responses = self._generate(job)
            first = await _unless_disconnected(request, anext(responses))
            metrics.TTFT.observe(time.perf_counter() - admission.start)
            if stream:
                events = render_stream(_prepend(first, responses))
                responses = None  # the stream owns it now
                return StreamingResponse(admission.watch(events), media_type="text/event-stream")
            body = await _unless_disconnected(request, render_body(_prepend(first, responses)))
        except ClientGone:
            log.info("client disconnected; request abandoned")
            admission.finish("499")
            return Response(status_code=499)
        except BaseException:
            admission.finish("error")  # counted by the error handler
            raise
        finally:
            if responses is not None:
                await responses.aclose()  # cancels the servers' calls if they still run
        admission.finish("200")
        return JSONResponse(body)

    def _admit(self) -> _Admission:
        limit = self.settings.max_in_flight
        if limit and self.in_flight >= limit:
            raise APIError(429, f"the gateway is serving its limit of {limit} requests; retry later")
        return _Admission(self)

    async def _prepare(self, job: Job) -> None:
        accepting(await self.language.describe(), job)  # before any image is downloaded
        await load_images(job, self.settings, self.fetcher, self.vision.weights)

    def _generate(self, job: Job) -> Responses:
        return generate(self.vision, self.language, job, self.settings.request_timeout_s,
                        self.settings.affinity_max_extra_load)


class _Admission:
    """One admitted request: counted in flight until `finish`, then by status."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.start = time.perf_counter()
        self.finished = False
        serving.in_flight += 1
        metrics.IN_FLIGHT.inc()

    def finish(self, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.serving.in_flight -= 1
        metrics.IN_FLIGHT.dec()
        metrics.E2E.observe(time.perf_counter() - self.start)
        if status != "error":  # errors are counted by the error handler
            metrics.REQUESTS.labels(status).inc()

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


# ---------------------------------------------------------------- images


async def load_images(job: Job, settings: GatewaySettings, fetcher: ImageFetcher, vision_weights: str = "") -> None:
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

    tasks = [asyncio.ensure_future(load(i, s)) for i, s in enumerate(job.sources)]
    try:
        job.images = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # the first failure ends the others
            task.cancel()
    if settings.feature_cache and job.images:
        job.image_keys = await asyncio.to_thread(content_keys, job.model, vision_weights, job.images)


def content_keys(model: str, weights: str, images: list[dvd_pb2.ImageInput]) -> list[str]:
    """One key per image (video frame): the model, the vision weights, and everything of the input that
    changes its features."""
    keys = []
    for image in images:
        keys += frame_keys(content_key(image.data, model, weights, image.max_tiles, image.video_frames),
                           image.video_frames)
    return keys


def inputs_for(job: Job, indices) -> list[dvd_pb2.ImageInput]:
    """The inputs holding the images `indices`, each told where its first image sits in the request."""
    wanted, inputs, first = set(indices), [], 0
    for source, image in zip(job.sources, job.images):
        if wanted & set(range(first, first + source.images)):
            selected = dvd_pb2.ImageInput()
            selected.CopyFrom(image)
            selected.image_index = first
            inputs.append(selected)
        first += source.images
    return inputs


def predicted_missing(job: Job, holder_of: Callable[[str], str | None], address: str) -> list[int]:
    """The images the language server at `address` is not believed to hold: the first of each content key
    that the affinity map does not place there (later repeats in the request reuse the first)."""
    seen, missing = set(), []
    for index, key in enumerate(job.image_keys):
        if key not in seen:
            seen.add(key)
            if holder_of(key) != address:
                missing.append(index)
    return missing


# ---------------------------------------------------------------- the servers


def _unavailable(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAVAILABLE


async def _encode(vision: VisionPool, request_id: str, images, feature_endpoint: str, timeout_s: float,
                  image_count: int = 0, arrival_unix_ns: int = 0):
    tried: set[str] = set()
    while True:
        with vision.lease(vision.candidates(exclude=tried)) as backend:
            request = dvd_pb2.EncodeRequest(request_id=request_id, images=images, feature_endpoint=feature_endpoint,
                                            image_count=image_count, request_arrival_unix_ns=arrival_unix_ns)
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


def accepting(servers: list[Backend], job: Job) -> list[Backend]:
    """The language servers that take the request's images, by the limit each advertises (`Describe`); a 400
    naming the limit when none does. The gateway keeps no limit of its own: the language server's is the rule."""
    fits = [b for b in servers if job.image_count <= b.description.max_images_per_request]
    if servers and not fits:
        limit = max(b.description.max_images_per_request for b in servers)
        raise APIError(400, f"{job.image_count} images in one request; the language server takes at most {limit} "
                            "(each video frame counts as one)", param="messages")
    return fits


async def generate(vision: VisionPool, language: LanguagePool, job: Job, timeout_s: float,
                   max_extra_load: int = 0) -> Responses:
    """Yields the language servers' `GenerateResponse`s; raises `APIError` on any failure."""
    tried: set[str] = set()
    while True:
        described = accepting([b for b in await language.describe() if b.address not in tried], job)
        if not described:
            raise APIError(503, "no language server is available")
        with language.lease(described, prefer=language.holders.best(job.image_keys),
                            max_extra_load=max_extra_load) as backend:
            # A retry gets its own id: the first server may still hold features under the first one.
            request_id = job.request_id if not tried else f"{job.request_id}-{len(tried)}"
            try:
                async for response in _Generation(backend, vision, language, job, request_id, timeout_s).run():
                    yield response
                language.holders.record(job.image_keys, backend.address)
                return
            except _Unreachable as exc:
                backend.mark_down(exc.error.message)
                tried.add(backend.address)
                if not language.candidates(exclude=tried):
                    raise exc.error from None
                log.warning("request %s: language server %s unavailable; retrying on another", job.request_id,
                            backend.address)


class _Generation:
    """One Generate call on one language server, with the Encode calls that feed it."""

    def __init__(self, backend: Backend, vision: VisionPool, language: LanguagePool, job: Job, request_id: str,
                 timeout_s: float):
        self.backend, self.vision, self.job = backend, vision, job
        self.request_id, self.timeout_s = request_id, timeout_s
        self.encodes: dict[asyncio.Future, set[int]] = {}  # each Encode call and the images it carries
        self.sent: set[int] = set()
        self.holder_of = language.holders.holder
        # With content keys, an Encode failure counts once the server has said what it needs (`missing`):
        # an Encode of images it turns out to hold may fail without failing the request.
        self.needs_known = not job.image_keys

    def encode(self, indices: list[int]) -> None:
        """Encode the images `indices` not sent yet, for this call's language server."""
        todo = [i for i in indices if i not in self.sent]
        if not todo:
            return
        self.sent.update(todo)
        images, count = (inputs_for(self.job, todo), self.job.image_count) if self.job.image_keys else \
            (self.job.images, 0)
        metrics.IMAGES.labels("vision").inc(len(todo))
        encode = asyncio.ensure_future(_encode(self.vision, self.request_id, images,
                                               self.backend.description.feature_endpoint, self.timeout_s, count,
                                               self.job.arrival_unix_ns))
        self.encodes[encode] = set(todo)

    def failed_encode(self) -> BaseException | None:
        if not self.needs_known:
            return None
        return next((e.exception() for e in self.encodes if e.done() and not e.cancelled()
                     and e.exception() is not None), None)

    async def next_response(self, responses) -> dvd_pb2.GenerateResponse:
        """The call's next response, unless an Encode fails first."""
        next_response = asyncio.ensure_future(responses.__anext__())
        pending = {e for e in self.encodes if not e.done()}
        if pending:
            await asyncio.wait({next_response, *pending}, return_when=asyncio.FIRST_COMPLETED)
        failure = self.failed_encode()
        if failure is not None:
            next_response.cancel()
            raise failure
        return await next_response

    def corrected(self, missing: list[int]) -> None:
        """The server's own list of what it lacks: encode what the prediction missed, and stop the Encode
        calls that carry nothing it needs (what they sent anyway, the server drops and counts)."""
        needed = set(missing)
        self.needs_known = True
        for encode, indices in list(self.encodes.items()):
            if not indices & needed:
                encode.cancel()
                if encode.done() and not encode.cancelled():
                    encode.exception()  # retrieved: its failure no longer matters
                del self.encodes[encode]
        needless = len(self.sent - needed)
        if needless:
            metrics.IMAGES_SENT_NEEDLESSLY.inc(needless)
        self.encode(missing)
        metrics.IMAGES.labels("cache").inc(self.job.image_count - len(missing))

    async def run(self) -> Responses:
        job, backend = self.job, self.backend
        call = backend.stub.Generate(
            dvd_pb2.GenerateRequest(request_id=self.request_id, messages=job.messages, sampling=job.sampling,
                                    image_count=job.image_count, image_keys=job.image_keys, tools=job.tools,
                                    enable_thinking=job.thinking),
            timeout=self.timeout_s,
        )
        # Vision starts at once: every image without a key, or whose key this server is not believed to hold.
        if job.images:
            self.encode(predicted_missing(job, self.holder_of, backend.address) if job.image_keys
                        else list(range(job.image_count)))
        responses = call.__aiter__()
        produced, outcome = False, "cancelled"
        try:
            while True:
                try:
                    response = await self.next_response(responses)
                except StopAsyncIteration:
                    break
                except grpc.aio.AioRpcError as exc:
                    outcome = exc.code().name.lower()
                    failure = self.failed_encode()
                    if failure is not None:
                        raise failure from None
                    error = from_grpc(exc, f"language server {backend.address}")
                    if _unavailable(exc) and not produced:
                        raise _Unreachable(error) from None
                    if _unavailable(exc):
                        backend.mark_down(exc.details() or "unavailable")
                    raise error from None
                if response.HasField("missing"):
                    self.corrected(list(response.missing.image_indices))
                    continue
                produced = True
                if response.HasField("usage"):
                    _log_timings(self.request_id, self.encodes, response)
                yield response
            outcome = "ok"
            pending = {e for e in self.encodes if not e.done()}
            if pending:
                # Generation ended, so every feature arrived and the Encode reply is moments behind: let it land
                # rather than cancel a call that has done its work (and leave it uncounted).
                await asyncio.wait(pending, timeout=ENCODE_REPLY_GRACE_S)
        finally:
            metrics.BACKEND_REQUESTS.labels("language", backend.address, outcome).inc()
            for encode in self.encodes:
                if not encode.done():
                    encode.cancel()
            if not call.done():
                call.cancel()  # the language server cancels its task and vLLM aborts the request


def _log_timings(request_id: str, encodes, last: dvd_pb2.GenerateResponse) -> None:
    replies = [e.result() for e in encodes if e.done() and not e.cancelled() and e.exception() is None]
    e = replies[0].timings if replies else dvd_pb2.EncodeTimings()
    t = last.timings
    log.info("request %s: preprocess %.1f ms, encode %.1f ms, send %.1f ms, transfer %.1f ms, feature wait %.1f ms, "
             "prefill %.1f ms, decode %.1f ms", request_id, e.preprocess_ms, e.encode_ms, e.send_ms,
             t.transfer_ms, t.feature_wait_ms, t.prefill_ms, t.decode_ms)


def get_serving(request: Request) -> Serving:
    """The app's `Serving` (a route dependency)."""
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]
