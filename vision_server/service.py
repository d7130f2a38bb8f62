"""gRPC `VisionService`: decode and tile a request's images, queue them on the engine, send each image's features.

Decoding runs in a thread pool and the encoder in the engine's threads, so the event loop only
schedules and sends. An image's features leave as soon as that image is encoded; a bad image fails the
whole request before anything is queued. Identical inputs in flight at once, in one request or several,
are decoded per request but encoded once, among requests of the same cache scope (the gateway's per tenant).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import torch

from checkpoint.geometry import ModelConfig
from contracts.content_keys import content_key, frame_keys
from proto import dvd_pb2, dvd_pb2_grpc
from transport.backends import FeatureSender
from transport.frames import ImageFeatures
from transport.tcp import TransportError
from vision_server import metrics
from vision_server.engine import EncodedImage, VirParams, VisionEngine
from vision_server.in_flight import InFlight
from vision_server.preprocess import ImageError, preprocess_tiles
from vision_server.settings import VisionServerSettings
from vision_server.video import VideoLimits, video_tiles

log = logging.getLogger(__name__)


class VisionService(dvd_pb2_grpc.VisionServiceServicer):
    def __init__(self, engines: list[VisionEngine], config: ModelConfig, settings: VisionServerSettings,
                 sender: FeatureSender, *, model_name: str):
        self._engines = engines  # one per device
        self._config = config
        self._settings = settings
        self._video_limits = VideoLimits.of(settings)
        self._sender = sender
        self._model_name = model_name
        self._preprocess_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="preprocess")
        self._in_flight: InFlight[EncodedImage] = InFlight()

    async def Encode(self, request: dvd_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        if request.request_arrival_unix_ns:
            metrics.DISPATCH.observe(max(time.time_ns() - request.request_arrival_unix_ns, 0) / 1e9)
        rid, images, settings = request.request_id, request.images, self._settings
        if not rid or not request.feature_endpoint:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and feature_endpoint are required")
        if not images or len(images) > settings.max_images_per_request:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request {rid}: {len(images)} images; 1 to {settings.max_images_per_request} allowed")
        outcome = "error"
        try:
            response = await self._encode_request(request, context)
            outcome = "ok"
            return response
        finally:
            metrics.REQUESTS.labels(outcome).inc()

    async def _vir(self, request: dvd_pb2.EncodeRequest, context) -> VirParams | None:
        """ViR settings of a request: on by default for Flash checkpoints, thresholds overridable."""
        wanted = request.use_vir if request.HasField("use_vir") else self._config.flash
        if not wanted:
            return None
        if not self._config.flash:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ViR needs a Flash checkpoint; this one has none")
        relative = (request.vir_relative_threshold if request.HasField("vir_relative_threshold")
                    else self._config.vir_relative_threshold)
        absolute = (request.vir_absolute_threshold if request.HasField("vir_absolute_threshold")
                    else self._config.vir_absolute_threshold)
        if not 0 <= relative <= 1 or not 0 <= absolute <= 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ViR thresholds must lie in [0, 1]")
        return VirParams(relative, absolute)

    async def _preprocess(self, request: dvd_pb2.EncodeRequest, context,
                          vir: VirParams | None) -> tuple[list[torch.Tensor], list[str]]:
        """Decode and tile every input in the worker pool; a video becomes one 1-tile image per frame.

        Returns each image's pixels and content key. Any bad input fails the request before anything is queued.
        """
        loop = asyncio.get_running_loop()
        settings = self._settings
        jobs, keys = [], []
        for index, image in enumerate(request.images):
            if image.video_frames:
                if image.video_frames > settings.max_video_frames:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {index}: {image.video_frames} "
                                        f"video frames exceed {settings.max_video_frames}")
                job = partial(video_tiles, image.data, image.video_frames, self._video_limits)
            else:
                max_tiles = image.max_tiles or settings.default_max_tiles
                if max_tiles > settings.max_tiles_limit:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"image {index}: max_tiles {max_tiles} exceeds {settings.max_tiles_limit}")
                job = partial(preprocess_tiles, image.data, max_tiles=max_tiles, max_bytes=settings.max_image_bytes,
                              max_pixels=settings.max_image_pixels)
            jobs.append(loop.run_in_executor(self._preprocess_pool, job))
            keys.append(loop.run_in_executor(self._preprocess_pool, partial(
                content_key, image.data, image.max_tiles or settings.default_max_tiles, image.video_frames, vir,
                request.cache_scope)))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        keys = await asyncio.gather(*keys)
        pixels, image_keys = [], []
        for index, (image, result, key) in enumerate(zip(request.images, results, keys)):
            if isinstance(result, ImageError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {result}")
            if isinstance(result, BaseException):
                raise result
            if image.video_frames:  # frames: uint8 [1, 448, 448, 3] each
                pixels += list(result.split(1))
                image_keys += frame_keys(key, image.video_frames)
            else:
                pixels.append(result)
                image_keys.append(key)
        return pixels, image_keys

    @staticmethod
    async def _image_indices(request: dvd_pb2.EncodeRequest, context) -> tuple[list[int], int]:
        """Where each encoded image sits in the language request, and how many images that request has."""
        counts = [image.video_frames or 1 for image in request.images]
        if not request.image_count:  # the inputs are the whole request, in order
            return list(range(sum(counts))), sum(counts)
        indices = [image.image_index + i for image, count in zip(request.images, counts) for i in range(count)]
        if len(set(indices)) != len(indices) or max(indices) >= request.image_count:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {request.request_id}: image indices "
                                f"overlap or reach past image_count {request.image_count}")
        return indices, request.image_count

    async def _send(self, endpoint: str, item: ImageFeatures, context) -> tuple[int, float]:
        """Send one image's features: the bytes sent and the seconds it took. A language server that cannot be
        reached fails the request (UNAVAILABLE)."""
        start = time.perf_counter()
        try:
            sent = await self._sender.send(endpoint, item)
        except TransportError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"request {item.request_id}, image {item.image_index}: "
                                f"{exc}")
        seconds = time.perf_counter() - start
        metrics.SEND.observe(seconds)
        metrics.IMAGES.inc()
        metrics.FEATURE_BYTES.inc(sent)
        return sent, seconds

    async def _encode_request(self, request: dvd_pb2.EncodeRequest, context) -> dvd_pb2.EncodeResponse:
        rid = request.request_id
        vir = await self._vir(request, context)
        image_indices, image_count = await self._image_indices(request, context)
        start = time.perf_counter()
        pixels, keys = await self._preprocess(request, context, vir)
        preprocessed = time.perf_counter()
        metrics.PREPROCESS.observe(preprocessed - start)

        async def encode(index: int):
            def work():
                engine = min(self._engines, key=lambda e: e.tiles_waiting)  # the least loaded device
                return engine.encode(rid, image_indices[index], pixels[index], vir)

            encoded, joined = await self._in_flight.run(keys[index], work)
            if joined:
                metrics.DEDUP_IMAGES.inc()
                metrics.DEDUP_TILES.inc(pixels[index].shape[0])
            return index, encoded

        tasks = [asyncio.create_task(encode(i)) for i in range(len(pixels))]
        encodings, send_s = [], 0.0
        try:
            for next_done in asyncio.as_completed(tasks):  # each image leaves as soon as it is encoded
                index, encoded = await next_done
                item = ImageFeatures(rid, image_indices[index], image_count, encoded.tile_tokens, encoded.features)
                sent, seconds = await self._send(request.feature_endpoint, item, context)
                send_s += seconds
                encodings.append(dvd_pb2.ImageEncoding(
                    image_index=image_indices[index], num_tiles=pixels[index].shape[0],
                    num_tokens=encoded.features.shape[0], tile_tokens=encoded.tile_tokens, feature_bytes=sent))
        finally:
            for task in tasks:
                task.cancel()
        encoded_at = time.perf_counter()
        log.info("request %s: %d images, %d tiles encoded and sent to %s", rid, len(encodings),
                 sum(e.num_tiles for e in encodings), request.feature_endpoint)
        return dvd_pb2.EncodeResponse(
            images=sorted(encodings, key=lambda e: e.image_index),
            timings=dvd_pb2.EncodeTimings(
                preprocess_ms=(preprocessed - start) * 1e3,
                encode_ms=(encoded_at - preprocessed - send_s) * 1e3,
                send_ms=send_s * 1e3),
        )

    async def Health(self, request, context) -> dvd_pb2.HealthResponse:
        return dvd_pb2.HealthResponse(ready=True, model=self._model_name, weights=self._engines[0].weights)

    def close(self) -> None:
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
