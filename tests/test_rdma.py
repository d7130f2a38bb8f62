"""RDMA feature transport: the protocol (set-up, framing, credits, slot recycling, ordering, error paths,
teardown) tested through an in-process loopback of the verbs layer.

Stand-in, stated plainly: this machine has no RDMA device and pyverbs is not installed, so
`LoopbackFabric` below implements the *verbs layer only* (`transport.rdma.verbs.Device` / `QueuePair`:
register, post receive, RDMA WRITE with immediate, SEND with immediate, completions) in process. Everything
above it is the real code: the TCP side channel is a real socket, the sender and receiver are the ones the
servers run. `test_real_device_*` use pyverbs on a real device and are skipped here with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import threading
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher import wait_until_async
from transport.frames import FrameError, ImageFeatures, encode_frames
from transport.rdma.protocol import (
    CreditWindow,
    ProtocolError,
    RdmaFeatureReceiver,
    RdmaFeatureSender,
    fill_slot,
    pack_imm,
    read_slot,
    slot_bytes_for,
    unpack_imm,
)
from transport.rdma.verbs import Completion, MemoryRegion, Opcode, PyverbsDevice, QpInfo, VerbsError
from transport.rdma.verbs import rdma_unavailable_reason as unavailable
from transport.tcp import TransportError

pytestmark = pytest.mark.timeout(60)

MAX_PAYLOAD = 64 << 10
DEADLINE_S = 20.0
SECRET = "correct horse battery staple"


# --- the verbs-layer stand-in ---------------------------------------------------------------------------


class LoopbackFabric:
    """Queue pairs of one process wired to each other; writes copy between registered buffers.

    Test hooks: `mangle_next_write(data, imm) -> (data, imm)`, `hold_sends` (credits are queued, not
    delivered, until `release_sends()`), `break_links()` (every queue pair goes to the error state).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.qps: dict[int, LoopbackQueuePair] = {}
        self.regions: dict[int, tuple[LoopbackQueuePair, MemoryRegion]] = {}
        self.ids = itertools.count(1)
        self.mangle_next_write = None
        self.hold_sends = False
        self.held: list[tuple[LoopbackQueuePair, int, int]] = []

    def device(self) -> LoopbackDevice:
        return LoopbackDevice(self)

    def release_sends(self) -> None:
        self.hold_sends = False
        held, self.held = self.held, []
        for qp, wr_id, imm in held:
            qp.post_send_imm(wr_id, imm)

    def break_links(self) -> None:
        for qp in list(self.qps.values()):
            qp.to_error("transport retry counter exceeded")


class LoopbackDevice:
    supports_dmabuf = False

    def __init__(self, fabric: LoopbackFabric):
        self.fabric = fabric

    def open_qp(self, depth: int) -> LoopbackQueuePair:
        return LoopbackQueuePair(self.fabric, depth)


