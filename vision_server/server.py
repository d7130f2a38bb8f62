"""Vision server process: the vision model + gRPC VisionService + the feature sender."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import torch
from prometheus_client import start_http_server

from proto import dvd_pb2_grpc
from transport.tcp import TcpFeatureSender
from vision_server.engine import VisionEngine
from vision_server.loader import load_vision_model
from vision_server.service import VisionService
from vision_server.settings import VisionServerSettings

log = logging.getLogger(__name__)


def pick_device(settings: VisionServerSettings) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when present, CPU with fp32 otherwise, unless the settings say otherwise."""
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype


async def serve(settings: VisionServerSettings) -> None:
    device, dtype = pick_device(settings)
    model = await asyncio.to_thread(load_vision_model, settings.model, device=device, dtype=dtype)
    sender = TcpFeatureSender(send_timeout_s=settings.send_timeout_s)
    engine = VisionEngine(model, device=device, dtype=dtype, feature_dtype=getattr(torch, settings.feature_dtype),
                          max_batch_tiles=settings.max_batch_tiles, max_wait_s=settings.max_batch_wait_ms / 1e3)
    service = VisionService(engine, model.config, settings, sender, model_name=settings.model)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_images_per_request
                                       * settings.max_image_bytes + (1 << 20))])
    dvd_pb2_grpc.add_VisionServiceServicer_to_server(service, server)
    address = f"{settings.host}:{settings.port}"
    server.add_insecure_port(address)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
    await server.start()
    log.info("vision server ready: gRPC %s, %s %s, model %s", address, device, dtype, settings.model)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("vision server stopping")
    await server.stop(grace=5)
    service.close()
    engine.close()
    sender.close()


def main(settings: VisionServerSettings) -> None:
    asyncio.run(serve(settings))
