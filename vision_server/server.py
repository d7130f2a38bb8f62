"""Vision server process: the vision model + gRPC VisionService + the feature sender."""

from __future__ import annotations

import asyncio
import functools
import logging

import torch

from checkpoint.formats import read_model_config
from contracts.grpc_server import grpc_server, until_stopped
from proto import dvd_pb2_grpc
from transport.backends import FeatureSender
from vision_server import metrics
from vision_server.engine import VisionEngine
from vision_server.loader import load_vision_model
from vision_server.service import VisionService
from vision_server.settings import VisionServerSettings

log = logging.getLogger(__name__)


def pick_devices(settings: VisionServerSettings) -> tuple[list[torch.device], torch.dtype]:
    """Every GPU with bf16 when present, else the CPU with fp32, unless the settings say otherwise.

    `device` is "auto", one device ("cuda:1", "cpu") or a comma-separated list ("cuda:0,cuda:1").
    """
    if settings.device == "auto":
        count = torch.cuda.device_count()
        devices = [torch.device("cuda", i) for i in range(count)] if count else [torch.device("cpu")]
    else:
        devices = [torch.device(name.strip()) for name in settings.device.split(",")]
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if devices[0].type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return devices, dtype


def start_engine(settings: VisionServerSettings, device: torch.device, dtype: torch.dtype) -> VisionEngine:
    """One model copy and one scheduler per device."""
    model = load_vision_model(settings.model, device=device, dtype=dtype)
    if settings.compile:
        model = torch.compile(model)
    return VisionEngine(model, device=device, dtype=dtype, feature_dtype=getattr(torch, settings.feature_dtype),
                        max_batch_tiles=settings.max_batch_tiles, max_wait_s=settings.max_batch_wait_ms / 1e3)


async def serve(settings: VisionServerSettings) -> None:
    devices, dtype = pick_devices(settings)
    engines = [await asyncio.to_thread(start_engine, settings, device, dtype) for device in devices]
    secret = settings.feature_secret.get_secret_value() if settings.feature_secret else None
    sender = FeatureSender(send_timeout_s=settings.send_timeout_s,
                           max_inflight_bytes=settings.max_inflight_feature_bytes, secret=secret,
                           rdma=settings.feature_transport == "rdma", rdma_device=settings.rdma_device)
    metrics.FEATURE_INFLIGHT_BYTES.set_function(lambda: sender.inflight_bytes)
    service = VisionService(engines, read_model_config(settings.model), settings, sender, model_name=settings.model)
    max_message = settings.max_images_per_request * settings.max_image_bytes + (1 << 20)
    add_service = functools.partial(dvd_pb2_grpc.add_VisionServiceServicer_to_server, service)
    async with grpc_server(settings, add_service, max_message_bytes=max_message) as security:
        log.info("vision server ready: gRPC %s:%s (%s), %s %s, model %s", settings.host, settings.port, security,
                 ",".join(map(str, devices)), dtype, settings.model)
        await until_stopped()
        log.info("vision server stopping")
    service.close()
    for engine in engines:
        engine.close()
    sender.close()


def main(settings: VisionServerSettings) -> None:
    asyncio.run(serve(settings))