class LoopbackQueuePair:
    def __init__(self, fabric: LoopbackFabric, depth: int):
        self.fabric = fabric
        self.depth = depth
        self.info = QpInfo(qp_num=next(fabric.ids), lid=0, gid="::1", psn=random.getrandbits(24))
        self.peer: LoopbackQueuePair | None = None
        self.recvs: list[int] = []
        self.cq: list[Completion] = []
        self.ready = threading.Condition(fabric.lock)
        self.error: str | None = None
        self.closed = False
        fabric.qps[self.info.qp_num] = self

    def connect(self, remote: QpInfo) -> None:
        peer = self.fabric.qps.get(remote.qp_num)
        if peer is None or peer.info != remote:
            raise VerbsError(f"no queue pair {remote}")
        self.peer = peer

    def register(self, buffer) -> MemoryRegion:
        key = next(self.fabric.ids)
        view = memoryview(buffer).cast("B")
        region = MemoryRegion(addr=key << 40, length=view.nbytes, lkey=key, rkey=key, buffer=view)
        self.fabric.regions[key] = (self, region)
        return region

    def _check(self) -> None:
        if self.closed or self.error:
            raise VerbsError(f"queue pair {self.info.qp_num} is {'closed' if self.closed else 'in error'}")

    def post_recv(self, wr_id: int) -> None:
        with self.fabric.lock:
            self._check()
            if len(self.recvs) >= self.depth:
                raise VerbsError("receive queue full")
            self.recvs.append(wr_id)

    def _complete(self, completion: Completion) -> None:
        self.cq.append(completion)
        self.ready.notify_all()

    def _deliver(self, wr_id: int, opcode: Opcode, imm: int, byte_len: int) -> bool:
        """Consume one of the peer's receives; False (and our QP in error) when that cannot happen."""
        peer = self.peer
        if peer is None or peer.closed or peer.error:
            self._fail(wr_id, opcode, "transport retry counter exceeded")
            return False
        if not peer.recvs:
            self._fail(wr_id, opcode, "receiver not ready (RNR) retry counter exceeded")
            return False
        peer._complete(Completion(wr_id=peer.recvs.pop(0), opcode=Opcode.RECV, ok=True, imm=imm,
                                  byte_len=byte_len))
        self._complete(Completion(wr_id=wr_id, opcode=opcode, ok=True))
        return True

    def _fail(self, wr_id: int, opcode: Opcode, status: str) -> None:
        self.error = status
        self._complete(Completion(wr_id=wr_id, opcode=opcode, ok=False, status=status))

    def post_write_imm(self, wr_id, mr, offset, length, remote_addr, rkey, imm) -> None:
        with self.fabric.lock:
            self._check()
            data = bytes(mr.buffer[offset:offset + length])
            if self.fabric.mangle_next_write:
                data, imm = self.fabric.mangle_next_write(data, imm)
                self.fabric.mangle_next_write = None
            owner, region = self.fabric.regions.get(rkey, (None, None))
            start = remote_addr - region.addr if region else -1
            if owner is not self.peer or start < 0 or start + len(data) > region.length:
                self._fail(wr_id, Opcode.WRITE, "remote access error")
                return
            region.buffer[start:start + len(data)] = data
            self._deliver(wr_id, Opcode.WRITE, imm, len(data))

    def post_send_imm(self, wr_id, imm) -> None:
        with self.fabric.lock:
            self._check()
            if self.fabric.hold_sends:
                self.fabric.held.append((self, wr_id, imm))
                return
            self._deliver(wr_id, Opcode.SEND, imm, 0)

    def to_error(self, status: str) -> None:
        with self.fabric.lock:
            if self.closed or self.error:
                return
            self.error = status
            for wr_id in self.recvs:  # flushed
                self._complete(Completion(wr_id=wr_id, opcode=Opcode.RECV, ok=False, status=status))
            self.recvs.clear()

    def wait_completions(self, timeout_s: float) -> list[Completion]:
        with self.fabric.lock:
            if not self.cq:
                self.ready.wait(timeout_s)
            found, self.cq = self.cq, []
            return found

    def close(self) -> None:
        with self.fabric.lock:
            self.closed = True
            self.fabric.qps.pop(self.info.qp_num, None)
            for key in [k for k, (owner, _) in self.fabric.regions.items() if owner is self]:
                del self.fabric.regions[key]


# --- helpers --------------------------------------------------------------------------------------------


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


def make_item(request_id: str, index: int = 0, count: int = 1, tokens=(3, 2), hidden=16) -> ImageFeatures:
    generator = torch.Generator().manual_seed(hash((request_id, index)) & 0xFFFF)
    raw = torch.randint(0, 256, (sum(tokens), hidden * 2), dtype=torch.uint8, generator=generator)
    return ImageFeatures(request_id, index, count, list(tokens), raw.view(torch.bfloat16))


def same(a: ImageFeatures, b: ImageFeatures) -> bool:
    return (a.request_id, a.image_index, a.tile_tokens) == (b.request_id, b.image_index, b.tile_tokens) and (
        torch.equal(a.features.view(torch.uint8), b.features.view(torch.uint8)))


class Stack:
    def __init__(self, fabric, receiver):
        self.fabric = fabric
        self.receiver = receiver
        self.items: list[ImageFeatures] = []
        self.drops: Counter[str] = Counter()


