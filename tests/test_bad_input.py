"""A corpus of hostile and malformed input, through the public API and straight at the internal gRPC ports.

Every entry must be a 4xx (HTTP) or a non-OK status (gRPC) with a message naming the problem; after the
corpus every server is healthy, holds nothing, and answers a good request. Parameter validation in depth
(each sampling field's range and type) is fuzzed in test_gateway_fleet.py and tabled in
test_gateway_api.py; http(s) image fetching in test_gateway_api.py and test_security.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import struct
import uuid
import zlib
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
import torch

from conftest import data_url, make_image, make_video, metric, png_bytes
from hardened import MAX_BODY_BYTES, MAX_IMAGE_BYTES, MAX_VIDEO_DECODED_PIXELS, MODEL
from proto import dvd_pb2, dvd_pb2_grpc
from transport.frames import ImageFeatures
from transport.tcp import TcpFeatureSender

pytestmark = pytest.mark.slow


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, idat: bytes) -> bytes:
    """A greyscale PNG declaring `width` x `height`, whatever its data holds."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb() -> bytes:
    """10,000 x 10,000 black pixels (100 MB decoded) in about 100 KB."""
    squeeze = zlib.compressobj(9)
    row = bytes(10_001)  # filter byte + one row
    data = b"".join(squeeze.compress(row) for _ in range(10_000)) + squeeze.flush()
    return grey_png(10_000, 10_000, data)


def as_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def with_images(*urls: str, text: str = "Describe.") -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}


def chat(**extra) -> dict:
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra}


GOOD_PNG = png_bytes(make_image(64, 64, 3))
GOOD_URL = data_url(make_image(64, 64, 3))


@dataclass
class Case:
    """One request of the corpus: a JSON body, or raw bytes with their content type."""

    name: str
    status: int
    match: str
    body: object = None
    content: bytes | None = None
    headers: dict = field(default_factory=dict)
    method: str = "POST"

    def __str__(self) -> str:
        return self.name


def chunked(data: bytes):
    """The body as a stream without a content-length: the gateway must count what arrives."""
    for start in range(0, len(data), 1 << 20):
        yield data[start:start + (1 << 20)]


