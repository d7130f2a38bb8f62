"""One job across the servers: Encode on a vision server and Generate on a language server, under one id,
with retries on another server of the kind.

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
from collections.abc import Callable

import grpc

from gateway import metrics
from gateway.errors import APIError, from_grpc
from gateway.jobs import Job, Responses
from gateway.pools import Backend, LanguagePool, VisionPool
from proto import dvd_pb2

log = logging.getLogger(__name__)

ENCODE_REPLY_GRACE_S = 5.0


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


def _unavailable(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAVAILABLE


async def _encode(vision: VisionPool, request: dvd_pb2.EncodeRequest, timeout_s: float):
    tried: set[str] = set()
    while True:
        with vision.lease(vision.candidates(exclude=tried)) as backend:
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
                log.warning("request %s: vision server %s unavailable; retrying Encode on another", request.request_id,
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
        request = dvd_pb2.EncodeRequest(request_id=self.request_id, images=images, image_count=count,
                                        feature_endpoint=self.backend.description.feature_endpoint,
                                        request_arrival_unix_ns=self.job.arrival_unix_ns,
                                        cache_scope=self.job.cache_scope)
        encode = asyncio.ensure_future(_encode(self.vision, request, self.timeout_s))
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

    def call_failed(self, exc: grpc.aio.AioRpcError, produced: bool) -> BaseException:
        """What a failed Generate call raises: the Encode failure behind it, else the call's own error, as
        `_Unreachable` (the request may go elsewhere) when the server could not be reached before it produced
        anything; an unreachable server that did produce is ejected."""
        failure = self.failed_encode()
        if failure is not None:
            return failure
        error = from_grpc(exc, f"language server {self.backend.address}")
        if not _unavailable(exc):
            return error
        if not produced:
            return _Unreachable(error)
        self.backend.mark_down(exc.details() or "unavailable")
        return error

    async def run(self) -> Responses:
        job, backend = self.job, self.backend
        call = backend.stub.Generate(
            dvd_pb2.GenerateRequest(request_id=self.request_id, messages=job.messages, sampling=job.sampling,
                                    image_count=job.image_count, image_keys=job.image_keys, tools=job.tools,
                                    enable_thinking=job.thinking, cache_salt=job.cache_scope),
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
                    raise self.call_failed(exc, produced) from None
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
