"""Vision server settings: flags given on the command line, then `DVD_VISION_*` environment
variables, then these defaults."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.settings import GrpcServing, RequestLimits


class VisionServerSettings(BaseSettings, GrpcServing, RequestLimits):  # the shared pieces: contracts/settings.py
    model_config = SettingsConfigDict(env_prefix="DVD_VISION_")

    model: str = "checkpoints/tiny"  # the checkpoint `make up` writes
    port: int = 50051  # gRPC VisionService
    device: str = "auto"  # "auto": every GPU (one engine each), else the CPU; or "cuda:0,cuda:1", "cpu"
    compile: bool = False  # torch.compile the vision model (first batches of each shape compile)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    feature_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # on the wire
    default_max_tiles: int = 12
    max_tiles_limit: int = 128  # largest max_tiles a request may ask for (the model card's test-time limit)
    max_batch_tiles: int = 32  # tiles per encoder batch, across requests
    max_batch_wait_ms: float = 5.0  # how long the first waiting tile may wait for a fuller batch
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 64_000_000
    max_video_bytes: int = 64 << 20
    max_video_frames: int = 64  # frames sampled from one video (a request's num_frames)
    # Bounds on decoding one video (vision_server/video.py); over one, the request is refused naming it.
    max_video_length_frames: int = 36_000  # frames in the file, counted without decoding (20 min at 30 fps)
    max_video_decoded_frames: int = 2_048  # frames decoded (only groups holding a sampled frame are)
    max_video_decoded_pixels: int = 2_000_000_000  # width x height summed over them (~960 frames of 1080p)
    video_decode_timeout_s: float = 10.0  # wall clock for demuxing and decoding one video
    # Threads decoding and tiling images (PIL releases the GIL in both; benchmarks/preprocess.py measures it).
    # Default: the cores this process may run on.
    preprocess_workers: int = Field(default_factory=lambda: len(os.sched_getaffinity(0)), gt=0)
    send_timeout_s: float = 30.0
    feature_transport: Literal["tcp", "rdma"] = "tcp"  # rdma: also send to rdma:// endpoints (needs pyverbs)
    feature_secret: SecretStr | None = None  # shared with the language servers (CURVE on TCP, HMAC on RDMA)
    max_inflight_feature_bytes: int = 256 << 20  # per destination: handed to the transport, not yet written out
    rdma_device: str | None = None  # e.g. mlx5_0; None: the first RDMA device
