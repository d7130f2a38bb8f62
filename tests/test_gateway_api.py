"""The gateway's OpenAI API with the official `openai` client against real servers (vLLM included).

One vision server and one language server; three gateways in front of them: `open` (a settings file
that lets it fetch images from 127.0.0.1), `strict` (an API key, one request at a time, no private
image URLs, a dead vision server listed first, its log kept) and `spare`, whose second vision server
starts and stops during the tests.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from PIL import Image

from conftest import data_url, free_port, make_image, metric, png_bytes, sse_lines
from gateway.reasoning import R1_SYSTEM_PROMPT
from launcher import Servers, Stack, http_ready, wait_until

pytestmark = pytest.mark.slow
API_KEY = "sk-dvd-test"


@dataclass
class GatewayStack(Stack):
    """`dvd up`'s servers plus more gateways on the same vision and language servers."""

    gateway_args: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)

    def commands(self) -> dict[str, list[str]]:
        commands = super().commands()
        commands["gateway"] += self.gateway_args
        for name, args in self.extra.items():
            commands[name] = [sys.executable, "-m", "dvd.cli", *args]
        return commands


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [make_image(64, 64, 7), make_image(64, 64, 8)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


class ImageHandler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(4)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("location", "/cat.png")
            self.end_headers()
            return
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("location", "/loop")
            self.end_headers()
            return
        body = self.files.get(self.path.split("?")[0])
        if body is None and self.path != "/slow.png":
            self.send_error(404)
            return
        body = body or png_bytes(make_image(32, 32, 0))
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the gateway hangs up on oversized bodies
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    ImageHandler.files = {
        "/cat.png": png_bytes(make_image(64, 64, 1)),
        "/cat.jpg": encoded(make_image(64, 64, 1), "JPEG"),
        "/big.png": b"\x89PNG\r\n\x1a\n" + bytes(3 << 20),
        "/notes.txt": b"not an image",
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway-api-logs")
    (logs / "open.toml").write_text('image_fetch_allowed_networks = ["127.0.0.0/8"]\nimage_fetch_timeout_s = 2\n'
                                    f"max_image_bytes = {2 << 20}\n")
    stack = GatewayStack(model=str(tiny_checkpoints["custom"]), gateway_port=free_port(), vision_port=free_port(),
                         language_port=free_port(), feature_port=free_port(), language_metrics_port=free_port(),
                         gateway_args=["--config", str(logs / "open.toml")])
    stack.strict_port, stack.spare_port, stack.dead_port = free_port(), free_port(), free_port()
    stack.spare_vision_port = free_port()
    vision, language = f"127.0.0.1:{stack.vision_port}", f"127.0.0.1:{stack.language_port}"
    stack.extra = {
        "strict": ["gateway", "--port", str(stack.strict_port), "--api-key", API_KEY, "--max-in-flight", "1",
                   "--vision-server", f"127.0.0.1:{stack.dead_port}", "--vision-server", vision,
                   "--language-server", language, "--log-level", "debug"],
        "spare": ["gateway", "--port", str(stack.spare_port), "--health-interval-s", "0.5",
                  "--vision-server", vision, "--vision-server", f"127.0.0.1:{stack.spare_vision_port}",
                  "--language-server", language],
    }
    stack.logs_dir = logs
    # Ready once the strict and spare gateways' health checks found the servers too (the strict one's dead
    # vision server stays down; the spare one's second vision server comes later).
    others = [http_ready(f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {API_KEY}"},
                         health={"vision_servers_up": 1, "language_servers_up": 1})
              for port in (stack.strict_port, stack.spare_port)]
    with stack.servers(logs).running(lambda: stack.ready()() and all(ready() for ready in others)):
        yield stack


def client_for(port: int, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=kwargs.pop("api_key", "unused"),
                         max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return client_for(stack.gateway_port)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def user(text: str, *images, detail: str = "auto") -> list[dict]:
    parts = [{"type": "text", "text": text}]
    for image in images:
        url = image if isinstance(image, str) else data_url(image)
        parts.append({"type": "image_url", "image_url": {"url": url, "detail": detail}})
    return [{"role": "user", "content": parts}]


PICTURE = make_image(64, 64, 1)


VLLM_PARAMS = ("top_k", "min_p", "repetition_penalty", "ignore_eos")  # not in OpenAI's API: sent as extra_body


def extra(params: dict) -> dict:
    """The request's parameters for the openai client. Unless a grammar must be able to end the output, the
    tests ask for exactly max_tokens tokens: when the random model picks EOS differs between CPUs."""
    params = dict(params)
    if "response_format" not in params:
        params.setdefault("ignore_eos", True)
    params["extra_body"] = {**params.get("extra_body", {}), **{k: params.pop(k) for k in VLLM_PARAMS if k in params}}
    return params


def ask(client, model, messages=None, **params):
    params = extra(params)
    params.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=model, messages=messages or user("Describe.", PICTURE), **params)


def streamed(client, model, messages=None, **params) -> tuple[dict[int, str], list]:
    params = extra(params)
    params.setdefault("max_tokens", 8)
    chunks = list(client.chat.completions.create(model=model, messages=messages or user("Describe.", PICTURE),
                                                 stream=True, **params))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, chunks


# ---------------------------------------------------------------- sampling parameters


def test_top_k_1_and_min_p_1_sample_the_greedy_token(client, model):
    greedy = ask(client, model, temperature=0, max_tokens=12).choices[0].message.content
    assert ask(client, model, temperature=1.5, top_k=1, seed=1, max_tokens=12).choices[0].message.content == greedy
    assert ask(client, model, temperature=1.5, min_p=1.0, seed=2, max_tokens=12).choices[0].message.content == greedy
    assert ask(client, model, temperature=1.5, top_p=1e-6, seed=3, max_tokens=12).choices[0].message.content == greedy
    assert ask(client, model, temperature=1.5, seed=4, max_tokens=12).choices[0].message.content != greedy


def test_seed_makes_sampling_repeatable_streamed_or_not(client, model):
    first = ask(client, model, temperature=1, seed=42).choices[0].message.content
    assert ask(client, model, temperature=1, seed=42).choices[0].message.content == first
    assert streamed(client, model, temperature=1, seed=42)[0] == {0: first}
    assert ask(client, model, temperature=1, seed=43).choices[0].message.content != first


def test_max_completion_tokens_wins_over_max_tokens(client, model):
    reply = ask(client, model, max_tokens=3, max_completion_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    assert ask(client, model, max_tokens=3).usage.completion_tokens == 3


def test_stop_string_ends_the_completion(client, model):
    text = ask(client, model, temperature=0, max_tokens=12).choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    reply = ask(client, model, temperature=0, max_tokens=12, stop=[stop, "never-there"])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == text[:text.index(stop)]
    texts, chunks = streamed(client, model, temperature=0, max_tokens=12, stop=stop)
    assert texts == {0: text[:text.index(stop)]}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 2.0}, {"presence_penalty": 2.0},
                                     {"frequency_penalty": 2.0}])