BIG_BODY = json.dumps(with_images(as_url(bytes(MAX_BODY_BYTES)))).encode()
HTTP_CORPUS = [
    # images
    Case("truncated PNG", 400, "image 0: corrupt or truncated image", with_images(as_url(GOOD_PNG[:200]))),
    Case("corrupt JPEG", 400, "image 0: ", with_images(as_url(b"\xff\xd8\xff\xe0" + os.urandom(2000), "image/jpeg"))),
    Case("PNG declaring 100000x100000", 400, "image 0: image declares too many pixels",
         with_images(as_url(grey_png(100_000, 100_000, b"")))),
    Case("decompression bomb (100 MP in 100 KB)", 400, "declares 10000x10000 = 100000000 pixels",
         with_images(as_url(bomb()))),
    Case("second image corrupt", 400, "image 1: ", with_images(GOOD_URL, as_url(GOOD_PNG[:len(GOOD_PNG) // 2]))),
    Case("text/plain data URL", 400, "media type 'text/plain' is not image/*",
         with_images(as_url(b"hello", "text/plain"))),
    Case("image/png data URL holding text", 400, "image 0: not a JPEG, PNG", with_images(as_url(b"hello world"))),
    Case("SVG", 400, "image 0: not a JPEG, PNG",
         with_images(as_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"))),
    Case("data URL not base64", 400, "not valid base64", with_images("data:image/png;base64,!!!!")),
    Case("data URL without ;base64", 400, "must be base64 encoded", with_images("data:image/png,rawbytes")),
    Case("empty image", 400, "holds no bytes", with_images("data:image/png;base64,")),
    Case("image over max_image_bytes", 400, f"larger than the {MAX_IMAGE_BYTES}-byte limit",
         with_images(as_url(GOOD_PNG + bytes(MAX_IMAGE_BYTES)))),
    Case("17 images", 400, "the language server takes at most 16", with_images(*[GOOD_URL] * 17)),
    Case("file: URL", 400, "only data:, http: and https:", with_images("file:///etc/passwd")),
    Case("corrupt video", 400, "corrupt or unsupported video", {**chat(), "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": as_url(random.Random(5).randbytes(5000), "video/mp4")}}]}]}),
    Case("video over max_video_decoded_pixels", 400,
         f"image 0: the video needs {8 * 96 * 64} decoded pixels; the limit is {MAX_VIDEO_DECODED_PIXELS} "
         "(max_video_decoded_pixels)", {**chat(), "messages": [{"role": "user", "content": [
             {"type": "video_url", "video_url": {"url": as_url(make_video(30), "video/mp4"), "num_frames": 8}}]}]}),
    Case("image in an assistant message", 400, "only accepted in user messages", {**chat(), "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": GOOD_URL}}]}]}),
    # the body itself
    Case("body over max_body_bytes (declared)", 413, f"larger than the gateway's {MAX_BODY_BYTES}-byte limit",
         content=BIG_BODY),
    Case("body over max_body_bytes (chunked)", 413, f"larger than the gateway's {MAX_BODY_BYTES}-byte limit",
         content=b"chunked"),
    Case("invalid JSON", 400, "the body is not valid JSON", content=b'{"model": "tiny", "messages": [}'),
    Case("invalid UTF-8", 400, "not valid UTF-8", content=b'{"model": "tiny\xff\xfe", "messages": []}'),
    Case("JSON nested 100000 deep", 400, "error parsing the body", content=b"[" * 100_000 + b"]" * 100_000),
    Case("JSON array body", 400, "valid dictionary", content=b"[1, 2]"),
    Case("text/plain content type", 400, "valid dictionary", content=json.dumps(chat()).encode(),
         headers={"content-type": "text/plain"}),
    Case("GET instead of POST", 405, "Method Not Allowed", method="GET"),
    # parameters
    Case("unknown parameter", 400, "frequency: this server does not support this parameter", chat(frequency=1)),
    Case("unknown field in a message", 400, "this server does not support this parameter", {**chat(), "messages": [
        {"role": "user", "content": "hi", "mood": "grumpy"}]}),
    Case("unknown role", 400, "messages", {**chat(), "messages": [{"role": "root", "content": "hi"}]}),
    Case("no messages", 400, "messages", chat(messages=[])),
    Case("missing model", 400, "model: Field required", {"messages": [{"role": "user", "content": "hi"}]}),
    Case("unknown model", 404, "model 'gpt-5' is not served here", chat(model="gpt-5")),
    Case("temperature 5", 400, "temperature", chat(temperature=5)),
    Case("max_tokens -1", 400, "max_tokens", chat(max_tokens=-1)),
    Case("max_tokens 2**64", 400, "max_tokens", chat(max_tokens=2**64)),
    Case("n 1000", 400, "n", chat(n=1000, temperature=1)),
    Case("top_logprobs 50", 400, "top_logprobs", chat(logprobs=True, top_logprobs=50)),
    Case("seed 2**70", 400, "seed", chat(seed=2**70)),
    Case("stop list of 17", 400, "stop", chat(stop=["x"] * 17)),
    Case("prompt longer than the context", 400, "maximum context length is 4096 tokens",
         chat(messages=[{"role": "user", "content": "hello " * 6000}])),
]


def send(stack, case: Case) -> httpx.Response:
    url = f"{stack.gateway_url}/v1/chat/completions"
    headers = {**stack.headers, "content-type": "application/json", **case.headers}
    content = case.content
    if content == b"chunked":
        content = chunked(BIG_BODY)
    elif case.body is not None:
        content = json.dumps(case.body).encode()
    return httpx.request(case.method, url, content=content, headers=headers, timeout=120)


@pytest.mark.parametrize("case", HTTP_CORPUS, ids=str)
def test_bad_http_input_is_a_4xx_with_a_clear_message(hardened_stack, case):
    reply = send(hardened_stack, case)
    assert reply.status_code == case.status, (reply.status_code, reply.text[:500])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == case.status, error
    assert case.match in error["message"], error
    assert len(reply.headers["x-request-id"]) == 32


# ---------------------------------------------------------------- internal gRPC ports


def secret_metadata(stack) -> tuple:
    return (("authorization", f"Bearer {stack.internal_secret}"),)


