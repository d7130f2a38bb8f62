"""gRPC `VisionService`: decode and tile a request's images, encode them, send each image's features.

Decoding runs in a thread pool and the encoder in one dedicated thread, so the event loop only
schedules. An image's features leave as soon as that image is encoded; a bad image fails the whole
request before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import torch

from proto import dvd_pb2, dvd_pb2_grpc
from transport.frames import ImageFeatures
from transport.tcp import TcpFeatureSender, TransportError
from vision_server import metrics
from vision_server.preprocess import ImageError, preprocess
from vision_server.settings import VisionServerSettings

log = logging.getLogger(__name__)


class VisionService(dvd_pb2_grpc.VisionServiceServicer):
    def __init__(self, model, settings: VisionServerSettings, sender: TcpFeatureSender, *,
                 device: torch.device, dtype: torch.dtype, model_name: str):
        self._model = model
        self._settings = settings
        self._sender = sender
        self._device = device
        self._dtype = dtype
        self._feature_dtype = getattr(torch, settings.feature_dtype)
        self._model_name = model_name
        self._preprocess_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="preprocess")
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")  # one stream of device work

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, 448, 448] -> [tiles * 256, H] on the CPU, in the wire dtype."""
        with torch.inference_mode():
            x = pixel_values.to(self._device, self._dtype, non_blocking=True)
            features = self._model(x)  # [tiles, 256, H]
            return features.reshape(-1, features.shape[-1]).to("cpu", self._feature_dtype)

    async def Encode(self, request: dvd_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
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

    async def _encode_request(self, request: dvd_pb2.EncodeRequest, context) -> dvd_pb2.EncodeResponse:
        rid, settings = request.request_id, self._settings
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        jobs = []
        for index, image in enumerate(request.images):
            max_tiles = image.max_tiles or settings.default_max_tiles
            if max_tiles > settings.max_tiles_limit:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"image {index}: max_tiles {max_tiles} exceeds {settings.max_tiles_limit}")
            jobs.append(loop.run_in_executor(self._preprocess_pool, partial(
                preprocess, image.data, max_tiles=max_tiles,
                max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, ImageError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {result}")
            if isinstance(result, BaseException):
                raise result
        preprocessed = time.perf_counter()
        metrics.PREPROCESS.observe(preprocessed - start)

        encode_s = send_s = 0.0
        encodings = []
        waiting = len(results)
        metrics.QUEUE_DEPTH.inc(waiting)
        try:
            for index, pixel_values in enumerate(results):
                t0 = time.perf_counter()
                features = await loop.run_in_executor(self._encode_pool, self._encode, pixel_values)
                t1 = time.perf_counter()
                waiting -= 1
                metrics.QUEUE_DEPTH.dec()
                num_tiles = pixel_values.shape[0]
                tile_tokens = [features.shape[0] // num_tiles] * num_tiles
                item = ImageFeatures(rid, index, len(results), tile_tokens, features)
                try:
                    sent = await self._sender.send(request.feature_endpoint, item)
                except TransportError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"request {rid}, image {index}: {exc}")
                t2 = time.perf_counter()
                encode_s += t1 - t0
                send_s += t2 - t1
                metrics.ENCODE.observe(t1 - t0)
                metrics.SEND.observe(t2 - t1)
                metrics.IMAGES.inc()
                metrics.TILES.inc(num_tiles)
                metrics.FEATURE_BYTES.inc(sent)
                encodings.append(dvd_pb2.ImageEncoding(
                    image_index=index, num_tiles=num_tiles, num_tokens=features.shape[0],
                    tile_tokens=tile_tokens, feature_bytes=sent))
        finally:
            metrics.QUEUE_DEPTH.dec(waiting)
        log.info("request %s: %d images, %d tiles encoded and sent to %s", rid, len(encodings),
                 sum(e.num_tiles for e in encodings), request.feature_endpoint)
        return dvd_pb2.EncodeResponse(
            images=encodings,
            timings=dvd_pb2.EncodeTimings(
                preprocess_ms=(preprocessed - start) * 1e3, encode_ms=encode_s * 1e3, send_ms=send_s * 1e3),
        )

    async def Health(self, request, context) -> dvd_pb2.HealthResponse:
        return dvd_pb2.HealthResponse(ready=True, model=self._model_name)

    def close(self) -> None:
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)
