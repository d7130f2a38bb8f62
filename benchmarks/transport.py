"""Feature transport throughput and latency on one host: DvD's TCP transport against a raw-socket ceiling and gRPC.

    python -m benchmarks.transport              # all sizes; writes benchmarks/results/transport_cpu_loopback.json
    python -m benchmarks.transport --sizes-mib 2 --seconds 1 --output /tmp/transport.json

For each feature size, three backends move the same BF16 payloads from this process to a receiver process:
- `dvd_tcp`: the real `TcpFeatureSender` -> `TcpFeatureReceiver` (ZeroMQ; frames decoded and checked);
- `raw_socket`: one TCP stream, `sendall` of a 16-byte prefix and the payload, `recv_into` a reused buffer:
  the ceiling for one connection on this host;
- `grpc`: unary calls carrying the payload as `bytes`, up to 4 in flight: the naive baseline.
Throughput: payloads pipelined for about `--seconds`; bytes over first send to last full arrival.
Latency: one payload at a time (the next leaves once the receiver reported the last one); the sender's
clock before the send to the receiver's clock after the last byte (same host, same clock); p50 and p99.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import statistics
import struct
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Annotated

import grpc
import torch
import typer

from benchmarks.toolkit.documents import command_line, write
from benchmarks.toolkit.machine import load_average, summary
from transport.frames import ImageFeatures
from transport.tcp import TcpFeatureReceiver, TcpFeatureSender

HIDDEN = 4096  # 8B geometry: 2 MiB per 256-token tile in BF16
PREFIX = struct.Struct("<QQ")  # payload length, sender's time.time_ns()
GRPC_WINDOW = 4
BACKENDS = ("dvd_tcp", "raw_socket", "grpc")
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "transport_cpu_loopback.json"


def make_features(num_bytes: int) -> torch.Tensor:
    rows = num_bytes // (HIDDEN * 2)
    return torch.randint(0, 256, (rows, HIDDEN * 2), dtype=torch.uint8).view(torch.bfloat16)


# --- receivers: each runs in its own process, acknowledges every arrival when asked to, and finally
# --- reports [(arrival_ns, sent_ns), ...] over the pipe.


class Arrivals:
    def __init__(self, conn, count: int, ack: bool):
        self.conn, self.count, self.ack = conn, count, ack
        self.times: list[tuple[int, int]] = []
        self.complete = threading.Event()

    def record(self, sent_ns: int) -> None:
        self.times.append((time.time_ns(), sent_ns))
        if self.ack:
            self.conn.send_bytes(b"k")
        if len(self.times) == self.count:
            self.complete.set()


def receive_dvd_tcp(conn, count: int, max_bytes: int, ack: bool) -> None:
    arrivals = Arrivals(conn, count, ack)

    async def main():
        receiver = TcpFeatureReceiver("tcp://127.0.0.1:*", lambda item: arrivals.record(item.sent_unix_ns),
                                      max_payload_bytes=max_bytes, hidden_size=HIDDEN)
        task = asyncio.create_task(receiver.run())
        try:
            conn.send(receiver.endpoint)
            while not await asyncio.to_thread(arrivals.complete.wait, 1.0):  # no polling beside the receiver
                pass
        finally:
            task.cancel()
            receiver.close()

    asyncio.run(main())
    conn.send(arrivals.times)


def receive_raw_socket(conn, count: int, max_bytes: int, ack: bool) -> None:
    arrivals = Arrivals(conn, count, ack)
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(server.getsockname()[1])
        peer, _ = server.accept()
        with peer:
            buffer = memoryview(bytearray(max_bytes))
            prefix = bytearray(PREFIX.size)
            while not arrivals.complete.is_set():
                recv_exactly(peer, memoryview(prefix))
                length, sent_ns = PREFIX.unpack(prefix)
                recv_exactly(peer, buffer[:length])
                arrivals.record(sent_ns)
    conn.send(arrivals.times)


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        received = sock.recv_into(view)
        if not received:
            raise ConnectionError("the sender closed the connection early")
        view = view[received:]


def receive_grpc(conn, count: int, max_bytes: int, ack: bool) -> None:
    arrivals = Arrivals(conn, count, ack)
    lock = threading.Lock()

    def put(request: bytes, context) -> bytes:
        with lock:
            arrivals.record(PREFIX.unpack_from(request)[1])
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WINDOW),
                         options=[("grpc.max_receive_message_length", max_bytes + 1024)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "dvd.bench.Sink", {"Put": grpc.unary_unary_rpc_method_handler(put)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    arrivals.complete.wait()
    server.stop(grace=10).wait()  # the last call still has its (empty) reply to send
    conn.send(arrivals.times)


RECEIVERS = {"dvd_tcp": receive_dvd_tcp, "raw_socket": receive_raw_socket, "grpc": receive_grpc}


# --- senders: `wait_ack()` is None when pipelining, else blocks until the receiver reported the message.


async def send_dvd_tcp(address, payload: torch.Tensor, count: int, wait_ack) -> None:
    sender = TcpFeatureSender(send_timeout_s=60.0)
    try:
        tokens = [payload.shape[0]]
        for n in range(count):
            await sender.send(address, ImageFeatures(f"bench-{n}", 0, 1, tokens, payload))
            if wait_ack:
                await asyncio.to_thread(wait_ack)
        while sender.inflight_bytes:  # closing discards what ZeroMQ has not written out yet
            await asyncio.sleep(0.001)
    finally:
        sender.close()


async def send_raw_socket(address, payload: torch.Tensor, count: int, wait_ack) -> None:
    view = memoryview(payload.view(torch.uint8).numpy()).cast("B")
    with socket.create_connection(("127.0.0.1", address)) as sock:
        for _ in range(count):
            sock.sendall(PREFIX.pack(view.nbytes, time.time_ns()))
            sock.sendall(view)
            if wait_ack:
                wait_ack()


async def send_grpc(address, payload: torch.Tensor, count: int, wait_ack) -> None:
    body = payload.view(torch.uint8).numpy().tobytes()  # what a naive client does: bytes in a message
    with grpc.insecure_channel(f"127.0.0.1:{address}",
                               options=[("grpc.max_send_message_length", len(body) + 1024)]) as channel:
        put = channel.unary_unary("/dvd.bench.Sink/Put")
        in_flight: list[grpc.Future] = []
        for _ in range(count):
            in_flight.append(put.future(PREFIX.pack(len(body), time.time_ns()) + body, timeout=60))
            if wait_ack:
                wait_ack()
            while len(in_flight) >= GRPC_WINDOW or (wait_ack and in_flight):
                in_flight.pop(0).result()
        for call in in_flight:
            call.result()


SENDERS = {"dvd_tcp": send_dvd_tcp, "raw_socket": send_raw_socket, "grpc": send_grpc}


def run_case(backend: str, payload: torch.Tensor, count: int, *, ack: bool) -> list[tuple[int, int, int]]:
    """Move `count` payloads through `backend`; returns (sent_ns, arrival_ns, first_send_ns) per message."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    max_bytes = payload.numel() * payload.element_size()
    process = context.Process(target=RECEIVERS[backend], args=(child, count, max_bytes, ack), daemon=True)
    process.start()
    try:
        address = parent.recv()

        def wait_ack() -> None:
            if not parent.poll(60):
                raise TimeoutError(f"{backend}: no acknowledgement within 60 s")
            parent.recv_bytes()

        started = time.time_ns()
        asyncio.run(SENDERS[backend](address, payload, count, wait_ack if ack else None))
        while True:  # skip acknowledgements a pipelined run never reads
            if not parent.poll(120):
                raise TimeoutError(f"{backend}: the receiver reported nothing within 120 s")
            report = parent.recv()
            if isinstance(report, list):
                break
        process.join(30)
        return [(sent, arrived, started) for arrived, sent in report]
    finally:
        if process.is_alive():
            process.kill()


