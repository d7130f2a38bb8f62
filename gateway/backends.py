"""The vision and language servers behind the gateway, picked by fewest outstanding requests."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import grpc

from gateway.errors import APIError
from proto import dvd_pb2, dvd_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 512 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # A restarted server is found again within seconds, not after gRPC's default 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


@dataclass
class Backend:
    address: str
    stub: object
    channel: grpc.aio.Channel
    outstanding: int = 0
    description: dvd_pb2.ModelDescription | None = field(default=None)


class BackendPool:
    """One pool per server kind; `lease()` picks the least loaded server and counts the request on it."""

    def __init__(self, kind: str, addresses: list[str], stub_cls):
        self.kind = kind
        self.backends = []
        for address in addresses:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self.backends.append(Backend(address, stub_cls(channel), channel))

    @contextlib.contextmanager
    def lease(self, candidates: list[Backend] | None = None):
        candidates = self.backends if candidates is None else candidates
        if not candidates:
            raise APIError(503, f"no {self.kind} server is available")
        backend = min(candidates, key=lambda b: b.outstanding)
        backend.outstanding += 1
        try:
            yield backend
        finally:
            backend.outstanding -= 1

    async def close(self) -> None:
        for backend in self.backends:
            await backend.channel.close()


class LanguagePool(BackendPool):
    """Language servers also tell the gateway where their features go (`Describe`)."""

    def __init__(self, addresses: list[str]):
        super().__init__("language", addresses, dvd_pb2_grpc.LanguageServiceStub)

    async def describe(self, timeout_s: float = 2.0) -> list[Backend]:
        """Servers with a known description, asking those not yet described."""
        for backend in self.backends:
            if backend.description is None:
                try:
                    backend.description = await backend.stub.Describe(dvd_pb2.DescribeRequest(), timeout=timeout_s)
                except grpc.aio.AioRpcError as exc:
                    log.info("language server %s not ready: %s", backend.address, exc.code().name)
        return [b for b in self.backends if b.description is not None]


class VisionPool(BackendPool):
    def __init__(self, addresses: list[str]):
        super().__init__("vision", addresses, dvd_pb2_grpc.VisionServiceStub)


async def healthy(backend: Backend, timeout_s: float = 2.0) -> bool:
    try:
        reply = await backend.stub.Health(dvd_pb2.HealthRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return reply.ready