@contextlib.asynccontextmanager
async def rdma_stack(*, slots: int = 2, secret: str | None = None, hidden_size: int | None = 16):
    fabric = LoopbackFabric()
    stack: Stack
    receiver = RdmaFeatureReceiver(
        "rdma://127.0.0.1:0", lambda item: stack.items.append(item), device=fabric.device(),
        max_payload_bytes=MAX_PAYLOAD, on_drop=lambda reason: stack.drops.update([reason]),
        hidden_size=hidden_size, secret=secret, slots=slots,
    )
    stack = Stack(fabric, receiver)
    task = asyncio.create_task(receiver.run())
    try:
        yield stack
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        receiver.close()


@contextlib.contextmanager
def rdma_sender(stack: Stack, **options):
    sender = RdmaFeatureSender(device=stack.fabric.device(), **{"send_timeout_s": 2.0, **options})
    try:
        yield sender
    finally:
        sender.close()


# --- pure pieces ----------------------------------------------------------------------------------------


@given(sequence=st.integers(0, 2**32), slot=st.integers(0, 2**16 - 1))
def test_immediate_carries_slot_and_sequence_modulo_2_16(sequence, slot):
    assert unpack_imm(pack_imm(sequence, slot)) == (sequence & 0xFFFF, slot)
    assert 0 <= pack_imm(sequence, slot) < 2**32


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(1, 8), min_size=1, max_size=4), hidden=st.integers(1, 32), checksum=st.booleans())
def test_a_slot_round_trips_a_message_and_the_features_survive_reuse_of_the_slot(tokens, hidden, checksum):
    item = make_item("slot", tokens=tokens, hidden=hidden)
    header, payload = encode_frames(item, checksum=checksum)
    slot = memoryview(bytearray(slot_bytes_for(MAX_PAYLOAD)))
    length = fill_slot(slot, header, payload)
    decoded = read_slot(slot, length, max_payload_bytes=MAX_PAYLOAD, hidden_size=hidden)
    slot[:] = b"\xaa" * slot.nbytes  # the next message overwrites the slot
    assert same(decoded, item)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512), length=st.integers(0, 600))
def test_read_slot_on_arbitrary_bytes_raises_only_frame_error(data, length):
    slot = memoryview(bytearray(data.ljust(512, b"\0")))
    with contextlib.suppress(FrameError):
        read_slot(slot, length, max_payload_bytes=MAX_PAYLOAD, hidden_size=None)


def test_fill_slot_refuses_a_message_larger_than_the_slot():
    header, payload = encode_frames(make_item("big", tokens=(64,), hidden=64))
    with pytest.raises(TransportError, match=r"exceeds the receiver's 100-byte slots"):
        fill_slot(memoryview(bytearray(100)), header, payload)


def test_credit_window_hands_out_slots_in_order_and_rejects_unknown_credits():
    async def body():
        window = CreditWindow(2)
        assert [await window.acquire(), await window.acquire()] == [0, 1]
        waiting = asyncio.create_task(window.acquire())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # no credit: the sender waits
        window.release(1)
        assert await waiting == 1
        with pytest.raises(ProtocolError, match="slot 5"):
            window.release(5)
        window.release(0)
        with pytest.raises(ProtocolError, match="slot 0"):
            window.release(0)  # a duplicate credit
        window.fail(TransportError("gone"))
        with pytest.raises(TransportError, match="gone"):
            await window.acquire()  # a failed connection hands out nothing, free slots or not

    run(body())


# --- the protocol end to end over the loopback verbs -----------------------------------------------------


def test_messages_arrive_intact_in_order_with_more_messages_than_slots():
    async def body():
        async with rdma_stack(slots=2) as stack:
            assert stack.receiver.endpoint.startswith("rdma://127.0.0.1:")
            sent = [make_item(f"req-{r}", i, 3, tokens=(r + 1, 2)) for r in range(5) for i in range(3)]
            with rdma_sender(stack) as sender:
                for item in sent:
                    assert await sender.send(stack.receiver.endpoint, item) == item.num_bytes
                await wait_until_async(lambda: len(stack.items) == len(sent), 5, "every message sent is delivered")
            assert not stack.drops
            assert all(same(a, b) for a, b in zip(stack.items, sent, strict=True))

    run(body())


