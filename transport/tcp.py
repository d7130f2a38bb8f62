"""TCP feature transport over ZeroMQ: PUSH sockets on the vision side, one PULL socket per language server.

Each message is the two frames of `transport.frames`; the payload frame is sent zero-copy from the
tensor's memory. ZeroMQ reconnects by itself, and `MAXMSGSIZE` makes the receiver drop a peer that
sends more than a frame may hold before any of it is buffered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from transport.frames import FrameError, ImageFeatures, decode_frames, encode_frames

log = logging.getLogger(__name__)

HEADER_ROOM = 64 * 1024  # generous bound on a serialized FeatureHeader


class TransportError(RuntimeError):
    """Features could not be handed to the transport in time."""


class TcpFeatureSender:
    """Sends features to language servers' feature endpoints, one PUSH socket per endpoint."""

    def __init__(self, *, send_timeout_s: float = 30.0, high_water_mark: int = 64, checksum: bool = False):
        self._context = zmq.asyncio.Context()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._send_timeout_s = send_timeout_s
        self._high_water_mark = high_water_mark
        self._checksum = checksum

    def _socket(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, self._high_water_mark)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections, never for a dead peer
            try:
                sock.connect(endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)  # an unclosed socket would make close()'s context.term() hang
                raise
            self._sockets[endpoint] = sock
        return sock

    async def send(self, endpoint: str, item: ImageFeatures) -> int:
        """Queue one image's features for `endpoint`; returns the payload size in bytes."""
        header, payload = encode_frames(item, checksum=self._checksum)
        try:
            sock = self._socket(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"bad feature endpoint {endpoint!r}: {exc}") from None
        try:
            await asyncio.wait_for(sock.send_multipart([header, payload], copy=False), self._send_timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(
                f"feature endpoint {endpoint} accepted nothing for {self._send_timeout_s:g} s"
            ) from None
        return payload.nbytes

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        self._context.term()


class TcpFeatureReceiver:
    """Binds a PULL socket and hands every valid feature message to `on_features`; drops the rest."""

    def __init__(
        self,
        endpoint: str,
        on_features: Callable[[ImageFeatures], Awaitable[None] | None],
        *,
        max_payload_bytes: int,
        on_drop: Callable[[str], None] | None = None,
    ):
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_payload_bytes + HEADER_ROOM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._on_features = on_features
        self._on_drop = on_drop or (lambda reason: None)
        self._max_payload_bytes = max_payload_bytes

    async def run(self) -> None:
        """Receive until cancelled."""
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            if len(frames) != 2:
                log.warning("dropped a feature message of %d frames (expected 2)", len(frames))
                self._on_drop("frame_count")
                continue
            try:
                item = decode_frames(frames[0].bytes, frames[1].buffer, max_payload_bytes=self._max_payload_bytes)
            except FrameError as exc:
                log.warning("dropped a feature message: %s", exc)
                self._on_drop("malformed")
                continue
            result = self._on_features(item)
            if result is not None:
                await result

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
