"""Features cross real ZeroMQ sockets on 127.0.0.1 intact; bad peers are dropped and never stop the receiver."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio
import zmq.utils.monitor

from launcher import wait_until_async
from proto import dvd_pb2
from transport.auth import derive_keys
from transport.frames import ImageFeatures, decode_frames, encode_frames
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


class Received:
    """A running receiver on an ephemeral loopback port, with what it delivered and dropped."""

    def __init__(self, receiver: TcpFeatureReceiver):
        self.receiver = receiver
        self.items: list[ImageFeatures] = []
        self.drops: Counter[str] = Counter()


@contextlib.asynccontextmanager
async def running_receiver(
    max_payload_bytes: int = MAX_PAYLOAD, *, async_callback: bool = False, endpoint: str = ANY_PORT, **options
):
    received: Received

    def on_features(item):
        received.items.append(item)

    async def on_features_async(item):
        await asyncio.sleep(0)
        received.items.append(item)

    receiver = TcpFeatureReceiver(
        endpoint,
        on_features_async if async_callback else on_features,
        max_payload_bytes=max_payload_bytes,
        on_drop=lambda reason: received.drops.update([reason]),
        **options,
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
                await wait_until_async(lambda: len(got.items) == total, 5, "every message sent is delivered")

            assert not got.drops
            for prefix, sent in streams.items():
                arrived = [item for item in got.items if item.request_id.startswith(prefix + "-")]
                assert len(arrived) == len(sent)
                assert all(same(a, s) for a, s in zip(arrived, sent, strict=True))

    run(body())


def test_malformed_messages_are_dropped_by_reason_and_the_receiver_keeps_serving():
    async def body():
        async with running_receiver(hidden_size=16) as got:
            valid = make_item("ok-1", 0, 1)
            header, payload = encode_frames(valid)
            huge = dvd_pb2.FeatureHeader(
                request_id="huge",
                image_index=0,
                image_count=1,
                tile_tokens=[1 << 20],
                hidden_size=16,
                dtype=dvd_pb2.FLOAT32,
                payload_bytes=(1 << 20) * 16 * 4,
            ).SerializeToString()
            wrong_width_header, wrong_width_payload = encode_frames(make_item("wide", 0, 1, hidden=32))
            unknown_dtype = dvd_pb2.FeatureHeader.FromString(header)
            unknown_dtype.dtype = 7
            with raw_push(got.receiver.endpoint) as push:
                await push.send_multipart([b"one frame only"])
                await push.send_multipart([header, bytes(payload), b"a third frame"])
                await push.send_multipart([b"\xff\xfe not a protobuf", bytes(payload)])
                await push.send_multipart([header, bytes(payload)[:-1]])
                await push.send_multipart([huge, b"\0" * 64])
                await push.send_multipart([b"", b""])
                await push.send_multipart([wrong_width_header, bytes(wrong_width_payload)])
                await push.send_multipart([unknown_dtype.SerializeToString(), bytes(payload)])
                # A well-formed message on the same connection, after all of the above.
                await push.send_multipart([header, bytes(payload)])
                await wait_until_async(lambda: len(got.items) == 1, 5, "one message delivered")

            assert got.drops == Counter(
                {"frame_count": 2, "bad_header": 2, "payload_length": 1, "oversized": 1, "hidden_size": 1, "dtype": 1}
            )
            assert same(got.items[0], valid)

            # And a proper sender is still served afterwards.
            later = make_item("ok-2", 0, 1)
            with sender() as s:
                await s.send(got.receiver.endpoint, later)
                await wait_until_async(lambda: len(got.items) == 2, 5, "two messages delivered")
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
                await wait_until_async(lambda: len(got.items) == 1, 5, "one message delivered")

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
    """The send gives up on its own timeout: a send with a far longer one, started first to the same nobody, is
    still waiting when it fails (the run's deadline bounds it from above)."""
    endpoint = unused_loopback_endpoint()

    async def body():
        with sender(send_timeout_s=0.5) as short, sender(send_timeout_s=DEADLINE_S) as long:
            patient = asyncio.create_task(long.send(endpoint, make_item("patient", 0, 1)))
            with pytest.raises(TransportError, match=rf"{endpoint} accepted nothing for 0\.5 s"):
                await short.send(endpoint, make_item("nobody", 0, 1))
            assert not patient.done()
            patient.cancel()
            with pytest.raises(asyncio.CancelledError):
                await patient

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
                await wait_until_async(lambda: len(got.items) == 1, 8, "one message delivered")

            assert not got.drops
            arrived = got.items[0]
            assert arrived.features.shape == (tiles * tokens, hidden)
            assert arrived.features.dtype == torch.bfloat16
            assert torch.equal(arrived.features.view(torch.uint8), raw)

    run(body())


# --- hardening: reconnects, backpressure, hostile peers, authentication ---------------------------------


def test_sender_recovers_when_the_receiver_restarts_on_the_same_endpoint():
    endpoint = unused_loopback_endpoint()

    async def body():
        with sender(send_timeout_s=1.0) as s:
            async with running_receiver(endpoint=endpoint) as got:
                first = make_item("before-restart", 0, 1)
                await s.send(endpoint, first)
                await wait_until_async(lambda: len(got.items) == 1, 5, "one message delivered")
                assert same(got.items[0], first)
                # A message sent before the sender's ZeroMQ thread has seen the peer go is lost with the peer
                # (one-way transport); wait for that moment, then no message may be queued for the dead peer.
                monitor = s._endpoints[endpoint].sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            try:
                event = zmq.utils.monitor.parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))
                assert event["event"] == zmq.EVENT_DISCONNECTED
            finally:
                s._endpoints[endpoint].sock.disable_monitor()
                monitor.close(linger=0)
            # Receiver gone: nothing is queued for a dead peer, the send fails within its timeout.
            with pytest.raises(TransportError, match="accepted nothing for 1 s"):
                await s.send(endpoint, make_item("while-down", 0, 1))
            async with running_receiver(endpoint=endpoint) as got:
                after = make_item("after-restart", 0, 1)
                await s.send(endpoint, after)  # waits for ZeroMQ's reconnect, well within the timeout
                await wait_until_async(lambda: len(got.items) == 1, 5, "one message delivered")
                assert [item.request_id for item in got.items] == ["after-restart"]
                assert same(got.items[0], after)

    run(body())


