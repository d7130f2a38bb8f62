"""TCP feature transport over ZeroMQ: PUSH sockets on the vision side, one PULL socket per language server.

Each message is the two frames of `transport.frames`; the payload frame is sent zero-copy from the
tensor's memory. ZeroMQ reconnects by itself, never delivers part of a multipart message (a peer that
dies mid-message loses that message only), and `MAXMSGSIZE` makes the receiver drop a peer that sends
more than a frame may hold before any of it is buffered. The sender bounds the payload bytes it has
handed to ZeroMQ but ZeroMQ has not yet written out, per endpoint: a slow receiver slows its senders
instead of growing a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import operator
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio
import zmq.utils.monitor

from transport.auth import secure_receiver_socket, secure_sender_socket
from transport.frames import FrameError, ImageFeatures, decode_frames, encode_frames

log = logging.getLogger(__name__)

HEADER_ROOM = 64 * 1024  # generous bound on a serialized FeatureHeader
DRAIN_LIMIT = 32  # messages taken straight from the queue before the receiver yields to the event loop
DEFAULT_MAX_INFLIGHT_BYTES = 256 << 20

# Connection events the receiver counts as drops: a peer that failed the handshake (not ZeroMQ, wrong
# or missing secret) could deliver nothing.
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
}


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit hosts (half an arena heap).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_HEAP_MMAP_THRESHOLD = 32 << 20
KEPT_FREE_HEAP_BYTES = 64 << 20


def keep_payload_memory_for_reuse() -> bool:
    """Make glibc serve received payloads from memory freed by earlier ones; False where that is not glibc.

    libzmq allocates every received message in its I/O thread. By default glibc returns a freed payload's
    pages to the kernel (mmap for large blocks, madvise when a thread arena's top grows), so each new
    payload page-faults and is zeroed again as the socket fills it: more kernel time than the copy out of
    the socket. Payloads up to 32 MiB now come from the heap, and up to 64 MiB of freed heap stays mapped.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MAX_HEAP_MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEPT_FREE_HEAP_BYTES)
    )


class TransportError(RuntimeError):
    """Features could not be handed to the transport in time."""


class _Endpoint:
    """One PUSH socket and its in-flight byte budget.

    A payload counts as in flight from `send` until ZeroMQ releases its buffer (written to the kernel, or
    discarded). ZeroMQ releases them in send order on one socket, so released payloads are reaped from
    the oldest whenever the budget is read; only a send that finds the budget full waits, in a thread,
    for the oldest payload to go (a thread hop per message would cost more than the copy it saves).
    """

    def __init__(self, sock: zmq.asyncio.Socket, max_bytes: int):
        self.sock = sock
        self.max_bytes = max_bytes
        self._bytes = 0  # sent and not yet released, plus reserved by sends under way
        self._sent: deque[tuple[zmq.MessageTracker, int]] = deque()
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvd-feature-tracker")

    @property
    def inflight_bytes(self) -> int:
        while self._sent and self._sent[0][0].done:
            self._bytes -= self._sent.popleft()[1]
        return self._bytes

    async def send(self, header: bytes, payload: memoryview) -> None:
        """Wait until the payload fits the budget (one larger than the budget goes alone), then queue it."""
        num_bytes = payload.nbytes
        loop = asyncio.get_running_loop()
        while self.inflight_bytes and self.inflight_bytes + num_bytes > self.max_bytes:
            if self._sent:
                await loop.run_in_executor(self._waiter, self._sent[0][0].wait)
            else:  # the budget is held by sends under way on other tasks; they hold it only briefly
                await asyncio.sleep(0.001)
        self._bytes += num_bytes
        try:
            tracker = await self.sock.send_multipart([header, payload], copy=False, track=True)
        except BaseException:
            self._bytes -= num_bytes
            raise
        self._sent.append((tracker, num_bytes))

    def close(self) -> None:
        self.sock.close(linger=0)  # frees every queued message, so a waiting tracker thread finishes
        self._waiter.shutdown(wait=False)