def test_concurrent_sends_share_the_credits_and_all_arrive():
    async def body():
        async with rdma_stack(slots=3) as stack:
            sent = [make_item(f"c-{n}", tokens=(4,)) for n in range(24)]
            with rdma_sender(stack) as sender:
                await asyncio.gather(*(sender.send(stack.receiver.endpoint, item) for item in sent))
                await wait_until_async(lambda: len(stack.items) == len(sent), 5, "every message sent is delivered")
            assert sorted(i.request_id for i in stack.items) == sorted(i.request_id for i in sent)
            by_id = {i.request_id: i for i in stack.items}
            assert all(same(by_id[i.request_id], i) for i in sent)

    run(body())


def test_without_credits_the_sender_waits_then_fails_within_its_timeout_and_resumes_when_credits_return():
    async def body():
        async with rdma_stack(slots=2) as stack:
            endpoint = stack.receiver.endpoint
            with rdma_sender(stack, send_timeout_s=0.3) as sender:
                await sender.send(endpoint, make_item("warm"))
                await wait_until_async(lambda: len(stack.items) == 1, 5, "one message delivered")
                stack.fabric.hold_sends = True  # the receiver's credits stop reaching the sender
                await sender.send(endpoint, make_item("a"))
                await sender.send(endpoint, make_item("b"))
                # Its own 0.3 s ends the wait, long before a deadline that a send ignoring it would hit.
                with pytest.raises(TransportError, match=r"accepted nothing for 0\.3 s"):
                    await asyncio.wait_for(sender.send(endpoint, make_item("no-credit")), 5.0)
                stack.fabric.release_sends()
                await sender.send(endpoint, make_item("c"))
                await wait_until_async(lambda: len(stack.items) == 4, 5, "four messages delivered")
            assert [i.request_id for i in stack.items] == ["warm", "a", "b", "c"]

    run(body())


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        pytest.param(lambda data, imm: (b"\xff\xff\xff\xff" + data[4:], imm), "bad_header", id="header-length"),
        pytest.param(lambda data, imm: (data[:4] + b"\x00" * 8 + data[12:], imm), "bad_header", id="header-bytes"),
        pytest.param(lambda data, imm: (data[:-1], imm), "payload_length", id="truncated-write"),
        pytest.param(lambda data, imm: (b"\x00", imm), "bad_header", id="one-byte-write"),
    ],
)
def test_a_malformed_message_is_dropped_by_reason_and_its_slot_recycled(mangle, reason):
    async def body():
        async with rdma_stack(slots=2) as stack:
            with rdma_sender(stack) as sender:
                stack.fabric.mangle_next_write = mangle
                await sender.send(stack.receiver.endpoint, make_item("mangled"))
                later = [make_item(f"after-{n}") for n in range(4)]  # twice the slots: recycling works
                for item in later:
                    await sender.send(stack.receiver.endpoint, item)
                await wait_until_async(lambda: len(stack.items) == 4, 5, "four messages delivered")
            assert stack.drops == Counter({reason: 1})
            assert all(same(a, b) for a, b in zip(stack.items, later, strict=True))

    run(body())


def test_wrong_hidden_size_is_dropped_and_counted():
    async def body():
        async with rdma_stack(hidden_size=16) as stack:
            with rdma_sender(stack) as sender:
                await sender.send(stack.receiver.endpoint, make_item("wide", hidden=32))
                await sender.send(stack.receiver.endpoint, make_item("right"))
                await wait_until_async(lambda: len(stack.items) == 1, 5, "one message delivered")
            assert stack.drops == Counter({"hidden_size": 1})
            assert stack.items[0].request_id == "right"

    run(body())