def test_penalties_change_a_repetitive_greedy_completion(client, model, penalty):
    plain = ask(client, model, temperature=0, max_tokens=24, logprobs=True)
    tokens = [t.token for t in plain.choices[0].logprobs.content]
    assert len(set(tokens)) < len(tokens)  # the random model repeats itself: penalties have something to do
    assert ask(client, model, temperature=0, max_tokens=24, **penalty).choices[0].message.content != \
        plain.choices[0].message.content


def test_n_choices_streamed_and_not(client, model):
    reply = ask(client, model, n=3, temperature=1, seed=7, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 3
    assert reply.usage.completion_tokens == 18
    texts, chunks = streamed(client, model, n=3, temperature=1, seed=7, max_tokens=6,
                             stream_options={"include_usage": True})
    assert texts == {c.index: c.message.content for c in reply.choices}
    finished = [choice.index for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert sorted(finished) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 18


def test_logprobs_and_top_logprobs_streamed_and_not(client, model):
    reply = ask(client, model, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob == pytest.approx(max(t.logprob for t in token.top_logprobs), abs=1e-4)  # greedy
        assert token.token == token.top_logprobs[0].token
    _, chunks = streamed(client, model, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    tokens = [t.token for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert tokens == [t.token for t in content]
    assert ask(client, model, max_tokens=2).choices[0].logprobs is None


def test_stream_options_include_usage(client, model):
    _, chunks = streamed(client, model, max_tokens=3)
    assert all(c.usage is None for c in chunks)
    _, chunks = streamed(client, model, max_tokens=3, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


# Only enums and booleans: the random model cannot wander off into an endless string or number.
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "round": {"type": "boolean"}},
          "required": ["color", "round"], "additionalProperties": False}


def test_json_schema_response_format_streamed_and_not(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
    reply = ask(client, model, temperature=0, max_tokens=40, response_format=response_format)
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    value = json.loads(reply.choices[0].message.content)
    assert value["color"] in SCHEMA["properties"]["color"]["enum"] and isinstance(value["round"], bool)
    assert set(value) == {"color", "round"}
    texts, _ = streamed(client, model, temperature=0, max_tokens=40, response_format=response_format)
    assert texts == {0: reply.choices[0].message.content}
    sampled = ask(client, model, temperature=1, seed=3, max_tokens=40, response_format=response_format)
    assert set(json.loads(sampled.choices[0].message.content)) == {"color", "round"}


def test_json_object_response_format(client, model):
    free = ask(client, model, temperature=0, max_tokens=10).choices[0].message.content
    constrained = ask(client, model, temperature=0, max_tokens=10, response_format={"type": "json_object"})
    assert not free.startswith("{") and constrained.choices[0].message.content.startswith("{")
    as_text = ask(client, model, temperature=0, max_tokens=3, response_format={"type": "text"})
    assert as_text.choices[0].message.content == free[:len(as_text.choices[0].message.content)]


def test_system_and_developer_prompts_and_user_field(client, model):
    plain = ask(client, model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    system = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    with_system = ask(client, model, messages=system, max_tokens=1, user="user-1234")
    assert with_system.usage.prompt_tokens > plain.usage.prompt_tokens
    developer = [{**system[0], "role": "developer"}, system[1]]
    assert ask(client, model, messages=developer, max_tokens=1).usage.prompt_tokens == with_system.usage.prompt_tokens


def test_multi_turn_chat_with_images_in_earlier_turns(client, model):
    messages = user("Look.", make_image(448, 448, 1)) + [{"role": "assistant", "content": "I see it."}] + \
        user("And now this one?", make_image(448, 448, 2)) + [{"role": "assistant", "content": "Yes."}] + \
        [{"role": "user", "content": "Compare them."}]
    reply = ask(client, model, messages=messages, max_tokens=2)
    assert reply.usage.prompt_tokens_details.image_tokens == 2 * 256


def test_thinking_mode_returns_the_thinking_as_reasoning_content(client, model):
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    # Same prompt spelled out: the random model never closes its thinking, so all of it is reasoning.
    spelled = ask(client, model, messages=[{"role": "system", "content": R1_SYSTEM_PROMPT}] + question,
                  temperature=0, max_tokens=10)
    thinking = ask(client, model, messages=question, temperature=0, max_tokens=10,
                   extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert thinking.usage.prompt_tokens == spelled.usage.prompt_tokens
    assert thinking.choices[0].message.reasoning_content == spelled.choices[0].message.content
    assert thinking.choices[0].message.content == ""
    chunks = list(client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=10,
                                                 stream=True,
                                                 extra_body={"chat_template_kwargs": {"enable_thinking": True}}))
    reasoning = "".join(getattr(ch.delta, "reasoning_content", None) or "" for c in chunks for ch in c.choices)
    assert reasoning == spelled.choices[0].message.content
    assert ask(client, model, messages=question, max_tokens=2).choices[0].message.reasoning_content is None


@pytest.mark.parametrize("params, match", [
    ({"functions": [{"name": "f"}]}, "functions: this server does not support"),
    ({"logit_bias": {"1": 500}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"n": 2, "temperature": 0}, "n > 1"),
    ({"n": 9}, "n=9"),
    ({"top_logprobs": 2}, "requires logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed"),
    ({"stop": [""]}, "stop"),
    ({"response_format": {"type": "grammar"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "json_schema"),
    ({"extra_body": {"chat_template_kwargs": {"add_generation_prompt": False}}}, "only enable_thinking"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages"),
])
def test_unsupported_or_invalid_parameters_are_a_400(client, model, params, match):
    params = extra({"messages": [{"role": "user", "content": "hi"}], **params})
    with pytest.raises(openai.BadRequestError, match=match) as error:
        client.chat.completions.create(model=model, max_tokens=2, **params)
    assert error.value.body["type"] == "invalid_request_error"


# ---------------------------------------------------------------- images


def test_every_image_format_and_the_first_frame_of_a_gif(client, model):
    picture = make_image(64, 64, 7)
    urls = [f"data:image/{fmt.lower()};base64," + base64.b64encode(encoded(picture, fmt)).decode()
            for fmt in ("PNG", "JPEG", "WEBP", "BMP")]
    urls.append("data:image/gif;base64," + base64.b64encode(animated_gif()).decode())
    reply = ask(client, model, messages=user("Which differ?", *urls), max_tokens=2)
    assert reply.usage.prompt_tokens_details.image_tokens == 5 * 256  # 64x64: one tile each
    gif_frame = Image.open(io.BytesIO(animated_gif())).convert("RGB")  # frame 0, after GIF's palette
    as_gif = ask(client, model, messages=user("Describe.", urls[-1]), temperature=0).choices[0].message.content
    as_png = ask(client, model, messages=user("Describe.", gif_frame), temperature=0).choices[0].message.content
    assert as_gif == as_png


def test_detail_low_is_one_tile(client, model):
    wide = make_image(640, 360, 3)
    assert ask(client, model, messages=user("x", wide), max_tokens=1).usage.prompt_tokens_details.image_tokens == 768
    low = ask(client, model, messages=user("x", wide, detail="low"), max_tokens=1)
    assert low.usage.prompt_tokens_details.image_tokens == 256


def test_http_images_are_fetched(client, model, image_server):
    by_url = ask(client, model, messages=user("Describe.", f"{image_server}/cat.png"), temperature=0)
    by_data = ask(client, model, messages=user("Describe.", PICTURE), temperature=0)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    redirected = ask(client, model, messages=user("Describe.", f"{image_server}/redirect"), temperature=0)
    assert redirected.choices[0].message.content == by_data.choices[0].message.content
    both = ask(client, model, messages=user("Two.", f"{image_server}/cat.jpg", f"{image_server}/cat.png"), max_tokens=1)
    assert both.usage.prompt_tokens_details.image_tokens == 512


@pytest.mark.parametrize("path, match", [
    ("/big.png", "image 0: larger than the 2097152-byte limit"),
    ("/slow.png", "took longer than 2 s"),
    ("/missing.png", "returned HTTP 404"),
    ("/notes.txt", "not a JPEG, PNG"),
    ("/loop", "more than 3 redirects"),
])
def test_bad_http_images_are_a_400(client, model, image_server, path, match):
    with pytest.raises(openai.BadRequestError, match=match):
        ask(client, model, messages=user("x", f"{image_server}{path}"))


def test_private_image_urls_are_refused_unless_allowed(stack, model, image_server):
    strict = client_for(stack.strict_port, api_key=API_KEY)
    port = image_server.rsplit(":", 1)[1]
    for url in (f"{image_server}/cat.png", f"http://localhost:{port}/cat.png", "http://169.254.169.254/latest",
                "http://[::1]/x.png", "ftp://example.com/x.png", "file:///etc/passwd"):
        with pytest.raises(openai.BadRequestError, match="non-public address|only data:, http: and https:"):
            ask(strict, model, messages=user("x", url))


# ---------------------------------------------------------------- operations


def test_api_key_is_required_when_configured(stack):
    with pytest.raises(openai.AuthenticationError) as error:
        client_for(stack.strict_port, api_key="wrong").models.list()
    assert error.value.body["type"] == "authentication_error"
    reply = httpx.post(f"http://127.0.0.1:{stack.strict_port}/v1/chat/completions", json={}, timeout=10)
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"http://127.0.0.1:{stack.strict_port}/health", timeout=10).status_code == 200
    assert client_for(stack.strict_port, api_key=API_KEY).models.list().data[0].id == "tiny-custom"


def test_request_id_in_the_header_and_in_every_log_line(stack, client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, max_tokens=2, messages=user("x", PICTURE))
    assert len(raw.headers["x-request-id"]) == 32 and raw.parse().id == f"chatcmpl-{raw.headers['x-request-id']}"
    error = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json={"model": model}, timeout=10)
    assert error.status_code == 400 and len(error.headers["x-request-id"]) == 32
    strict = client_for(stack.strict_port, api_key=API_KEY)
    raw = strict.chat.completions.with_raw_response.create(model=model, max_tokens=2, messages=user("x", PICTURE))
    request_id = raw.headers["x-request-id"]
    log = stack.logs_dir / "strict.log"
    tagged = lambda: [line for line in log.read_text().splitlines() if f"[{request_id}]" in line]  # noqa: E731
    wait_until(lambda: len(tagged()) >= 3, 30, "the request, the timings and the access log are logged at least")
    lines, ours = log.read_text().splitlines(), tagged()
    assert any("POST /v1/chat/completions" in line for line in ours)  # the access log
    assert any(f"request {request_id}: preprocess" in line for line in ours)  # the timings
    # Every line from the logging module carries a request id, or "-" outside a request; a line that names a
    # request carries that request's id, not another's.
    log_lines = [line for line in lines if line[:4].isdigit()]
    tags = {line: re.match(r"\S+ \S+ \w+ \S+ \[(-|[0-9a-f]{32})\]: ", line) for line in log_lines}
    assert log_lines and all(tags.values()), [line for line, tag in tags.items() if not tag]
    named = {line: re.search(r"request ([0-9a-f]{32})", line) for line in log_lines}
    assert all(tags[line][1] == name[1] for line, name in named.items() if name), named


def test_metrics_count_requests_latencies_and_backend_load(stack, client, model):
    url = f"{stack.gateway_url}/metrics"
    before = metric(url, "dvd_gateway_requests_total", status="200")
    ttft = metric(url, "dvd_gateway_ttft_seconds_count")
    vision = metric(url, "dvd_gateway_backend_requests_total", kind="vision", outcome="ok")
    ask(client, model, user("Describe.", make_image(64, 64, 451)), max_tokens=4)  # an image no server holds yet
    assert metric(url, "dvd_gateway_requests_total", status="200") == before + 1
    assert metric(url, "dvd_gateway_ttft_seconds_count") == ttft + 1
    assert metric(url, "dvd_gateway_backend_requests_total", kind="vision", outcome="ok") == vision + 1
    for name in ("dvd_gateway_tpot_seconds_count", "dvd_gateway_request_seconds_count",
                 "dvd_gateway_requests_in_flight", "dvd_gateway_backend_outstanding", "dvd_gateway_backend_up"):
        assert name in httpx.get(url, timeout=10).text


def test_in_flight_cap_answers_429_with_retry_after(stack, model):
    body = {"model": model, "stream": True, "max_tokens": 3000, "ignore_eos": True,  # busy until the test hangs up
            "messages": user("Write a long story.", PICTURE)}
    headers = {"authorization": f"Bearer {API_KEY}"}
    url = f"http://127.0.0.1:{stack.strict_port}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as busy:
        assert busy.status_code == 200
        lines = sse_lines(busy)
        assert next(lines).startswith("data: ")
        with pytest.raises(openai.RateLimitError) as error:
            ask(client_for(stack.strict_port, api_key=API_KEY), model, messages=[{"role": "user", "content": "x"}])
        assert error.value.response.headers["retry-after"] == "1"
    wait_until(lambda: metric(f"http://127.0.0.1:{stack.strict_port}/metrics", "dvd_gateway_requests_in_flight") == 0,
               60, "the hung-up stream is released")
    assert ask(client_for(stack.strict_port, api_key=API_KEY), model, max_tokens=1).choices


def test_dead_vision_server_is_ejected_and_encode_goes_to_the_live_one(stack, model):
    strict = client_for(stack.strict_port, api_key=API_KEY)
    for seed in range(460, 463):  # new images: each needs an Encode
        picture = make_image(64, 64, seed)
        assert ask(strict, model, user("Describe.", picture), max_tokens=1).usage.prompt_tokens_details.image_tokens \
            == 256
    url = f"http://127.0.0.1:{stack.strict_port}/metrics"
    assert metric(url, "dvd_gateway_backend_up", kind="vision", address=f"127.0.0.1:{stack.dead_port}") == 0
    assert metric(url, "dvd_gateway_backend_up", kind="vision", address=f"127.0.0.1:{stack.vision_port}") == 1


def test_non_streamed_client_disconnect_cancels_the_generation(stack, model):
    url = f"http://127.0.0.1:{stack.language_metrics_port}/metrics"
    before = metric(url, "dvd_language_requests_total", outcome="cancelled")
    body = {"model": model, "max_tokens": 4000, "ignore_eos": True, "messages": user("Write a long story.", PICTURE)}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=body, timeout=2)
    wait_until(lambda: metric(url, "dvd_language_requests_total", outcome="cancelled") == before + 1, 60,
               "the language server counts the generation cancelled")
    assert metric(url, "dvd_language_requests_total", outcome="cancelled") == before + 1


def test_a_vision_server_that_comes_up_is_admitted_shares_the_load_and_leaves_without_failures(stack, model,
                                                                                               tmp_path):
    spare = client_for(stack.spare_port)
    metrics_url = f"http://127.0.0.1:{stack.spare_port}/metrics"
    second = f"127.0.0.1:{stack.spare_vision_port}"
    assert ask(spare, model, max_tokens=1).choices  # the second vision server is not there yet: no failure
    assert metric(metrics_url, "dvd_gateway_backend_up", kind="vision", address=second) == 0
    command = [sys.executable, "-m", "dvd.cli", "vision-server", "--model", stack.model, "--port",
               str(stack.spare_vision_port)]
    with Servers({"vision-2": command}, log_dir=tmp_path).start() as second_server:
        second_server.wait_until(lambda: metric(metrics_url, "dvd_gateway_backend_up", kind="vision",
                                                address=second) == 1, 180, "the spare gateway admits it")
        with ThreadPoolExecutor(4) as pool:  # concurrent: least-outstanding spreads them
            replies = list(pool.map(lambda i: ask(spare, model, messages=user("x", make_image(64, 64, 470 + i)),
                                                  max_tokens=2), range(8)))
        assert all(r.usage.prompt_tokens_details.image_tokens == 256 for r in replies)
        assert metric(metrics_url, "dvd_gateway_backend_requests_total", kind="vision", address=second,
                      outcome="ok") >= 1
    for i in range(4):  # gone: nothing fails, whether or not a call reaches it before the gateway sees it down
        assert ask(spare, model, messages=user("x", make_image(64, 64, 480 + i)), max_tokens=1).choices
    # ejected by the first failed call, or else by the next health check (every 0.5 s)
    wait_until(lambda: metric(metrics_url, "dvd_gateway_backend_up", kind="vision", address=second) == 0, 30,
               "the spare gateway marks the stopped vision server down")