def test_sender_bounds_in_flight_bytes_when_the_receiver_stops_reading_and_delivers_all_later():
    """Without the byte budget ZeroMQ would queue SNDHWM (64) whole messages; with it the sender blocks."""
    message_bytes, budget = 1 << 20, 2 << 20

    async def body():
        context = zmq.asyncio.Context()
        pull = context.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 1)
        pull.setsockopt(zmq.RCVBUF, 64 << 10)
        pull.setsockopt(zmq.LINGER, 0)
        try:
            pull.bind(ANY_PORT)
            endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
            with sender(send_timeout_s=0.5, max_inflight_bytes=budget, high_water_mark=64) as s:
                accepted, peak = [], 0
                for n in range(64):
                    item = make_item(f"bp-{n}", 0, 1, tile_tokens=(message_bytes // 64,), hidden=32)
                    try:
                        await s.send(endpoint, item)
                    except TransportError as exc:
                        assert "bytes still in flight" in str(exc)
                        break
                    accepted.append(item)
                    peak = max(peak, s.inflight_bytes)
                assert peak <= budget
                # Budget plus what the kernel's loopback buffers hold: far from 64 messages.
                assert 2 <= len(accepted) < 32, len(accepted)

                arrived = []
                while len(arrived) < len(accepted):
                    frames = await asyncio.wait_for(pull.recv_multipart(), 5.0)
                    arrived.append(decode_frames(frames[0], frames[1], max_payload_bytes=MAX_PAYLOAD))
                assert all(same(a, b) for a, b in zip(arrived, accepted, strict=True))
                await wait_until_async(lambda: s.inflight_bytes == 0, 5, "the sender holds no bytes in flight")
        finally:
            pull.close(linger=0)
            context.term()

    run(body())


def zmtp_greeting() -> bytes:
    """A ZMTP 3.0 greeting with the NULL mechanism, as a client."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


def zmtp_ready(socket_type: bytes) -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return b"\x04" + bytes([len(body)]) + body


def zmtp_frame(data: bytes, *, more: bool) -> bytes:
    return bytes([0x02 | (0x01 if more else 0)]) + struct.pack(">Q", len(data)) + data


def test_a_peer_that_dies_mid_message_loses_only_that_message():
    async def body():
        async with running_receiver() as got:
            cut = make_item("cut-short", 0, 1, tile_tokens=(64,), hidden=64)
            header, payload = encode_frames(cut)
            host, port = got.receiver.endpoint.removeprefix("tcp://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            # A genuine ZMTP 3.0 handshake, one step at a time as libzmq expects.
            writer.write(zmtp_greeting())
            assert (await reader.readexactly(64))[:1] == b"\xff"
            writer.write(zmtp_ready(b"PUSH"))
            assert b"READY" in await reader.readexactly(len(zmtp_ready(b"PULL")))
            writer.write(zmtp_frame(header, more=True))
            whole = zmtp_frame(bytes(payload), more=False)
            writer.write(whole[: len(whole) // 2])
            await writer.drain()
            writer.transport.abort()  # the peer dies with half a payload sent

            valid = make_item("after-cut", 0, 1, tile_tokens=(64,), hidden=64)
            with sender() as s:
                await s.send(got.receiver.endpoint, valid)
                await wait_until_async(lambda: len(got.items) == 1, 5, "one message delivered")
            assert [item.request_id for item in got.items] == ["after-cut"]
            assert same(got.items[0], valid)

    run(body())


def test_raw_garbage_on_the_feature_port_is_counted_and_the_receiver_keeps_serving():
    async def body():
        async with running_receiver() as got:
            host, port = got.receiver.endpoint.removeprefix("tcp://").rsplit(":", 1)
            for garbage in (b"\xff" + b"\x01" * 9 + b"GET / HTTP/1.1\r\n" * 8, zmtp_greeting()[:10] + b"\x09" * 54):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(garbage)
                await writer.drain()
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                    await asyncio.wait_for(reader.read(), 5.0)  # the receiver hangs up on it
                writer.close()
            await wait_until_async(lambda: got.drops["handshake"] == 2, 5, "two drops counted as handshake")

            valid = make_item("after-garbage", 0, 1)
            with sender() as s:
                await s.send(got.receiver.endpoint, valid)
                await wait_until_async(lambda: len(got.items) == 1, 5, "one message delivered")
            assert same(got.items[0], valid)

    run(body())


SECRET = "correct horse battery staple"


def test_with_a_shared_secret_only_senders_holding_it_deliver_features():
    async def body():
        async with running_receiver(secret=SECRET) as got:
            endpoint = got.receiver.endpoint
            with sender(send_timeout_s=0.5) as plain:
                # The handshake never completes: nothing is accepted.
                with pytest.raises(TransportError, match=r"accepted nothing for 0\.5 s"):
                    await plain.send(endpoint, make_item("no-secret", 0, 1))
            with sender(send_timeout_s=0.5, secret="a different secret, long enough") as wrong:
                with pytest.raises(TransportError, match=r"accepted nothing for 0\.5 s"):
                    await wrong.send(endpoint, make_item("wrong-secret", 0, 1))
            # A peer that learned the receiver's public key but not the secret fails ZAP.
            context = zmq.asyncio.Context()
            impostor = context.socket(zmq.PUSH)
            impostor.setsockopt(zmq.LINGER, 0)
            try:
                impostor.curve_serverkey = derive_keys(SECRET, "receiver").public
                impostor.curve_publickey, impostor.curve_secretkey = zmq.curve_keypair()
                impostor.connect(endpoint)
                await impostor.send_multipart(list(encode_frames(make_item("impostor", 0, 1))))
                await wait_until_async(lambda: got.drops["auth"] >= 1, 5, "a drop counted as auth")
            finally:
                impostor.close(linger=0)
                context.term()
            await wait_until_async(lambda: got.drops["handshake"] >= 2, 5, "two drops counted as handshake")

            valid = make_item("with-secret", 0, 1)
            with sender(secret=SECRET) as right:
                await right.send(endpoint, valid)
                await wait_until_async(lambda: len(got.items) == 1, 5, "one message delivered")
            assert [item.request_id for item in got.items] == ["with-secret"]
            assert same(got.items[0], valid)

    run(body())


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError, match="at least 16 characters, got 5"):
        derive_keys("short", "sender")


def test_sends_within_the_budget_need_no_tracker_thread_and_still_drain_to_zero():
    async def body():
        before = set(threading.enumerate())  # other tests' senders may still be winding theirs down
        async with running_receiver() as got:
            with sender() as s:
                for n in range(8):
                    await s.send(got.receiver.endpoint, make_item(f"fit-{n}", 0, 1))
                await wait_until_async(lambda: len(got.items) == 8, 5, "eight messages delivered")
                await wait_until_async(lambda: s.inflight_bytes == 0, 5, "the sender holds no bytes in flight")
                assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("dvd-feature-tracker")]

    run(body())


# Receives 2 MiB payloads the way a language server does (it holds a few until their requests claim
# them) and prints the minor page faults of the last 25; argv[1] == "untuned" skips the allocator setting.
PAGE_FAULT_PROBE = """
import asyncio, collections, resource, sys
import transport.tcp as tcp
from transport.frames import ImageFeatures
if sys.argv[1] == "untuned":
    tcp.keep_payload_memory_for_reuse = lambda: False
import torch

async def main():
    faults, held = [], collections.deque(maxlen=4)
    def on_features(item):
        held.append(item)
        if len(faults) < 8 or len(faults) == 32:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        else:
            faults.append(None)
    receiver = tcp.TcpFeatureReceiver("tcp://127.0.0.1:*", on_features, max_payload_bytes=2 << 20)
    task = asyncio.create_task(receiver.run())
    sender = tcp.TcpFeatureSender()
    payload = torch.zeros(256, 4096, dtype=torch.bfloat16)
    for n in range(33):
        await sender.send(receiver.endpoint, ImageFeatures(f"r{n}", 0, 1, [256], payload))
        while len(faults) <= n:  # one at a time, so that only the held payloads share the heap
            await asyncio.sleep(0.001)
    while len(faults) < 33:
        await asyncio.sleep(0.001)
    sender.close()
    task.cancel()
    receiver.close()
    print(faults[-1] - faults[7])

asyncio.run(main())
"""


def run_page_fault_probe(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PAGE_FAULT_PROBE, mode], capture_output=True, text=True,
                          timeout=150, cwd=Path(__file__).parent.parent)  # a fresh interpreter imports torch
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
@pytest.mark.timeout(180)
def test_received_payloads_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    pages_per_payload = (2 << 20) // resource.getpagesize()
    # 25 payloads, four held at a time: untuned glibc faults in two payloads' pages afresh; tuned, a handful
    assert run_page_fault_probe("tuned") < pages_per_payload // 2