def bad_encode_calls(channel: grpc.aio.Channel, endpoint: str, metadata) -> dict:
    """Bad Encode calls by name, started (gRPC runs them at once); `endpoint`: the language server's features."""
    vision = dvd_pb2_grpc.VisionServiceStub(channel)
    image = dvd_pb2.ImageInput(data=GOOD_PNG)

    def encode(timeout: float = 10, **fields):
        return vision.Encode(dvd_pb2.EncodeRequest(**fields), metadata=metadata, timeout=timeout)

    return {
        "Encode: malformed protobuf": channel.unary_unary("/dvd.v1.VisionService/Encode")(
            b"\x0a\xff\xff\xff\xff\x0f", metadata=metadata, timeout=10),
        "Encode: no images": encode(request_id="r1", feature_endpoint=endpoint),
        "Encode: 17 images": encode(request_id="r2", feature_endpoint=endpoint, images=[image] * 17),
        "Encode: no request id": encode(feature_endpoint=endpoint, images=[image]),
        "Encode: garbage image bytes": encode(request_id="r3", feature_endpoint=endpoint,
                                              images=[dvd_pb2.ImageInput(data=os.urandom(500))]),
        "Encode: max_tiles 100000": encode(request_id="r4", feature_endpoint=endpoint,
                                           images=[dvd_pb2.ImageInput(data=GOOD_PNG, max_tiles=100_000)]),
        "Encode: ViR on a non-Flash checkpoint": encode(request_id="r5", feature_endpoint=endpoint, images=[image],
                                                        use_vir=True),
        "Encode: feature endpoint not a ZeroMQ address": encode(request_id="r6", feature_endpoint="not-an-endpoint",
                                                                images=[image], timeout=30),
    }


def bad_generate_calls(channel: grpc.aio.Channel, metadata) -> dict:
    """Bad Generate calls by name, started."""
    language = dvd_pb2_grpc.LanguageServiceStub(channel)
    user_image = dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(image=True)])
    user_text = dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(text="x")])
    few = dvd_pb2.SamplingParams(max_tokens=2)

    def generate(**fields):
        return language.Generate(dvd_pb2.GenerateRequest(**fields), metadata=metadata, timeout=10)

    return {
        "Generate: malformed protobuf": channel.unary_stream("/dvd.v1.LanguageService/Generate")(
            b"\x12\x05\x0a", metadata=metadata, timeout=10),
        "Generate: image_count disagrees with the messages": generate(request_id="g1", messages=[user_image],
                                                                      image_count=3, sampling=few),
        "Generate: 17 images": generate(request_id="g2", messages=[user_image] * 17, image_count=17, sampling=few),
        "Generate: no request id": generate(messages=[user_image], image_count=1, sampling=few),
        "Generate: negative feature timeout": generate(request_id="g3", messages=[user_image], image_count=1,
                                                       feature_timeout_s=-1, sampling=few),
        "Generate: unknown role": generate(request_id="g4", sampling=few, messages=[
            dvd_pb2.ChatMessage(role="root", content=[dvd_pb2.ContentPart(text="x")])]),
        "Generate: bad JSON schema": generate(request_id="g5", messages=[user_text],
                                              sampling=dvd_pb2.SamplingParams(max_tokens=2, json_schema="{not json")),
    }


async def outcome(call) -> tuple[grpc.StatusCode, str]:
    """A call's status and its result or message."""
    try:
        result = [r async for r in call] if hasattr(call, "__aiter__") else await call
        return grpc.StatusCode.OK, str(result)[:200]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


async def grpc_corpus(stack) -> dict[str, tuple[grpc.StatusCode, str]]:
    """Each bad call's status and message, with the internal secret (the calls reach the handlers)."""
    metadata = secret_metadata(stack)
    vision_address, language_address = f"{stack.host}:{stack.vision_port}", f"{stack.host}:{stack.language_port}"
    async with grpc.aio.insecure_channel(vision_address) as vision_channel, \
            grpc.aio.insecure_channel(language_address) as language_channel:
        language = dvd_pb2_grpc.LanguageServiceStub(language_channel)
        endpoint = (await language.Describe(dvd_pb2.DescribeRequest(), metadata=metadata, timeout=10)).feature_endpoint
        calls = bad_encode_calls(vision_channel, endpoint, metadata) | bad_generate_calls(language_channel, metadata)
        outcomes = {name: await outcome(call) for name, call in calls.items()}
        abort = await language.Abort(dvd_pb2.AbortRequest(request_id="no-such-request"), metadata=metadata,
                                     timeout=10)
        outcomes["Abort: unknown request id"] = (grpc.StatusCode.OK, f"found={abort.found}")
    return outcomes


