"""`contracts.grpc_server`: how the vision and language servers serve gRPC, on a real server in this process."""

from __future__ import annotations

import asyncio
import functools
import os
import signal

import grpc
import httpx

from contracts.grpc_server import grpc_server, until_stopped
from contracts.settings import GrpcServing
from launcher import free_port
from proto import dvd_pb2, dvd_pb2_grpc

SECRET = "an internal secret"
WITH_SECRET = [("authorization", f"Bearer {SECRET}")]


class Vision(dvd_pb2_grpc.VisionServiceServicer):
    async def Health(self, request, context):
        return dvd_pb2.HealthResponse(ready=True)

    async def Encode(self, request, context):
        return dvd_pb2.EncodeResponse(images=[dvd_pb2.ImageEncoding(image_index=len(request.images))])


async def status_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_grpc_server_checks_the_secret_bounds_messages_serves_metrics_and_stops_on_sigterm():
    settings = GrpcServing(port=free_port(), metrics_port=free_port(), internal_secret=SECRET)
    add_service = functools.partial(dvd_pb2_grpc.add_VisionServiceServicer_to_server, Vision())
    large = dvd_pb2.EncodeRequest(request_id="r", images=[dvd_pb2.ImageInput(data=bytes(4096))])

    async def scenario() -> None:
        async with grpc_server(settings, add_service, max_message_bytes=1024) as security, \
                grpc.aio.insecure_channel(f"127.0.0.1:{settings.port}") as channel:
            assert security == "plaintext"
            vision = dvd_pb2_grpc.VisionServiceStub(channel)
            assert (await vision.Health(dvd_pb2.HealthRequest(), timeout=10)).ready  # probes need no secret
            small = dvd_pb2.EncodeRequest(request_id="r", images=[dvd_pb2.ImageInput(data=b"x")])
            assert await status_of(vision.Encode(small, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
            reply = await vision.Encode(small, metadata=WITH_SECRET, timeout=10)
            assert reply.images[0].image_index == 1
            assert await status_of(vision.Encode(large, metadata=WITH_SECRET, timeout=10)) == \
                grpc.StatusCode.RESOURCE_EXHAUSTED
            page = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=10)
            assert page.status_code == 200 and "python_info" in page.text

            stopped = asyncio.ensure_future(until_stopped())
            await asyncio.sleep(0)  # its signal handlers are in place
            assert not stopped.done()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(stopped, 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.port}") as channel:
            health = dvd_pb2_grpc.VisionServiceStub(channel).Health(dvd_pb2.HealthRequest(), timeout=10)
            assert await status_of(health) == grpc.StatusCode.UNAVAILABLE  # stopped on leaving the block

    asyncio.run(scenario())


def test_until_stopped_returns_once_its_event_is_set():
    async def scenario() -> None:
        stop = asyncio.Event()
        stopped = asyncio.ensure_future(until_stopped(stop))
        await asyncio.sleep(0)
        assert not stopped.done()
        stop.set()
        await asyncio.wait_for(stopped, 30)

    asyncio.run(scenario())

