"""Running the scheduler's batches on the device, as a pipeline.

Stage 1 (runner thread): take the next batch of tiles from `TileScheduler`, copy its uint8 tiles to the
device, run normalisation + ViT + projector(s) there, start the device-to-host copy. Stage 2 (finisher
thread): wait for the copy, scatter rows into each image's buffers and, when an image's last tile is in, route
it (ViR) and hand its features to the event loop. Stage 3 (event loop): send the features. So batch k+1
computes while batch k is copied and sent, and an image leaves as soon as its own tiles are done, not when its
request is.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from vision_server import metrics
from vision_server.scheduler import ImageJob, TileScheduler, TileSlice
from vision_server.vir import route

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VirParams:
    relative_threshold: float
    absolute_threshold: float


@dataclass
class _Work:
    """Per-image state shared by the runner and finisher threads."""

    pixel_values: torch.Tensor  # uint8 tiles [tiles, 448, 448, 3] (or float [tiles, 3, 448, 448]) on the host
    vir: VirParams | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    full: torch.Tensor | None = None  # [tiles, 256, H]
    compressed: torch.Tensor | None = None  # [tiles, 64, H]
    p0: torch.Tensor | None = None  # [tiles]
    tiles_done: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class EncodedImage:
    features: torch.Tensor  # [tokens, H] in the wire dtype, on the host
    tile_tokens: list[int]


class VisionEngine:
    """One engine per device: a scheduler, a runner thread and a finisher thread."""

    def __init__(self, model, *, device: torch.device, dtype: torch.dtype, feature_dtype: torch.dtype,
                 max_batch_tiles: int = 32, max_wait_s: float = 0.005, trace_spans: int = 0):
        self._model = model
        self._device = device
        self._dtype = dtype
        self._feature_dtype = feature_dtype
        self._scheduler = TileScheduler(max_batch_tiles, max_wait_s)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(str(device))
        self._tiles = metrics.TILES.labels(str(device))
        self._condition = threading.Condition()
        self._copies: queue.Queue = queue.Queue(maxsize=2)  # bounded: at most two batches in flight
        self._stopping = False
        # (stage, batch number, start, end) in perf_counter seconds, for pipeline traces
        self.trace: deque[tuple[str, int, float, float]] = deque(maxlen=trace_spans or 1)
        self._tracing = trace_spans > 0
        self._runner = threading.Thread(target=self._run, name="vision-runner", daemon=True)
        self._finisher = threading.Thread(target=self._finish, name="vision-finisher", daemon=True)
        self._runner.start()
        self._finisher.start()

    @property
    def weights(self) -> str:
        """What makes this engine's features: the weights' fingerprint, the compute and the wire dtype."""
        dtypes = f"{self._dtype}:{self._feature_dtype}".replace("torch.", "")
        return f"{self._model.weights_fingerprint[:32]}:{dtypes}"

    @property
    def tiles_waiting(self) -> int:
        with self._condition:
            return self._scheduler.tiles_waiting

    async def encode(self, request_id: str, image_index: int, pixel_values: torch.Tensor,
                     vir: VirParams | None = None) -> EncodedImage:
        """Queue one image's tiles; resolves once all of them are encoded (and routed)."""
        loop = asyncio.get_running_loop()
        work = _Work(pixel_values, vir, loop.create_future(), loop)
        job = ImageJob(request_id, image_index, pixel_values.shape[0], payload=work)
        with self._condition:
            self._scheduler.add(job)
            self._queue_depth.set(self._scheduler.tiles_waiting)
            self._condition.notify()
        try:
            return await work.future
        except asyncio.CancelledError:
            with self._condition:
                self._scheduler.cancel(request_id)
            raise

    def close(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._runner.join(timeout=10)
        self._copies.put(None)
        self._finisher.join(timeout=10)

    # ---------------------------------------------------------------- stage 1: compute

    def _next_batch(self) -> list[TileSlice]:
        with self._condition:
            while not self._stopping:
                wait = self._scheduler.wait_s()
                if wait == 0:
                    batch = self._scheduler.next_batch()
                    self._queue_depth.set(self._scheduler.tiles_waiting)
                    return batch
                self._condition.wait(timeout=wait)
            return []

    def _run(self) -> None:
        number = 0
        while batch := self._next_batch():
            number += 1
            start = time.perf_counter()
            for s in batch:
                if s.start == 0:  # the image's first tiles: its time in the queue ends here
                    metrics.QUEUE.observe(start - s.job.payload.started)
            try:
                outputs = self._compute(batch)
            except Exception as exc:  # a failed batch fails its images, never the engine
                log.exception("encoder batch of %d tiles failed", sum(s.num_tiles for s in batch))
                for s in batch:
                    self._fail(s.job.payload, exc)
                continue
            if self._tracing:
                self.trace.append(("compute", number, start, time.perf_counter()))
            metrics.BATCH_TILES.observe(sum(s.num_tiles for s in batch))
            self._copies.put((number, batch, outputs))

    def _compute(self, batch: list[TileSlice]) -> tuple[torch.Tensor, ...]:
        pixels = torch.cat([s.job.payload.pixel_values[s.start:s.stop] for s in batch])
        if self._device.type == "cuda":
            pixels = pixels.pin_memory()  # so that the host-to-device copy below is asynchronous
        use_vir = any(s.job.payload.vir is not None for s in batch)
        with torch.inference_mode():
            # uint8 tiles cross as they are (a quarter of float32's bytes); the model normalises them on the device.
            x = pixels.to(self._device, None if pixels.dtype == torch.uint8 else self._dtype, non_blocking=True)
            outputs = self._model.forward_flash(x) if use_vir else (self._model(x),)
            # Features leave in the wire dtype; router probabilities stay fp32.
            host = tuple(t.to("cpu", t.dtype if t.dim() == 1 else self._feature_dtype, non_blocking=True)
                         for t in outputs)
            if self._device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
                return host + (done,)
        return host

    # ---------------------------------------------------------------- stage 2: copy back and scatter

    def _finish(self) -> None:
        while (item := self._copies.get()) is not None:
            number, batch, outputs = item
            start = time.perf_counter()
            if outputs and isinstance(outputs[-1], torch.cuda.Event):
                outputs[-1].synchronize()
                outputs = outputs[:-1]
            full, compressed, p0 = (outputs + (None, None))[:3]
            offset = 0
            for s in batch:
                work: _Work = s.job.payload
                n = s.num_tiles
                if work.full is None:
                    tiles = s.job.num_tiles
                    work.full = full.new_empty((tiles, *full.shape[1:]))
                    if work.vir is not None:
                        work.compressed = compressed.new_empty((tiles, *compressed.shape[1:]))
                        work.p0 = p0.new_empty(tiles)
                work.full[s.start:s.stop] = full[offset:offset + n]
                if work.vir is not None:
                    work.compressed[s.start:s.stop] = compressed[offset:offset + n]
                    work.p0[s.start:s.stop] = p0[offset:offset + n]
                offset += n
                work.tiles_done += n
                if work.tiles_done == s.job.num_tiles:
                    self._complete(work)
            if self._tracing:
                self.trace.append(("copy", number, start, time.perf_counter()))

    def _complete(self, work: _Work) -> None:
        tiles, hidden = work.full.shape[0], work.full.shape[-1]
        if work.vir is None:
            features, tile_tokens = work.full.reshape(-1, hidden), [work.full.shape[1]] * tiles
        else:
            compress = route(work.p0, work.vir.relative_threshold, work.vir.absolute_threshold).tolist()
            parts = [work.compressed[i] if c else work.full[i] for i, c in enumerate(compress)]
            features, tile_tokens = torch.cat(parts), [p.shape[0] for p in parts]
            metrics.VIR_TILES.labels("compressed").inc(sum(compress))
            metrics.VIR_TILES.labels("full").inc(tiles - sum(compress))
        self._tiles.inc(tiles)
        metrics.ENCODE.observe(time.perf_counter() - work.started)
        result = EncodedImage(features, tile_tokens)
        work.loop.call_soon_threadsafe(_resolve, work.future, result)

    def _fail(self, work: _Work, exc: Exception) -> None:
        work.loop.call_soon_threadsafe(_reject, work.future, exc)


def _resolve(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def _reject(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
