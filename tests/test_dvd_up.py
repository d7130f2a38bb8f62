"""`dvd up` on the custom-format tiny checkpoint, driven with the official `openai` client.

The three servers run as real processes (vLLM included). One test stops the stack with SIGTERM; a test that runs
after it, in whatever order, finds `dvd up` started again on the same ports.
"""

from __future__ import annotations

import base64
import signal
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from conftest import data_url, free_port, make_image, make_video, metric, png_bytes, sse_lines
from language_server.server import VISION_PREFIXES
from launcher import Servers, Stack, wait_until
from proto import dvd_pb2, dvd_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dvd_up(tiny_checkpoints, tmp_path_factory):
    """`dvd up` as a user runs it, on free ports, with its defaults (bf16 features on the wire); stopped with
    SIGTERM at the end (its servers also get SIGTERM from their parent-death signal should it be killed)."""
    stack = Stack(model=str(tiny_checkpoints["custom"]), gateway_port=free_port(), vision_port=free_port(),
                  language_port=free_port(), feature_port=free_port(), vision_metrics_port=free_port(),
                  language_metrics_port=free_port())
    with Servers({"dvd up": stack.up_command()}, log_dir=tmp_path_factory.mktemp("logs"), stop_timeout_s=60) as servers:
        yield stack, servers


@pytest.fixture(autouse=True)
def up(dvd_up):
    """The running stack and its `dvd up` process: started for the first test, and again after a test stopped it."""
    stack, servers = dvd_up
    process = servers.processes.get("dvd up")
    if process is None or process.poll() is not None:
        servers.start()
        servers.wait_until(stack.ready(), 600)
    return stack, servers.processes["dvd up"]


@pytest.fixture(scope="module")
def client(dvd_up) -> openai.OpenAI:
    stack, _ = dvd_up
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(dvd_up) -> str:
    """The served model's name: the checkpoint directory's (test_models_lists_the_served_checkpoint checks it)."""
    return Path(dvd_up[0].model).name


def user(text: str, *images) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": parts}]


def test_models_lists_the_served_checkpoint(client, model):
    assert [m.id for m in client.models.list().data] == [model]


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_chat_completion_with_images(client, model, num_images):
    images = [make_image(640, 360, seed=i) for i in range(num_images)]
    reply = client.chat.completions.create(model=model, messages=user("Describe the picture.", *images),
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    assert reply.choices[0].message.content
    # 640x360 -> a 2x1 grid + thumbnail = 3 tiles of 256 tokens per image.
    assert reply.usage.prompt_tokens_details.image_tokens == 768 * num_images
    assert reply.usage.prompt_tokens > 768 * num_images
    assert reply.id.startswith("chatcmpl-")


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_streamed_chat_matches_non_streamed(client, model, num_images):
    images = [make_image(300, 500, seed=10 + i) for i in range(num_images)]
    messages = user("What is shown?", *images)
    exactly = {"ignore_eos": True}  # six tokens whenever the random model would pick EOS
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                           extra_body=exactly)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                                 extra_body=exactly,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_images_across_turns_are_all_used(client, model):
    first, second = make_image(448, 448, seed=1), make_image(448, 448, seed=2)
    messages = user("Look at this.", first) + [{"role": "assistant", "content": "I see it."}] + user(
        "And this one?", second)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens_details.image_tokens == 2 * 256


def test_output_depends_on_the_image(client, model):
    """Eight greedy tokens each (ignore_eos: never an early EOS, so never three empty answers alike)."""
    replies = {
        tuple(token.token for token in client.chat.completions.create(
            model=model, messages=user("Describe.", make_image(448, 448, seed=s)), max_tokens=8, temperature=0,
            logprobs=True, extra_body={"ignore_eos": True}).choices[0].logprobs.content)
        for s in (3, 4, 5)
    }
    assert len(replies) > 1 and all(len(tokens) == 8 for tokens in replies)


def test_a_video_goes_in_as_frames_of_one_tile(client, model):
    video = "data:video/mp4;base64," + base64.b64encode(make_video(30)).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                             {"type": "text", "text": "What happens?"}]}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens_details.image_tokens == 8 * 256  # 8 frames, one tile each
    messages[0]["content"][0]["video_url"]["num_frames"] = 3
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens_details.image_tokens == 3 * 256
    with pytest.raises(openai.BadRequestError, match="unsupported video"):
        messages[0]["content"][0]["video_url"] = {"url": "data:video/mp4;base64," + base64.b64encode(b"junk").decode()}
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)


