"""How the vision and language servers serve gRPC: the internal secret checked on every call, TLS when
configured, their metrics page, and a stop on SIGINT/SIGTERM with a grace period for calls in progress."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable

import grpc
from prometheus_client import start_http_server

from contracts.grpc_secret import server_interceptors
from contracts.grpc_tls import add_port
from contracts.settings import GrpcServing

STOP_GRACE_S = 5.0  # calls in progress may finish this long after a stop


@contextlib.asynccontextmanager
async def grpc_server(settings: GrpcServing, add_service: Callable[[grpc.aio.Server], None], *,
                      max_message_bytes: int) -> AsyncIterator[str]:
    """A started gRPC server holding the service that `add_service` adds, listening where `settings` say and
    stopped on leaving; yields how it is secured ("tls", "mtls" or "plaintext") for the ready log line.

    `max_message_bytes` bounds a request's size before it is parsed."""
    server = grpc.aio.server(interceptors=server_interceptors(settings.secret()),
                             options=[("grpc.max_receive_message_length", max_message_bytes)])
    add_service(server)
    security = add_port(server, f"{settings.host}:{settings.port}", settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
    await server.start()
    try:
        yield security
    finally:
        await server.stop(grace=STOP_GRACE_S)


async def until_stopped(stop: asyncio.Event | None = None) -> None:
    """Return on SIGINT or SIGTERM, or once `stop` is set (a server that must exit by itself sets it)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