async def send_after_teardown(sender: RdmaFeatureSender, endpoint: str, item: ImageFeatures) -> None:
    """Send `item` over a connection that was just torn down: the first try may fail on the dead connection
    (the sender learns of the teardown from that failure), the second must go over a new one."""
    try:
        await sender.send(endpoint, item)
    except TransportError:
        await sender.send(endpoint, item)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda data, imm: (data, pack_imm(5, unpack_imm(imm)[1])), id="sequence-skipped"),
        pytest.param(lambda data, imm: (data, pack_imm(unpack_imm(imm)[0], 7)), id="slot-out-of-range"),
    ],
)
def test_a_protocol_violation_tears_the_connection_down_and_the_sender_reconnects(mangle):
    async def body():
        async with rdma_stack(slots=2) as stack:
            endpoint = stack.receiver.endpoint
            with rdma_sender(stack) as sender:
                await sender.send(endpoint, make_item("before"))
                # Whether the receiver's queue pair refuses writes once the violation is seen, checked before
                # anything else runs: a message written in that moment must fail at the sender, not land unread.
                receiver_qp, loop, refusing = sender._connections[endpoint].qp.peer, asyncio.get_running_loop(), []

                def on_drop(reason: str) -> None:
                    stack.drops.update([reason])
                    loop.call_soon(lambda: refusing.append(bool(receiver_qp.error or receiver_qp.closed)))

                stack.receiver._on_drop = on_drop
                stack.fabric.mangle_next_write = mangle
                await sender.send(endpoint, make_item("broken"))
                await wait_until_async(lambda: stack.drops["rdma_protocol"] == 1 and refusing, 5,
                                       "one drop counted as rdma_protocol, and the receiver refusing")
                assert refusing == [True]
                # The next message, after at most one failed try, goes over a new connection.
                fresh = make_item("fresh")
                await send_after_teardown(sender, endpoint, fresh)
                await wait_until_async(lambda: len(stack.items) == 2, 5, "two messages delivered")
            assert [i.request_id for i in stack.items] == ["before", "fresh"]
            assert same(stack.items[1], fresh)

    run(body())


def test_a_link_failure_fails_the_waiting_send_and_later_sends_reconnect():
    async def body():
        async with rdma_stack(slots=1) as stack:
            endpoint = stack.receiver.endpoint
            with rdma_sender(stack, send_timeout_s=5.0) as sender:
                stack.fabric.hold_sends = True
                await sender.send(endpoint, make_item("first"))
                waiting = asyncio.create_task(sender.send(endpoint, make_item("stuck")))  # no credit left
                await asyncio.sleep(0.05)
                stack.fabric.held.clear()
                stack.fabric.hold_sends = False
                stack.fabric.break_links()
                with pytest.raises(TransportError, match="RDMA completion failed"):
                    await waiting  # well before the 5 s timeout
                await wait_until_async(lambda: stack.drops["rdma_error"] >= 1, 5, "a drop counted as rdma_error")
                after = make_item("after-link")
                await send_after_teardown(sender, endpoint, after)
                await wait_until_async(lambda: [i.request_id for i in stack.items] == ["first", "after-link"], 5,
                                       '"first" and "after-link" delivered, in order')

    run(body())