EXPECTED_GRPC = {
    "Encode: malformed protobuf": (grpc.StatusCode.UNKNOWN, "Error parsing message"),
    "Generate: malformed protobuf": (grpc.StatusCode.UNKNOWN, "Error parsing message"),
    "Encode: no images": (grpc.StatusCode.INVALID_ARGUMENT, "0 images; 1 to 16 allowed"),
    "Encode: 17 images": (grpc.StatusCode.INVALID_ARGUMENT, "17 images; 1 to 16 allowed"),
    "Encode: no request id": (grpc.StatusCode.INVALID_ARGUMENT, "request_id and feature_endpoint are required"),
    "Encode: garbage image bytes": (grpc.StatusCode.INVALID_ARGUMENT, "image 0: not an image"),
    "Encode: max_tiles 100000": (grpc.StatusCode.INVALID_ARGUMENT, "max_tiles 100000 exceeds 128"),
    "Encode: ViR on a non-Flash checkpoint": (grpc.StatusCode.INVALID_ARGUMENT, "ViR needs a Flash checkpoint"),
    "Encode: feature endpoint not a ZeroMQ address": (grpc.StatusCode.UNAVAILABLE, "bad feature endpoint"),
    "Generate: image_count disagrees with the messages": (grpc.StatusCode.INVALID_ARGUMENT,
                                                          "messages hold 1 images but image_count is 3"),
    "Generate: 17 images": (grpc.StatusCode.INVALID_ARGUMENT, "17 images in one request; this server takes at most"),
    "Generate: no request id": (grpc.StatusCode.INVALID_ARGUMENT, "is empty or already in flight"),
    "Generate: negative feature timeout": (grpc.StatusCode.INVALID_ARGUMENT, "feature_timeout_s -1.0 is negative"),
    "Generate: unknown role": (grpc.StatusCode.INVALID_ARGUMENT, "message 0: role 'root' is not one of"),
    "Generate: bad JSON schema": (grpc.StatusCode.INVALID_ARGUMENT, "json_schema is not valid JSON"),
    "Abort: unknown request id": (grpc.StatusCode.OK, "found=False"),
}


def test_bad_grpc_calls_get_a_clear_status(hardened_stack):
    outcomes = asyncio.run(grpc_corpus(hardened_stack))
    print("\n".join(f"{name}: {code.name} {message!r}" for name, (code, message) in outcomes.items()))
    for name, (code, match) in EXPECTED_GRPC.items():
        got_code, message = outcomes[name]
        assert got_code == code and match in message, (name, got_code, message)


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh TCP connection and return what comes back before the server closes or 2 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


