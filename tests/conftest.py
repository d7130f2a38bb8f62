"""Shared fixtures: tiny checkpoints of both formats, and real server stacks started once per module."""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from language_server import torch_compat  # noqa: F401  (before transformers / vLLM imports)
from launcher import free_port, wait_until_async  # noqa: F401  (the test modules take free_port from here)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint (seed 0) in both formats: same weights, different layout."""
    from checkpoint.generate import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {fmt: write_checkpoint(root / f"tiny-{fmt}", "tiny", fmt, seed=0) for fmt in ("custom", "hf")}


def metric(url: str, name: str, **labels) -> float:
    """Sum of the samples named `name` (exactly) on a Prometheus page whose labels include `labels`."""
    import httpx

    total = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        sample = line.split("{", 1)[0].split(" ", 1)[0]
        if sample == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sse_lines(reply) -> Iterator[str]:
    """The lines of a streamed (server-sent events) reply, split as the SSE format splits them: at line feeds
    only. httpx's `iter_lines` also splits at U+2028, U+0085 and the like, which the random model's text
    may hold inside a JSON string."""
    pending = b""
    for data in reply.iter_bytes():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode()
    if pending:
        yield pending.removesuffix(b"\r").decode()


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic, structured test picture (gradients + noise), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (seed + 1) * 7) % 256, (y * (seed + 2) * 5) % 256, ((x + y) * 3 + seed * 40) % 256], -1)
    noise = rng.integers(0, 60, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def encode_to_local_receiver(vision_port: int, image: Image.Image | list[Image.Image], timeout_s: float = 60,
                             **options):
    """Call a vision server's Encode (one image or several) with this process as the feature endpoint.

    Returns the EncodeResponse and the `ImageFeatures` that arrived over ZeroMQ.
    """
    images = image if isinstance(image, list) else [image]
    import asyncio
    import uuid

    import grpc

    from proto import dvd_pb2, dvd_pb2_grpc
    from transport.tcp import TcpFeatureReceiver

    async def run():
        received = []
        receiver = TcpFeatureReceiver("tcp://127.0.0.1:*", received.append, max_payload_bytes=1 << 28)
        task = asyncio.create_task(receiver.run())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{vision_port}") as channel:
                reply = await dvd_pb2_grpc.VisionServiceStub(channel).Encode(dvd_pb2.EncodeRequest(
                    request_id=uuid.uuid4().hex, feature_endpoint=receiver.endpoint,
                    images=[dvd_pb2.ImageInput(data=png_bytes(i)) for i in images], **options), timeout=timeout_s)
            await wait_until_async(lambda: len(received) == len(reply.images), 60,
                                   f"the features of {len(reply.images)} images arrive")
        finally:  # an unclosed ZeroMQ socket would block the context's teardown
            task.cancel()
            receiver.close()
        return reply, received

    return asyncio.run(run())


def make_video(num_frames: int = 30, width: int = 96, height: int = 64) -> bytes:
    """A small MPEG-4 video whose frame i is a flat grey of level 8 * i (frames tell themselves apart)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.full((height, width, 3), (8 * i) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


HARDENED = "hardened_stack"


@pytest.fixture(scope="session")
def hardened_stack(tiny_checkpoints, tmp_path_factory):
    """One stack for the reliability modules; stopped as soon as the last test using it is done."""
    from hardened import plan

    stack = plan(str(tiny_checkpoints["custom"]), tmp_path_factory.mktemp("hardened-logs"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def pytest_collection_modifyitems(items):
    """Run the tests that share the hardened stack back to back (stable: each keeps its place otherwise)."""
    users = [item for item in items if HARDENED in getattr(item, "fixturenames", ())]
    if users:
        first = items.index(users[0])
        chosen = set(users)
        others = [item for item in items if item not in chosen]
        items[:] = others[:first] + users + others[first:]


def pytest_runtest_teardown(item, nextitem):
    """Stop the hardened stack once no further test needs it, rather than at the end of the session."""
    if HARDENED in getattr(item, "fixturenames", ()) and (
            nextitem is None or HARDENED not in getattr(nextitem, "fixturenames", ())):
        stack = item.funcargs.get(HARDENED)
        if stack is not None:
            stack.stop()


# ---------------------------------------------------------------- the `slow` marker, enforced

SERVER_COMMANDS = {"language-server", "vision-server", "gateway", "up", "serve"}
_running: list[pytest.Item] = []  # the test whose setup, call or teardown runs now


def server_command(args) -> str | None:
    """The command line, when `args` starts one of the project's servers (or coupled vLLM): `dvd.cli
    language-server ...`, `dvd up ...`, `benchmarks.vllm_cli serve ...`, also behind `ip netns exec`."""
    words = [str(a) for a in args] if isinstance(args, list | tuple) else str(args).split()
    for word, following in zip(words, words[1:]):
        runner = word in ("dvd.cli", "benchmarks.vllm_cli", "dvd") or word.endswith("/dvd")
        if runner and following in SERVER_COMMANDS:
            return " ".join(words)
    return None


def _refuse_unmarked_servers(event: str, args: tuple) -> None:
    """A test that starts a server process must be marked `slow`, so that `-m "not slow"` stays fast."""
    if event != "subprocess.Popen" or not _running:
        return
    item = _running[-1]
    if item.get_closest_marker("slow") is None and (command := server_command(args[1])):
        raise RuntimeError(f"{item.nodeid} starts a server without the `slow` marker: {command}")


sys.addaudithook(_refuse_unmarked_servers)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()