def test_a_message_larger_than_the_receivers_slots_is_refused_and_the_connection_stays_usable():
    async def body():
        async with rdma_stack(hidden_size=None) as stack:
            with rdma_sender(stack) as sender:
                big = make_item("too-big", tokens=(MAX_PAYLOAD // 64 + 1024,), hidden=32)
                with pytest.raises(TransportError, match="exceeds the receiver's"):
                    await sender.send(stack.receiver.endpoint, big)
                await sender.send(stack.receiver.endpoint, make_item("fits"))
                await wait_until_async(lambda: len(stack.items) == 1, 5, "one message delivered")

    run(body())


def test_with_a_shared_secret_only_senders_holding_it_connect():
    async def body():
        async with rdma_stack(secret=SECRET) as stack:
            endpoint = stack.receiver.endpoint
            for options in ({}, {"secret": "another secret of some length"}):
                with rdma_sender(stack, **options) as sender:
                    with pytest.raises(TransportError, match="closed during set-up"):  # the receiver hung up
                        await sender.send(endpoint, make_item("intruder"))
            assert stack.drops == Counter({"auth": 2})
            with rdma_sender(stack, secret=SECRET) as sender:
                await sender.send(endpoint, make_item("member"))
                await wait_until_async(lambda: len(stack.items) == 1, 5, "one message delivered")
            assert [i.request_id for i in stack.items] == ["member"]

    run(body())


def test_garbage_on_the_side_channel_is_counted_and_the_receiver_keeps_serving():
    async def body():
        async with rdma_stack() as stack:
            host, port = stack.receiver.endpoint.removeprefix("rdma://").rsplit(":", 1)
            for garbage in (b"GET / HTTP/1.1\r\n\r\n", b'{"qp": 3}\n', b"x" * 10000 + b"\n"):
                reader, writer = await asyncio.open_connection(host, int(port))
                await reader.readline()  # the challenge
                writer.write(garbage)
                await writer.drain()
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(reader.read(), 5.0)
                writer.close()
            await wait_until_async(lambda: stack.drops["handshake"] == 3, 5, "three drops counted as handshake")
            with rdma_sender(stack) as sender:
                await sender.send(stack.receiver.endpoint, make_item("after-garbage"))
                await wait_until_async(lambda: len(stack.items) == 1, 5, "one message delivered")

    run(body())


def test_bad_endpoints_raise_transport_errors():
    async def body():
        fabric = LoopbackFabric()
        sender = RdmaFeatureSender(device=fabric.device(), send_timeout_s=1.0)
        try:
            with pytest.raises(TransportError, match="expected rdma://host:port"):
                await sender.send("tcp://127.0.0.1:5", make_item("x"))
            with pytest.raises(TransportError, match="rdma://127.0.0.1:1"):
                await sender.send("rdma://127.0.0.1:1", make_item("x"))  # nobody listens there
        finally:
            sender.close()

    run(body())


def test_teardown_with_open_connections_releases_every_queue_pair():
    async def body():
        async with rdma_stack() as stack:
            senders = [RdmaFeatureSender(device=stack.fabric.device()) for _ in range(3)]
            try:
                for n, sender in enumerate(senders):
                    await sender.send(stack.receiver.endpoint, make_item(f"s{n}"))
                await wait_until_async(lambda: len(stack.items) == 3, 5, "three messages delivered")
                assert len(stack.fabric.qps) == 6
            finally:
                for sender in senders:
                    sender.close()
            await wait_until_async(lambda: not stack.fabric.qps, 5, "the receiver closed its side too")
        assert not stack.fabric.regions

    run(body())


# --- on a real device -----------------------------------------------------------------------------------


@pytest.mark.skipif(unavailable() is not None, reason=f"needs an RDMA device: {unavailable()}")
def test_real_device_features_cross_a_loopback_queue_pair_intact():
    async def body():
        device = PyverbsDevice()
        received: list[ImageFeatures] = []
        receiver = RdmaFeatureReceiver("rdma://127.0.0.1:0", received.append, device=device,
                                       max_payload_bytes=32 << 20, slots=4)
        task = asyncio.create_task(receiver.run())
        sender = RdmaFeatureSender(device=device)
        try:
            raw = torch.randint(0, 256, (13 * 256, 4096 * 2), dtype=torch.uint8)
            item = ImageFeatures("real", 0, 1, [256] * 13, raw.view(torch.bfloat16))
            for _ in range(8):
                await sender.send(receiver.endpoint, item)
            await wait_until_async(lambda: len(received) == 8, 15, "eight messages delivered")
            assert all(torch.equal(r.features.view(torch.uint8), raw) for r in received)
        finally:
            sender.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            receiver.close()

    run(body())


def test_without_a_device_the_reason_names_what_is_missing():
    reason = unavailable()
    if reason is None:
        pytest.skip("this host has an RDMA device")
    assert "pyverbs" in reason or "/sys/class/infiniband" in reason
    with pytest.raises(VerbsError, match=reason.split(" (")[0]):
        PyverbsDevice()
