"""Choosing a feature transport: a receiver by configuration, a sender by the destination's scheme.

`tcp://host:port` endpoints go over ZeroMQ, `rdma://host:port` endpoints over RDMA; both move the same
frames and make the same promises (bounded sends, drops counted, never a crash).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from transport.frames import ImageFeatures
from transport.tcp import TcpFeatureReceiver, TcpFeatureSender, TransportError

TransportKind = Literal["tcp", "rdma"]


def open_rdma_device(name: str | None):
    """The RDMA device for `rdma` transports; fails with the reason when this host has none."""
    from transport.rdma.verbs import PyverbsDevice

    return PyverbsDevice(name)


def build_receiver(
    kind: TransportKind,
    endpoint: str,
    on_features: Callable[[ImageFeatures], Awaitable[None] | None],
    *,
    max_payload_bytes: int,
    on_drop: Callable[[str], None],
    hidden_size: int | None,
    secret: str | None,
    rdma_device: str | None = None,
    rdma_slots: int = 4,
):
    """A `TcpFeatureReceiver` or `RdmaFeatureReceiver` bound to `endpoint` (whose scheme must match `kind`)."""
    scheme = endpoint.split("://", 1)[0]
    if scheme != kind:
        raise ValueError(f"feature transport {kind!r} cannot bind {endpoint!r}; use a {kind}://host:port endpoint")
    if kind == "tcp":
        return TcpFeatureReceiver(endpoint, on_features, max_payload_bytes=max_payload_bytes, on_drop=on_drop,
                                  hidden_size=hidden_size, secret=secret)
    from transport.rdma.protocol import RdmaFeatureReceiver

    return RdmaFeatureReceiver(endpoint, on_features, device=open_rdma_device(rdma_device),
                               max_payload_bytes=max_payload_bytes, on_drop=on_drop, hidden_size=hidden_size,
                               secret=secret, slots=rdma_slots)


class FeatureSender:
    """Sends over TCP to `tcp://` endpoints and, when RDMA is enabled, over RDMA to `rdma://` ones."""

    def __init__(
        self,
        *,
        send_timeout_s: float,
        max_inflight_bytes: int,
        secret: str | None = None,
        rdma: bool = False,
        rdma_device: str | None = None,
    ):
        self.tcp = TcpFeatureSender(send_timeout_s=send_timeout_s, max_inflight_bytes=max_inflight_bytes,
                                    secret=secret)
        self.rdma = None
        if rdma:
            from transport.rdma.protocol import RdmaFeatureSender

            try:
                self.rdma = RdmaFeatureSender(device=open_rdma_device(rdma_device), send_timeout_s=send_timeout_s,
                                              secret=secret)
            except BaseException:
                self.tcp.close()
                raise

    @property
    def inflight_bytes(self) -> int:
        return self.tcp.inflight_bytes

    async def send(self, endpoint: str, item: ImageFeatures) -> int:
        """Hand one image's features to the transport its endpoint names; returns the payload bytes."""
        if endpoint.startswith("rdma://"):
            if self.rdma is None:
                raise TransportError(f"{endpoint} needs the RDMA transport, which this server has off "
                                     "(feature_transport=tcp)")
            return await self.rdma.send(endpoint, item)
        return await self.tcp.send(endpoint, item)

    def close(self) -> None:
        self.tcp.close()
        if self.rdma is not None:
            self.rdma.close()
