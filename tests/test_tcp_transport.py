"""Features cross real ZeroMQ sockets on 127.0.0.1 intact; bad peers are dropped and never stop the receiver."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter

import pytest
import torch
import zmq
import zmq.asyncio
import zmq.utils.monitor

from proto import dvd_pb2
from transport.frames import ImageFeatures, encode_frames
from transport.tcp import HEADER_ROOM, TcpFeatureReceiver, TcpFeatureSender, TransportError

pytestmark = pytest.mark.timeout(30)

ANY_PORT = "tcp://127.0.0.1:*"
MAX_PAYLOAD = 1 << 20
DEADLINE_S = 10.0  # bound on every test's event loop


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


def make_item(
    request_id: str, index: int, count: int, tile_tokens=(3, 2), hidden=16, dtype=torch.bfloat16
) -> ImageFeatures:
    itemsize = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(hash((request_id, index)) & 0xFFFF)
    raw = torch.randint(0, 256, (sum(tile_tokens), hidden * itemsize), dtype=torch.uint8, generator=generator)
    return ImageFeatures(request_id, index, count, list(tile_tokens), raw.view(dtype))


def same(a: ImageFeatures, b: ImageFeatures) -> bool:
    return (
        (a.request_id, a.image_index, a.image_count, a.tile_tokens)
        == (b.request_id, b.image_index, b.image_count, b.tile_tokens)
        and a.features.dtype == b.features.dtype
        and torch.equal(a.features.view(torch.uint8), b.features.view(torch.uint8))
    )


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)


class Received:
    """A running receiver on an ephemeral loopback port, with what it delivered and dropped."""

    def __init__(self, receiver: TcpFeatureReceiver):
        self.receiver = receiver
        self.items: list[ImageFeatures] = []
        self.drops: Counter[str] = Counter()


@contextlib.asynccontextmanager
async def running_receiver(max_payload_bytes: int = MAX_PAYLOAD, *, async_callback: bool = False):
    received: Received

    def on_features(item):
        received.items.append(item)

    async def on_features_async(item):
        await asyncio.sleep(0)
        received.items.append(item)

    receiver = TcpFeatureReceiver(
        ANY_PORT,
        on_features_async if async_callback else on_features,
        max_payload_bytes=max_payload_bytes,
        on_drop=lambda reason: received.drops.update([reason]),
    )
    received = Received(receiver)
    task = asyncio.create_task(receiver.run())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        receiver.close()


@contextlib.contextmanager
def sender(**kwargs):
    s = TcpFeatureSender(**{"send_timeout_s": 5.0, **kwargs})
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def raw_push(endpoint: str, *, monitor_events: int = 0):
    """A bare PUSH socket: a peer that speaks ZeroMQ but not necessarily our format.

    With `monitor_events`, yields `(socket, monitor)`; the monitor is attached before connecting so
    that no event is missed.
    """
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(monitor_events) if monitor_events else None
    sock.connect(endpoint)
    try:
        yield (sock, monitor) if monitor_events else sock
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        context.term()


def test_receiver_reports_a_concrete_loopback_endpoint():
    async def body():
        async with running_receiver() as got:
            assert got.receiver.endpoint.startswith("tcp://127.0.0.1:")
            assert not got.receiver.endpoint.endswith(":*")

    run(body())


@pytest.mark.parametrize("async_callback", [False, True], ids=["sync-callback", "async-callback"])
def test_images_of_several_requests_arrive_intact_and_in_order_per_sender(async_callback):
    async def body():
        async with running_receiver(async_callback=async_callback) as got:
            streams = {
                "a": [make_item(f"a-{r}", i, 3) for r in range(3) for i in range(3)],
                "b": [
                    make_item(f"b-{r}", i, 2, tile_tokens=(1,), hidden=8, dtype=torch.float32)
                    for r in range(4)
                    for i in range(2)
                ],
            }
            with sender() as sa, sender(checksum=True) as sb:

                async def send_all(s, items):
                    for item in items:
                        assert await s.send(got.receiver.endpoint, item) == item.num_bytes

                await asyncio.gather(send_all(sa, streams["a"]), send_all(sb, streams["b"]))
                total = sum(len(v) for v in streams.values())
                await wait_until(lambda: len(got.items) == total)

            assert not got.drops
            for prefix, sent in streams.items():
                arrived = [item for item in got.items if item.request_id.startswith(prefix + "-")]
                assert len(arrived) == len(sent)
                assert all(same(a, s) for a, s in zip(arrived, sent, strict=True))

    run(body())


def test_malformed_messages_are_dropped_by_reason_and_the_receiver_keeps_serving():
    async def body():
        async with running_receiver() as got:
            valid = make_item("ok-1", 0, 1)
            header, payload = encode_frames(valid)
            huge = dvd_pb2.FeatureHeader(
                request_id="huge",
                image_index=0,
                image_count=1,
                tile_tokens=[1 << 20],
                hidden_size=4096,
                dtype=dvd_pb2.FLOAT32,
                payload_bytes=(1 << 20) * 4096 * 4,
            ).SerializeToString()
            with raw_push(got.receiver.endpoint) as push:
                await push.send_multipart([b"one frame only"])
                await push.send_multipart([header, bytes(payload), b"a third frame"])
                await push.send_multipart([b"\xff\xfe not a protobuf", bytes(payload)])
                await push.send_multipart([header, bytes(payload)[:-1]])
                await push.send_multipart([huge, b"\0" * 64])
                await push.send_multipart([b"", b""])
                # A well-formed message on the same connection, after all of the above.
                await push.send_multipart([header, bytes(payload)])
                await wait_until(lambda: len(got.items) == 1)

            assert got.drops == Counter({"frame_count": 2, "malformed": 4})
            assert same(got.items[0], valid)

            # And a proper sender is still served afterwards.
            later = make_item("ok-2", 0, 1)
            with sender() as s:
                await s.send(got.receiver.endpoint, later)
                await wait_until(lambda: len(got.items) == 2)
            assert same(got.items[1], later)

    run(body())


def test_message_over_maxmsgsize_is_not_delivered_and_later_senders_are_served():
    max_payload = 64 << 10

    async def body():
        async with running_receiver(max_payload_bytes=max_payload) as got:
            rows = (max_payload + HEADER_ROOM) // (16 * 4) + 1
            oversized = make_item("big", 0, 1, tile_tokens=(rows,), hidden=16, dtype=torch.float32)
            assert oversized.num_bytes > max_payload + HEADER_ROOM
            header, payload = encode_frames(oversized)
            events = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
            with raw_push(got.receiver.endpoint, monitor_events=events) as (push, monitor):
                assert (await next_event(monitor))["event"] == zmq.EVENT_CONNECTED
                await push.send_multipart([header, payload], copy=False)
                # ZeroMQ cuts the peer off at the oversized frame, before buffering it.
                assert (await next_event(monitor))["event"] == zmq.EVENT_DISCONNECTED

            valid = make_item("after-big", 0, 1)
            with sender() as s:
                await s.send(got.receiver.endpoint, valid)
                await wait_until(lambda: len(got.items) == 1)

            assert [item.request_id for item in got.items] == ["after-big"]
            assert same(got.items[0], valid)
            assert not got.drops  # never delivered: neither a partial message nor a decode failure

    run(body())


async def next_event(monitor) -> dict:
    return zmq.utils.monitor.parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 5.0))


def unused_loopback_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_send_to_an_endpoint_nobody_listens_on_fails_within_the_send_timeout():
    endpoint = unused_loopback_endpoint()

    async def body():
        with sender(send_timeout_s=0.5) as s:
            started = time.monotonic()
            with pytest.raises(TransportError, match=rf"{endpoint} accepted nothing for 0\.5 s"):
                await s.send(endpoint, make_item("nobody", 0, 1))
            elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 2.0

    run(body())


def test_bad_endpoint_raises_transport_error_and_close_does_not_hang():
    async def body():
        s = TcpFeatureSender(send_timeout_s=0.5)
        with pytest.raises(TransportError, match="bad feature endpoint 'tcp://nonsense'") as caught:
            await s.send("tcp://nonsense", make_item("x", 0, 1))
        # Holding on to the error (as a log record or a future would) must not keep a socket open.
        close = asyncio.get_running_loop().run_in_executor(None, s.close)
        await asyncio.wait_for(close, 3.0)
        assert caught.value is not None

    run(body())


def test_a_26_mib_bf16_image_arrives_bit_exact():
    tiles, tokens, hidden = 13, 256, 4096

    async def body():
        async with running_receiver(max_payload_bytes=32 << 20) as got:
            raw = torch.randint(
                0,
                256,
                (tiles * tokens, hidden * 2),
                dtype=torch.uint8,
                generator=torch.Generator().manual_seed(26),
            )
            item = ImageFeatures("large", 0, 1, [tokens] * tiles, raw.view(torch.bfloat16))
            assert item.num_bytes == 26 << 20
            with sender(checksum=True) as s:
                assert await s.send(got.receiver.endpoint, item) == 26 << 20
                await wait_until(lambda: len(got.items) == 1, timeout_s=8.0)

            assert not got.drops
            arrived = got.items[0]
            assert arrived.features.shape == (tiles * tokens, hidden)
            assert arrived.features.dtype == torch.bfloat16
            assert torch.equal(arrived.features.view(torch.uint8), raw)

    run(body())