def test_text_only_requests_skip_the_vision_server(client, model, up):
    stack, _ = up
    metrics_url = f"http://127.0.0.1:{stack.vision_metrics_port}/metrics"
    before = metric(metrics_url, "dvd_vision_requests_total")
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert metric(metrics_url, "dvd_vision_requests_total") == before
    client.chat.completions.create(model=model, messages=user("hi", make_image(64, 64, 0)), max_tokens=2)
    assert metric(metrics_url, "dvd_vision_requests_total") == before + 1


def test_corrupt_image_is_a_400_and_the_server_keeps_serving(client, model):
    broken = "data:image/png;base64," + base64.b64encode(png_bytes(make_image(64, 64, 0))[:50]).decode()
    with pytest.raises(openai.BadRequestError, match="image 0"):
        client.chat.completions.create(model=model, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": broken}}]}])
    with pytest.raises(openai.BadRequestError, match="base64"):
        client.chat.completions.create(model=model, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}])
    with pytest.raises(openai.BadRequestError, match="data: URLs"):
        client.chat.completions.create(model=model, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    reply = client.chat.completions.create(model=model, messages=user("ok?", make_image(64, 64, 1)), max_tokens=2,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_bad_requests_get_openai_errors(client, model):
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="functions: this server does not support"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       functions=[{"name": "f"}])


def test_prompt_longer_than_the_context_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is \d+ tokens"):
        client.chat.completions.create(model=model, max_tokens=2,
                                       messages=[{"role": "user", "content": "hello " * 9000}])
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert reply.usage.completion_tokens == 1  # and the server serves on


def test_too_many_images_is_a_400(client, model):
    tiny = make_image(32, 32, 0)
    with pytest.raises(openai.BadRequestError, match="17 images in one request; the language server takes at most 16"):
        client.chat.completions.create(model=model, messages=user("many", *[tiny] * 17), max_tokens=1)


def test_client_disconnect_cancels_the_generation(up, model):
    stack, _ = up
    metrics_url = f"http://127.0.0.1:{stack.language_metrics_port}/metrics"
    before = metric(metrics_url, "dvd_language_requests_total", outcome="cancelled")
    body = {"model": model, "stream": True, "max_tokens": 4000, "ignore_eos": True,
            "messages": user("Write a long story.", make_image(64, 64, 3))}
    with httpx.stream("POST", f"{stack.gateway_url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        next(sse_lines(reply))  # the first chunk arrived: the request is generating; now hang up

    def outcomes() -> dict[str, float]:
        return {o: metric(metrics_url, "dvd_language_requests_total", outcome=o)
                for o in ("ok", "cancelled", "error")}

    # Two loaded cores can be slow to notice the hang-up.
    wait_until(lambda: outcomes()["cancelled"] == before + 1, 30,
               lambda: f"the language server counts the request as cancelled; its outcomes: {outcomes()}")
    assert metric(metrics_url, "dvd_language_requests_in_flight") == 0


def test_language_server_holds_no_vision_weights(up):
    stack, _ = up
    with grpc.insecure_channel(f"127.0.0.1:{stack.language_port}") as channel:
        description = dvd_pb2_grpc.LanguageServiceStub(channel).Describe(dvd_pb2.DescribeRequest(), timeout=10)
    names = list(description.parameter_names)
    assert any(n.startswith("language_model.") for n in names)
    assert not [n for n in names if n.startswith(VISION_PREFIXES) or "vision" in n]
    assert description.checkpoint_format == "custom"


def test_features_that_never_arrive_time_out_and_the_server_keeps_serving(up, client, model):
    stack, _ = up
    with grpc.insecure_channel(f"127.0.0.1:{stack.language_port}") as channel:
        language = dvd_pb2_grpc.LanguageServiceStub(channel)
        request = dvd_pb2.GenerateRequest(
            request_id="never-encoded", image_count=1, feature_timeout_s=0.5,
            messages=[dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(image=True)])],
            sampling=dvd_pb2.SamplingParams(max_tokens=2))
        with pytest.raises(grpc.RpcError) as error:
            list(language.Generate(request, timeout=30))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "0 of 1 images" in error.value.details()
    pending = metric(f"http://127.0.0.1:{stack.language_metrics_port}/metrics", "dvd_language_features_pending_bytes")
    assert pending == 0
    reply = client.chat.completions.create(model=model, messages=user("hi", make_image(64, 64, 2)), max_tokens=2,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_sigterm_stops_every_server(up, dvd_up):
    """`dvd up` exits cleanly on SIGTERM and takes its three servers with it (the next test starts it again); the
    language server's engine processes end on their own, none left for vLLM's shutdown to kill."""
    stack, process = up
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    for port in (stack.gateway_port, stack.vision_port, stack.language_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    log = dvd_up[1].log("dvd up")
    assert log.count("[shutdown] Executor: all workers exited gracefully") == 1
    assert "force killing" not in log
