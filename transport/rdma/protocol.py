"""RDMA feature transport: the protocol over the small verbs interface of `transport.rdma.verbs`.

Connection set-up goes over a TCP side channel (`rdma://host:port` is that channel's address): the
sender sends its queue pair details (and, with a shared secret, an HMAC of the receiver's nonce), the
receiver answers with its own and with its registered buffer pool: `slots` slots of `slot_bytes`.

One feature message fills one slot: `[u32 header length][FeatureHeader][payload]`, moved by a single
RDMA WRITE with immediate whose immediate value carries the slot and a 16-bit sequence number. The
sender holds one credit per free receiver slot; the receiver copies a message out of its slot, re-posts
the receive and returns the credit with a zero-length SEND whose immediate is the slot. A sender with
no credit waits (bounded by its send timeout): backpressure, never an unbounded queue. Completions are
polled on a thread and handed to the event loop. Anything malformed is dropped and counted, its slot
recycled; a failed completion or a closed side channel tears that connection down, and the sender's
next message sets up a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from transport.frames import FrameError, ImageFeatures, decode_frames, encode_frames
from transport.rdma.verbs import Completion, Device, MemoryRegion, Opcode, QpInfo, QueuePair, VerbsError
from transport.tcp import HEADER_ROOM, TransportError

log = logging.getLogger(__name__)

HEADER_LENGTH = struct.Struct("<I")
MAX_SLOTS = 1 << 16  # the slot is the immediate's low 16 bits
SENDER_QP_DEPTH = 256  # receives a sender keeps posted for credits: the most slots a receiver may offer
SIDE_CHANNEL_LINE_LIMIT = 4096
SIDE_CHANNEL_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05  # how often the poller thread looks up from an idle completion channel


# --- pure protocol pieces --------------------------------------------------------------------------------


def pack_imm(sequence: int, slot: int) -> int:
    return ((sequence & 0xFFFF) << 16) | slot


def unpack_imm(imm: int) -> tuple[int, int]:
    """(sequence, slot)"""
    return imm >> 16, imm & 0xFFFF


def slot_bytes_for(max_payload_bytes: int) -> int:
    return HEADER_LENGTH.size + HEADER_ROOM + max_payload_bytes


def fill_slot(slot: memoryview, header: bytes, payload: memoryview) -> int:
    """Lay a message out in `slot`; returns its length. Raises TransportError when it does not fit."""
    length = HEADER_LENGTH.size + len(header) + payload.nbytes
    if length > slot.nbytes:
        raise TransportError(f"a feature message of {length} bytes exceeds the receiver's {slot.nbytes}-byte slots")
    HEADER_LENGTH.pack_into(slot, 0, len(header))
    slot[HEADER_LENGTH.size:HEADER_LENGTH.size + len(header)] = header
    slot[HEADER_LENGTH.size + len(header):length] = payload
    return length


def read_slot(slot: memoryview, length: int, *, max_payload_bytes: int, hidden_size: int | None) -> ImageFeatures:
    """Decode the message written into `slot`; the features are copied out, so the slot can be reused."""
    if length < HEADER_LENGTH.size or length > slot.nbytes:
        raise FrameError(f"an RDMA write of {length} bytes cannot hold a feature message", "bad_header")
    (header_length,) = HEADER_LENGTH.unpack_from(slot, 0)
    if header_length > min(HEADER_ROOM, length - HEADER_LENGTH.size):
        raise FrameError(f"header length {header_length} does not fit a {length}-byte message", "bad_header")
    header = bytes(slot[HEADER_LENGTH.size:HEADER_LENGTH.size + header_length])
    payload = bytearray(slot[HEADER_LENGTH.size + header_length:length])  # the copy out of the slot
    return decode_frames(header, payload, max_payload_bytes=max_payload_bytes, hidden_size=hidden_size)


class CreditWindow:
    """The sender's view of the receiver's free slots: one credit each, handed out in FIFO order."""

    def __init__(self, slots: int):
        self._free: list[int] = list(range(slots))
        self._slots = slots
        self._changed = asyncio.Event()
        self._error: Exception | None = None

    @property
    def available(self) -> int:
        return len(self._free)

    async def acquire(self) -> int:
        while not self._free:
            if self._error:
                raise self._error
            self._changed.clear()
            await self._changed.wait()
        if self._error:
            raise self._error
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if not 0 <= slot < self._slots or slot in self._free:
            raise ProtocolError(f"credit for slot {slot} that is not out (slots: {self._slots})")
        self._free.append(slot)
        self._changed.set()

    def fail(self, error: Exception) -> None:
        self._error = error
        self._changed.set()


class ProtocolError(RuntimeError):
    """The peer broke the protocol; the connection is torn down."""


# --- the side channel --------------------------------------------------------------------------------------


class Challenge(BaseModel):
    nonce: str


class Hello(BaseModel):
    qp: QpInfo
    mac: str | None = None


class Welcome(BaseModel):
    qp: QpInfo
    addr: int
    rkey: int
    slot_bytes: int
    slots: int


def mac_for(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), b"dvd-rdma/" + nonce.encode(), hashlib.sha256).hexdigest()


async def read_message(reader: asyncio.StreamReader, model: type[BaseModel]):
    try:
        line = await asyncio.wait_for(reader.readline(), SIDE_CHANNEL_TIMEOUT_S)
    except ValueError:  # the stream's limit: a line longer than any set-up message
        raise ProtocolError(f"a side-channel line longer than {SIDE_CHANNEL_LINE_LIMIT} bytes") from None
    if not line.endswith(b"\n"):
        raise ProtocolError("the side channel closed during set-up")
    try:
        return model.model_validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(f"bad {model.__name__} on the side channel: {exc.errors()[0]['msg']}") from None


async def write_message(writer: asyncio.StreamWriter, message: BaseModel) -> None:
    writer.write(message.model_dump_json().encode() + b"\n")
    await writer.drain()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    if parts.scheme != "rdma" or not parts.hostname or parts.port is None:
        raise ValueError(f"bad RDMA feature endpoint {endpoint!r}; expected rdma://host:port")
    return parts.hostname, parts.port


# --- completions to the event loop --------------------------------------------------------------------------


class CompletionPoller:
    """Waits for completions on a thread and runs `on_completion` for each on the event loop."""

    def __init__(self, qp: QueuePair, on_completion: Callable[[Completion], None]):
        self._qp = qp
        self._loop = asyncio.get_running_loop()
        self._on_completion = on_completion
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dvd-rdma-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                completions = self._qp.wait_completions(POLL_INTERVAL_S)
            except VerbsError as exc:
                completions = [Completion(wr_id=-1, opcode=Opcode.RECV, ok=False, status=str(exc))]
                self._stop.set()
            for completion in completions:
                with contextlib.suppress(RuntimeError):  # the loop closed under us: nothing left to tell
                    self._loop.call_soon_threadsafe(self._on_completion, completion)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- receiver -----------------------------------------------------------------------------------------------


class RdmaFeatureReceiver:
    """Listens on `rdma://host:port` (the side channel) and hands valid features to `on_features`.

    Same contract as `TcpFeatureReceiver`: drops are counted through `on_drop(reason)`, never raised.
    """

    def __init__(
        self,
        endpoint: str,
        on_features: Callable[[ImageFeatures], Awaitable[None] | None],
        *,
        device: Device,
        max_payload_bytes: int,
        on_drop: Callable[[str], None] | None = None,
        hidden_size: int | None = None,
        secret: str | None = None,
        slots: int = 4,
    ):
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be within 1..{MAX_SLOTS}, got {slots}")
        host, port = parse_endpoint(endpoint)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.endpoint = f"rdma://{host}:{self._listener.getsockname()[1]}"
        self._device = device
        self._on_features = on_features
        self._on_drop = on_drop or (lambda reason: None)
        self._max_payload_bytes = max_payload_bytes
        self._hidden_size = hidden_size
        self._secret = secret
        self._slots = slots
        self._connections: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Serve sender connections until cancelled."""
        server = await asyncio.start_server(self._serve_connection, sock=self._listener,
                                            limit=SIDE_CHANNEL_LINE_LIMIT)
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())
        qp = None
        poller = None
        try:
            nonce = os.urandom(16).hex()
            await write_message(writer, Challenge(nonce=nonce))
            hello = await read_message(reader, Hello)
            if self._secret and not (hello.mac and hmac.compare_digest(hello.mac, mac_for(self._secret, nonce))):
                self._on_drop("auth")
                log.warning("an RDMA feature sender failed authentication")
                return
            qp = self._device.open_qp(self._slots)
            slot_bytes = slot_bytes_for(self._max_payload_bytes)
            pool = qp.register(bytearray(slot_bytes * self._slots))
            for slot in range(self._slots):
                qp.post_recv(slot)
            qp.connect(hello.qp)
            await write_message(writer, Welcome(qp=qp.info, addr=pool.addr, rkey=pool.rkey, slot_bytes=slot_bytes,
                                                slots=self._slots))
            connection = _ReceiverConnection(self, qp, pool, slot_bytes)
            poller = CompletionPoller(qp, connection.on_completion)
            # The side channel stays open while the connection lives; its end (or a failed completion) ends it.
            closed = asyncio.create_task(reader.read())
            await asyncio.wait({closed, connection.broken}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
        except (ProtocolError, VerbsError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("RDMA feature connection ended: %s", exc)
            self._on_drop("handshake")
        except Exception:  # one connection's bug must not take the receiver down
            log.exception("RDMA feature connection failed")
            self._on_drop("rdma_error")
        finally:
            if poller is not None:
                poller.stop()
            if qp is not None:
                qp.close()
            writer.close()
            self._connections.discard(asyncio.current_task())

    def close(self) -> None:
        self._listener.close()


@dataclass
class _ReceiverConnection:
    receiver: RdmaFeatureReceiver
    qp: QueuePair
    pool: MemoryRegion
    slot_bytes: int
    expected_sequence: int = 0
    broken: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def on_completion(self, completion: Completion) -> None:
        if self.broken.done():
            return
        if not completion.ok:
            self.receiver._on_drop("rdma_error")
            self._break(f"completion failed: {completion.status}")
            return
        if completion.opcode is not Opcode.RECV:
            return  # our credit SENDs completing
        if completion.imm is None:
            self.receiver._on_drop("bad_header")
            self._break("a write without an immediate value")
            return
        sequence, slot = unpack_imm(completion.imm)
        if slot >= self.receiver._slots or sequence != self.expected_sequence:
            self.receiver._on_drop("rdma_protocol")
            self._break(f"slot {slot} / sequence {sequence} where slot < {self.receiver._slots} and "
                        f"sequence {self.expected_sequence} were due")
            return
        self.expected_sequence = (sequence + 1) & 0xFFFF
        view = self.pool.buffer[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]
        try:
            item = read_slot(view, completion.byte_len, max_payload_bytes=self.receiver._max_payload_bytes,
                             hidden_size=self.receiver._hidden_size)
        except FrameError as exc:
            log.warning("dropped an RDMA feature message: %s", exc)
            self.receiver._on_drop(exc.reason)
            item = None
        try:  # the slot is free again: re-arm its receive, then give the sender its credit back
            self.qp.post_recv(slot)
            self.qp.post_send_imm(self.receiver._slots + slot, slot)
        except VerbsError as exc:
            self._break(str(exc))
        if item is not None:
            result = self.receiver._on_features(item)
            if result is not None:
                asyncio.ensure_future(result)

    def _break(self, reason: str) -> None:
        """End the connection at once: with the queue pair in the error state, a message the sender writes
        from now on fails at the sender (which reconnects) instead of landing here unread."""
        log.warning("RDMA feature connection broken: %s", reason)
        self.broken.set_result(reason)
        with contextlib.suppress(VerbsError):
            self.qp.to_error(reason)


# --- sender -------------------------------------------------------------------------------------------------


class _SenderConnection:
    """One side channel + queue pair to a receiver, with its credits and a staging buffer per slot."""

    def __init__(self, qp: QueuePair, welcome: Welcome, writer: asyncio.StreamWriter, reader: asyncio.StreamReader):
        self.qp = qp
        self.remote = welcome
        self.writer = writer
        self.credits = CreditWindow(welcome.slots)
        self.staging = qp.register(bytearray(welcome.slot_bytes * welcome.slots))
        self.sequence = 0
        self.writes: dict[int, asyncio.Future] = {}
        self.error: Exception | None = None
        for slot in range(welcome.slots):  # credits come back as SENDs: one receive per slot out
            qp.post_recv(slot)
        self.poller = CompletionPoller(qp, self.on_completion)
        self.watch = asyncio.create_task(self._watch_side_channel(reader))

    async def _watch_side_channel(self, reader: asyncio.StreamReader) -> None:
        await reader.read()
        self.fail(TransportError("the receiver closed the RDMA connection"))

    def on_completion(self, completion: Completion) -> None:
        if not completion.ok:
            self.fail(TransportError(f"RDMA completion failed: {completion.status}"))
        elif completion.opcode is Opcode.RECV and completion.imm is not None:
            try:
                self.credits.release(completion.imm)
                self.qp.post_recv(completion.imm)
            except (ProtocolError, VerbsError) as exc:
                self.fail(TransportError(str(exc)))
        elif completion.opcode is Opcode.WRITE:
            done = self.writes.pop(completion.wr_id, None)
            if done is not None and not done.done():
                done.set_result(None)

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
            self.credits.fail(error)
            for done in self.writes.values():
                if not done.done():
                    done.set_exception(error)

    async def send(self, header: bytes, payload: memoryview) -> None:
        slot = await self.credits.acquire()
        start = slot * self.remote.slot_bytes
        length = fill_slot(self.staging.buffer[start:start + self.remote.slot_bytes], header, payload)
        done = self.writes[slot] = asyncio.get_running_loop().create_future()
        self.qp.post_write_imm(slot, self.staging, start, length, self.remote.addr + start, self.remote.rkey,
                               pack_imm(self.sequence, slot))
        self.sequence = (self.sequence + 1) & 0xFFFF
        await done  # the staging slot is ours again once the write completed

    def close(self) -> None:
        self.fail(TransportError("the RDMA sender closed"))
        self.watch.cancel()
        self.poller.stop()
        self.qp.close()
        self.writer.close()


class RdmaFeatureSender:
    """Sends features to `rdma://host:port` endpoints; same contract as `TcpFeatureSender`."""

    def __init__(self, *, device: Device, send_timeout_s: float = 30.0, checksum: bool = False,
                 secret: str | None = None):
        self._device = device
        self._send_timeout_s = send_timeout_s
        self._checksum = checksum
        self._secret = secret
        self._connections: dict[str, _SenderConnection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}

    async def _connection(self, endpoint: str) -> _SenderConnection:
        async with self._connecting.setdefault(endpoint, asyncio.Lock()):
            connection = self._connections.get(endpoint)
            if connection is not None and connection.error is None:
                return connection
            if connection is not None:
                connection.close()
                del self._connections[endpoint]
            host, port = parse_endpoint(endpoint)
            reader, writer = await asyncio.open_connection(host, port, limit=SIDE_CHANNEL_LINE_LIMIT)
            qp = None
            try:
                challenge = await read_message(reader, Challenge)
                qp = self._device.open_qp(SENDER_QP_DEPTH)
                mac = mac_for(self._secret, challenge.nonce) if self._secret else None
                await write_message(writer, Hello(qp=qp.info, mac=mac))
                welcome = await read_message(reader, Welcome)
                if not 1 <= welcome.slots <= SENDER_QP_DEPTH:
                    raise ProtocolError(f"the receiver offers {welcome.slots} slots")
                qp.connect(welcome.qp)
                connection = self._connections[endpoint] = _SenderConnection(qp, welcome, writer, reader)
                return connection
            except BaseException:
                if qp is not None:
                    qp.close()
                writer.close()
                raise

    async def send(self, endpoint: str, item: ImageFeatures) -> int:
        """Write one image's features into a receiver slot; returns the payload size in bytes."""
        header, payload = encode_frames(item, checksum=self._checksum)
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            raise TransportError(str(exc)) from None
        async def hand_over() -> None:
            connection = await self._connection(endpoint)
            await connection.send(header, payload)

        try:
            await asyncio.wait_for(hand_over(), self._send_timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(f"feature endpoint {endpoint} accepted nothing for {self._send_timeout_s:g} s") \
                from None
        except (OSError, ProtocolError, VerbsError, asyncio.IncompleteReadError) as exc:
            raise TransportError(f"feature endpoint {endpoint}: {exc}") from None
        return payload.nbytes

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