class TcpFeatureSender:
    """Sends features to language servers' feature endpoints, one PUSH socket per endpoint."""

    def __init__(
        self,
        *,
        send_timeout_s: float = 30.0,
        high_water_mark: int = 64,
        checksum: bool = False,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        secret: str | None = None,
    ):
        self._context = zmq.asyncio.Context()
        self._endpoints: dict[str, _Endpoint] = {}
        self._send_timeout_s = send_timeout_s
        self._high_water_mark = high_water_mark
        self._checksum = checksum
        self._max_inflight_bytes = max_inflight_bytes
        self._secret = secret

    @property
    def inflight_bytes(self) -> int:
        """Payload bytes handed to ZeroMQ and not yet written out, over all endpoints."""
        return sum(endpoint.inflight_bytes for endpoint in self._endpoints.values())

    def _endpoint(self, endpoint: str) -> _Endpoint:
        state = self._endpoints.get(endpoint)
        if state is None:
            sock = self._context.socket(zmq.PUSH)
            try:
                sock.setsockopt(zmq.SNDHWM, self._high_water_mark)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections, never for a dead peer
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)  # back off to 1 s while a receiver is down
                if self._secret:
                    secure_sender_socket(sock, self._secret)
                sock.connect(endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)  # an unclosed socket would make close()'s context.term() hang
                raise
            state = self._endpoints[endpoint] = _Endpoint(sock, self._max_inflight_bytes)
        return state

    async def send(self, endpoint: str, item: ImageFeatures) -> int:
        """Queue one image's features for `endpoint`; returns the payload size in bytes."""
        header, payload = encode_frames(item, checksum=self._checksum)
        try:
            state = self._endpoint(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"bad feature endpoint {endpoint!r}: {exc}") from None
        try:
            await asyncio.wait_for(state.send(header, payload), self._send_timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(
                f"feature endpoint {endpoint} accepted nothing for {self._send_timeout_s:g} s "
                f"({state.inflight_bytes} bytes still in flight to it)"
            ) from None
        return payload.nbytes

    def close(self) -> None:
        for state in self._endpoints.values():
            state.close()
        self._endpoints.clear()
        self._context.term()


class TcpFeatureReceiver:
    """Binds a PULL socket and hands every valid feature message to `on_features`; drops and counts the rest.

    `on_drop(reason)` is called once per message that cannot be delivered, and once per peer that fails
    the handshake. With `hidden_size`, features of another width are dropped. With `secret`, only senders
    holding the same secret can connect (construct the receiver inside a running event loop then).
    """

    def __init__(
        self,
        endpoint: str,
        on_features: Callable[[ImageFeatures], Awaitable[None] | None],
        *,
        max_payload_bytes: int,
        on_drop: Callable[[str], None] | None = None,
        hidden_size: int | None = None,
        secret: str | None = None,
    ):
        keep_payload_memory_for_reuse()
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._authenticator = None
        self._monitor = None
        try:
            self._socket.setsockopt(zmq.MAXMSGSIZE, max_payload_bytes + HEADER_ROOM)
            self._socket.setsockopt(zmq.LINGER, 0)
            if secret:
                self._authenticator = secure_receiver_socket(self._socket, self._context, secret)
            self._monitor = self._socket.get_monitor_socket(functools.reduce(operator.or_, HANDSHAKE_FAILURES))
            self._socket.bind(endpoint)
        except BaseException:
            self.close()
            raise
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._on_features = on_features
        self._on_drop = on_drop or (lambda reason: None)
        self._max_payload_bytes = max_payload_bytes
        self._hidden_size = hidden_size

    async def run(self) -> None:
        """Receive until cancelled."""
        watch = asyncio.create_task(self._count_failed_handshakes())
        try:
            queued = zmq.Socket.shadow(self._socket.underlying)  # the same socket, without asyncio
            while True:
                await self._deliver(await self._socket.recv_multipart(copy=False))
                # Messages already queued are taken without a round through the event loop each.
                for _ in range(DRAIN_LIMIT):
                    try:
                        frames = queued.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    await self._deliver(frames)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _deliver(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            log.warning("dropped a feature message of %d frames (expected 2)", len(frames))
            self._on_drop("frame_count")
            return
        try:
            item = decode_frames(
                frames[0].bytes, frames[1].buffer, max_payload_bytes=self._max_payload_bytes,
                hidden_size=self._hidden_size,
            )
        except FrameError as exc:
            log.warning("dropped a feature message: %s", exc)
            self._on_drop(exc.reason)
            return
        result = self._on_features(item)
        if result is not None:
            await result

    async def _count_failed_handshakes(self) -> None:
        while True:
            event = zmq.utils.monitor.parse_monitor_message(await self._monitor.recv_multipart())
            reason = HANDSHAKE_FAILURES.get(event["event"])
            if reason:
                log.warning("feature peer %s failed the handshake (%s)", event["endpoint"], reason)
                self._on_drop(reason)

    def close(self) -> None:
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