def throughput(backend: str, payload: torch.Tensor, seconds: float) -> float:
    """GB/s (bytes per ns) of one pipelined run of about `seconds`."""
    size_bytes = payload.numel() * payload.element_size()
    count = max(8, int(seconds * 1e9 / size_bytes))  # about `seconds` at 1 GB/s
    pipelined = run_case(backend, payload, count, ack=False)
    first_send = min(started for _, _, started in pipelined)
    last_arrival = max(arrived for _, arrived, _ in pipelined)
    return count * size_bytes / (last_arrival - first_send)


def latency_ms(backend: str, payload: torch.Tensor, samples: int) -> dict:
    one_at_a_time = run_case(backend, payload, samples, ack=True)
    latencies = sorted((arrived - sent) / 1e6 for sent, arrived, _ in one_at_a_time)
    return {"latency_ms_p50": round(statistics.median(latencies), 3),
            "latency_ms_p99": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)}


def measure_size(size_mib: float, seconds: float, repeats: int, latency_samples: int) -> dict:
    """Backends interleaved `repeats` times, so that load from elsewhere hits each of them alike.

    The ratio to the raw ceiling is the median of the per-round ratios.
    """
    payload = make_features(int(size_mib * 2**20))
    for backend in BACKENDS:
        run_case(backend, payload, 4, ack=False)  # warm-up: imports, allocator, page faults
    rounds = [{backend: throughput(backend, payload, seconds) for backend in BACKENDS} for _ in range(repeats)]
    row = {"size_mib": size_mib}
    for backend in BACKENDS:
        rates = [r[backend] for r in rounds]
        row[backend] = {"gb_per_s": round(statistics.median(rates), 3), "gb_per_s_rounds": [round(x, 3) for x in rates],
                        **latency_ms(backend, payload, latency_samples)}
        typer.echo(f"{size_mib:>5} MiB {backend:<10} {row[backend]}")
    row["dvd_tcp_over_raw"] = round(statistics.median(r["dvd_tcp"] / r["raw_socket"] for r in rounds), 3)
    row["dvd_tcp_over_grpc"] = round(statistics.median(r["dvd_tcp"] / r["grpc"] for r in rounds), 3)
    return row


def main(
    sizes_mib: Annotated[list[float], typer.Option(help="Feature sizes in MiB")] = [0.5, 2, 8, 26],  # noqa: B006
    seconds: Annotated[float, typer.Option(help="Rough duration of each pipelined run")] = 2.0,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds of the three backends per size")] = 3,
    latency_samples: Annotated[int, typer.Option(help="Messages sent one at a time for latency")] = 50,
    output: Annotated[Path, typer.Option(help="Results file (JSON)")] = DEFAULT_OUTPUT,
) -> None:
    load_before = load_average()
    results = [measure_size(size_mib, seconds, repeats, latency_samples) for size_mib in sizes_mib]
    report = {
        "machine": summary(),
        "command": command_line(),
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "seconds": seconds,
        "repeats": repeats,
        "goal": "dvd_tcp >= 0.8 x raw_socket for sizes >= 2 MiB",
        "goal_met": all(r["dvd_tcp_over_raw"] >= 0.8 for r in results if r["size_mib"] >= 2),
        "results": results,
    }
    write(report, output)
    typer.echo(f"wrote {output}")


if __name__ == "__main__":
    typer.run(main)