GARBAGE = [
    ("random bytes", os.urandom(4096)),
    ("HTTP/1.1 request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("HTTP/2 preface then garbage", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(1024)),
    ("HTTP/2 frame declaring 16 MB", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"),
]


@pytest.mark.parametrize("name, data", GARBAGE)
def test_garbage_on_the_grpc_ports_is_refused_and_the_servers_serve_on(hardened_stack, name, data):
    stack = hardened_stack
    for port in (stack.vision_port, stack.language_port):
        reply = raw_exchange(port, data)
        assert b"dvd" not in reply.lower()  # nothing of ours leaks into the refusal
    for stub, address in ((dvd_pb2_grpc.VisionServiceStub, stack.vision_port),
                          (dvd_pb2_grpc.LanguageServiceStub, stack.language_port)):
        with grpc.insecure_channel(f"127.0.0.1:{address}") as channel:
            assert stub(channel).Health(dvd_pb2.HealthRequest(), timeout=10).ready


def test_after_the_corpus_every_server_is_healthy_holds_nothing_and_answers(hardened_stack):
    """The whole corpus first, in this test (the tests above check each answer; run alone, this one still
    follows the corpus), then a good request."""
    stack = hardened_stack
    for case in HTTP_CORPUS:
        assert send(stack, case).status_code == case.status, case
    asyncio.run(grpc_corpus(stack))
    for _, data in GARBAGE:
        for port in (stack.vision_port, stack.language_port):
            raw_exchange(port, data)
    assert httpx.get(f"{stack.gateway_url}/health", timeout=10).json() == {"vision_servers_up": 1,
                                                                           "language_servers_up": 1}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                             {"type": "image_url", "image_url": {"url": GOOD_URL}}]}]
    reply = stack.client().chat.completions.create(model=MODEL, max_tokens=3, messages=messages,
                                                   extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens_details.image_tokens == 256
    urls = stack.metrics_urls
    assert metric(urls["gateway"], "dvd_gateway_requests_total", status="500") == 0
    assert metric(urls["gateway"], "dvd_gateway_requests_in_flight") == 0
    assert metric(urls["language-server"], "dvd_language_requests_in_flight") == 0
    assert metric(urls["language-server"], "dvd_language_features_pending_bytes") == 0
    assert all(process.poll() is None for process in stack.processes.values())


# ---------------------------------------------------------------- features that must not reach vLLM


async def send_features(endpoint: str, items: list[ImageFeatures]) -> None:
    sender = TcpFeatureSender(send_timeout_s=10)
    try:
        for item in items:
            await sender.send(endpoint, item)
        await asyncio.sleep(0.5)  # ZeroMQ sends in the background; closing with LINGER 0 would drop the rest
    finally:
        sender.close()


def generate_with(stack, request_id: str, image_count: int) -> tuple[grpc.StatusCode, str]:
    messages = [dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(image=True)] * image_count)]
    with grpc.insecure_channel(f"{stack.host}:{stack.language_port}") as channel:
        try:
            list(dvd_pb2_grpc.LanguageServiceStub(channel).Generate(dvd_pb2.GenerateRequest(
                request_id=request_id, messages=messages, image_count=image_count, feature_timeout_s=10,
                sampling=dvd_pb2.SamplingParams(max_tokens=2)), metadata=secret_metadata(stack), timeout=30))
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


@pytest.mark.parametrize("name, features, image_count, code, match", [
    # the receiver knows the model's width: such features never reach the store (dropped and counted), so the
    # Generate call waits for its features in vain
    ("hidden size 32, not 64", lambda h: [torch.zeros(256, 32)], 1, grpc.StatusCode.DEADLINE_EXCEEDED,
     "0 of 1 images' features arrived"),
    ("NaN in the features", lambda h: [torch.full((256, h), float("nan"))], 1, grpc.StatusCode.INVALID_ARGUMENT,
     "features hold NaN or infinity"),
    ("header: 2 images, Generate: 1", lambda h: [torch.zeros(256, h)], 2, grpc.StatusCode.INVALID_ARGUMENT,
     "features say 2 images, the request has 1"),
])
def test_features_that_would_harm_vllm_fail_their_request_only(hardened_stack, name, features, image_count, code,
                                                               match):
    """Well-framed features with the wrong content, sent straight to the feature port: the Generate call that
    claims them fails with an error naming the problem; vLLM never sees them and serves on."""
    stack = hardened_stack
    with grpc.insecure_channel(f"{stack.host}:{stack.language_port}") as channel:
        description = dvd_pb2_grpc.LanguageServiceStub(channel).Describe(
            dvd_pb2.DescribeRequest(), metadata=secret_metadata(stack), timeout=10)
    request_id = uuid.uuid4().hex
    tensors = features(description.hidden_size)
    items = [ImageFeatures(request_id, i, image_count, [256], t.to(torch.bfloat16)) for i, t in enumerate(tensors)]
    language_metrics = stack.metrics_urls["language-server"]
    dropped = metric(language_metrics, "dvd_language_features_dropped_total", reason="hidden_size")
    asyncio.run(send_features(description.feature_endpoint, items))
    got, message = generate_with(stack, request_id, 1)
    assert got == code and match in message, (got, message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert metric(language_metrics, "dvd_language_features_dropped_total", reason="hidden_size") == dropped + 1
    assert metric(stack.metrics_urls["language-server"], "dvd_language_features_pending_bytes") == 0
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": GOOD_URL}}]}]
    reply = stack.client().chat.completions.create(model=MODEL, max_tokens=2, messages=messages,
                                                   extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 2
