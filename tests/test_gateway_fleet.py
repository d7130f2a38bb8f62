"""The gateway in front of live servers: a fuzz of its HTTP API, and a fleet that shares load and loses servers.

Two vision and two language servers on the tiny checkpoint, started with the `dvd` CLI as a user would;
two gateways in front of them: `pair` (vision A and language A only), which the fuzz drives, and
`fleet` (all four), which spreads load and then loses vision B and language B mid-run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import data_url, free_port, make_image, metric, png_bytes, sse_lines
from gateway.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from launcher import Servers, http_ready, wait_until

pytestmark = pytest.mark.slow
MODEL = "tiny"  # --served-model-name of both gateways
HOST = "127.0.0.1"


@dataclass
class Server:
    name: str
    port: int
    metrics_port: int
    command: list[str]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"


@dataclass
class Fleet:
    vision: list[Server]
    language: list[Server]
    gateways: dict[str, Server] = field(default_factory=dict)
    launched: Servers | None = None  # every server, started by the fixture

    def url(self, gateway: str) -> str:
        return f"http://{HOST}:{self.gateways[gateway].port}"

    @property
    def servers(self) -> list[Server]:
        return [*self.vision, *self.language, *self.gateways.values()]

    def commands(self) -> dict[str, list[str]]:
        return {server.name: server.command for server in self.servers}


def dvd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvd.cli", *args]


def plan_fleet(model: str) -> Fleet:
    vision = []
    for name in ("vision-a", "vision-b"):
        port, metrics_port = free_port(), free_port()
        vision.append(Server(name, port, metrics_port, dvd(
            "vision-server", "--model", model, "--host", HOST, "--port", str(port),
            "--metrics-port", str(metrics_port))))
    language = []
    for name in ("language-a", "language-b"):
        port, metrics_port = free_port(), free_port()
        language.append(Server(name, port, metrics_port, dvd(
            "language-server", "--model", model, "--host", HOST, "--port", str(port), "--metrics-port",
            str(metrics_port), "--feature-bind", f"tcp://{HOST}:{free_port()}", "--max-model-len", "4096")))
    fleet = Fleet(vision, language)
    # Frequent health checks and a short deadline: a stopped server leaves the pool within a second, and no
    # request can outlive the test. `spread` checks health rarely and waits long for an answer, so that servers
    # paused by a test (SIGSTOP) stay in its pools.
    health = {"fleet": ["--health-interval-s", "1"], "pair": ["--health-interval-s", "1"],
              "spread": ["--health-interval-s", "600"]}
    for name, members in (("fleet", vision + language), ("pair", [vision[0], language[0]]),
                          ("spread", vision + language)):
        port = free_port()
        servers = [arg for s in members for arg in (f"--{s.name.split('-')[0]}-server", s.address)]
        command = dvd("gateway", "--host", HOST, "--port", str(port), "--served-model-name", MODEL, *health[name],
                      "--request-timeout-s", "120", *servers)
        if name == "spread":  # a health check that meets a paused server waits for it
            command = ["env", "DVD_GATEWAY_HEALTH_TIMEOUT_S=120", *command]
        fleet.gateways[name] = Server(name, port, 0, command)
    return fleet


@pytest.fixture(scope="module")
def fleet(tiny_checkpoints, tmp_path_factory):
    fleet = plan_fleet(str(tiny_checkpoints["custom"]))
    fleet.launched = Servers(fleet.commands(), log_dir=tmp_path_factory.mktemp("gateway-fleet-logs"))
    both_see_all = [http_ready(fleet.url("fleet"), health={"vision_servers_up": 2, "language_servers_up": 2}),
                    http_ready(fleet.url("pair"), health={"vision_servers_up": 1, "language_servers_up": 1}),
                    http_ready(fleet.url("spread"), health={"vision_servers_up": 2, "language_servers_up": 2})]
    with fleet.launched.running(lambda: all(ready() for ready in both_see_all),
                                what="both gateways see all of their servers"):
        yield fleet


def assert_openai_error(body: dict, status: int) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, body
    assert isinstance(error["message"], str) and error["message"], body
    return error


def user(text: str, *images: str, detail: str = "auto") -> list[dict]:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url, "detail": detail}} for url in images]
    return [{"role": "user", "content": parts}]


# ---------------------------------------------------------------- fuzz against live servers

PICTURES = [data_url(make_image(16, 16, 0)), data_url(make_image(40, 24, 1))]
BAD_IMAGES = [
    "data:image/png;base64," + base64.b64encode(png_bytes(make_image(16, 16, 2))[:40]).decode(),  # truncated
    "data:image/png;base64,!!!not-base64",
    "data:text/plain;base64,aGVsbG8=",
    "data:,x",
    "ftp://example.com/x.png",
    "",
]
junk = st.recursive(  # any JSON value, for fields that get the wrong type
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@dataclass
class Values:
    """A field's values in range, and values out of range or of the wrong type."""

    valid: st.SearchStrategy | None
    invalid: tuple = ()

    def mixed(self) -> st.SearchStrategy:
        bad = st.one_of(st.sampled_from(self.invalid), junk) if self.invalid else junk
        return bad if self.valid is None else st.one_of(self.valid, self.valid, bad)


def fields(values: dict[str, Values], mixed: bool, max_size: int) -> st.SearchStrategy:
    """A few of `values`' fields, each valid or (with `mixed`) now and then not."""
    names = sorted(name for name, v in values.items() if mixed or v.valid is not None)
    return st.lists(st.sampled_from(names), max_size=max_size, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: values[k].mixed() if mixed else values[k].valid for k in keys}))


def image_part(mixed: bool) -> st.SearchStrategy:
    detail = Values(st.sampled_from(["auto", "low", "high"]), ("medium", "HIGH", 1))
    url = st.sampled_from(PICTURES + BAD_IMAGES) if mixed else st.sampled_from(PICTURES)
    return st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": url}, optional={"detail": detail.mixed() if mixed else detail.valid})})


text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=16)})
odd_part = st.sampled_from([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                            {"type": "image_url", "image_url": PICTURES[0]}, {"type": "text"},
                            {"type": "text", "text": "x", "extra": 1}, {"text": "no type"}])
valid_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "assistant"]),
                                                 "content": st.text(max_size=24)}), max_size=2).flatmap(
    lambda before: st.builds(lambda last: [*before, last], st.fixed_dictionaries({
        "role": st.just("user"),
        "content": st.one_of(st.text(max_size=24), st.lists(st.one_of(text_part, image_part(False)), min_size=1,
                                                            max_size=3))})))
mixed_content = st.one_of(st.text(max_size=24), st.none(), junk, st.lists(
    st.one_of(text_part, image_part(True), image_part(True), odd_part), min_size=1, max_size=3))
mixed_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user"] * 4 + ["system", "developer", "assistant", "tool", "bot"]),
     "content": mixed_content}, optional={"name": Values(st.text(max_size=8), (5,)).mixed()}), max_size=3)
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "string", "enum": ["a", "b"]},
    {"type": "nope"},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 2}}, "required": ["n"]},
    {},
]
response_format = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    st.builds(lambda schema, strict: {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                                             "strict": strict}},
              st.sampled_from(SCHEMAS), st.booleans()),
)
PARAMETERS = {
    "stream": Values(st.booleans(), ("yes", 2)),
    "stream_options": Values(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
                             ({"include_usage": True, "chunk": 1}, "usage")),
    "temperature": Values(st.floats(0, 2), (-0.1, 2.01, 1e308, "hot")),
    "top_p": Values(st.floats(0.01, 1), (0, 1.5, -1)),
    "top_k": Values(st.integers(-1, 64), (-2, 2**31, 2**40)),
    "min_p": Values(st.floats(0, 1), (-0.5, 1.01)),
    "seed": Values(st.integers(-(2**63), 2**63 - 1), (2**63, -(2**63) - 1, 2**80, 1.5)),
    "stop": Values(st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
                   ("", [""], ["x"] * 17, [1, 2])),
    "n": Values(st.integers(1, 3), (0, -1, 9, 2**40)),
    "presence_penalty": Values(st.floats(-2, 2), (-2.5, 3)),
    "frequency_penalty": Values(st.floats(-2, 2), (2.5, -3)),
    "repetition_penalty": Values(st.floats(0.1, 3), (0, -1, 11)),
    "logprobs": Values(st.booleans(), ("true", 3)),
    "top_logprobs": Values(st.integers(0, 20), (-1, 21, 2**40)),
    "response_format": Values(response_format, ("json", {"type": "json_object", "schema": {}}, {"type": "grammar"},
                                                {"type": "json_schema"},
                                                {"type": "json_schema", "json_schema": {"name": "s", "schema": "x"}})),
    "user": Values(st.text(max_size=10), (42,)),
    "chat_template_kwargs": Values(st.sampled_from([{}, {"enable_thinking": True}, {"enable_thinking": False}]),
                                   ({"enable_thinking": "yes"}, {"add_generation_prompt": False}, "think")),
    # unsupported or unknown: always a 400
    "tools": Values(None, ([{"type": "function", "function": {"name": "f"}}],)),
    "logit_bias": Values(None, ({"1": 5},)),
    "frequency": Values(None),
    "metadata": Values(None),
}
# Every body that reaches the servers asks for a few tokens: max_tokens or max_completion_tokens (which wins)
# is small, unless a bad value makes the request a 400 anyway.
BAD_LENGTHS = (0, -1, 2**32, 2**63, 2**70, 1.5, "many", [], {})
valid_lengths = st.one_of(
    st.fixed_dictionaries({"max_tokens": st.integers(1, 4)}),
    st.fixed_dictionaries({"max_completion_tokens": st.integers(1, 4)}),
    st.fixed_dictionaries({"max_tokens": st.sampled_from([1, 2, 10**6]), "max_completion_tokens": st.integers(1, 4)}),
)
mixed_lengths = st.one_of(
    valid_lengths,
    st.fixed_dictionaries({"max_tokens": st.sampled_from(BAD_LENGTHS)}),
    st.fixed_dictionaries({"max_completion_tokens": st.sampled_from(BAD_LENGTHS)}),
    st.fixed_dictionaries({"max_tokens": st.integers(1, 4), "max_completion_tokens": st.sampled_from(BAD_LENGTHS)}),
)


def body(model, messages, lengths, params) -> st.SearchStrategy:
    return st.builds(lambda *parts: {k: v for part in parts for k, v in part.items()},
                     st.fixed_dictionaries({"model": model, "messages": messages}), lengths, params)


OTHER_PARAMETERS = {k: v for k, v in PARAMETERS.items() if k != "stream"}
bodies = st.one_of(
    body(st.just(MODEL), valid_messages, valid_lengths,
         st.tuples(st.fixed_dictionaries({"stream": st.booleans()}), fields(OTHER_PARAMETERS, False, max_size=4)).map(
             lambda both: {**both[0], **both[1]})),
    body(st.just(MODEL), valid_messages, valid_lengths, fields(PARAMETERS, mixed=True, max_size=2)),
    body(st.sampled_from([MODEL] * 4 + ["other", ""]), mixed_messages, mixed_lengths,
         fields(PARAMETERS, mixed=True, max_size=5)),
    st.builds(lambda base, length: {**base, **length},  # structurally wrong bodies
              st.fixed_dictionaries({}, optional={"model": junk, "messages": junk}), mixed_lengths),
    junk.filter(lambda value: not isinstance(value, dict)),
)


def check_reply(reply: httpx.Response, body) -> str:
    """Never a 5xx; errors in OpenAI's shape; successes in the completion or chunk shape. Returns an outcome."""
    assert reply.status_code < 500, (reply.status_code, reply.text[:500], body)
    assert len(reply.headers["x-request-id"]) == 32
    if reply.status_code != 200:
        error = assert_openai_error(reply.json(), reply.status_code)
        assert reply.status_code in (400, 404), (error, body)
        return f"HTTP {reply.status_code}"
    n = ChatCompletionRequest.model_validate(body).n
    if reply.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
        assert all(not e.startswith("data:") for e in events)
        for data in events[:-1]:
            chunk = ChatCompletionChunk.model_validate_json(data)
            assert all(0 <= c.index < n for c in chunk.choices)
        if events[-1] != "[DONE]":  # an error after the headers went out: in-band, as OpenAI does
            error = assert_openai_error(json.loads(events[-1]), json.loads(events[-1])["error"]["code"])
            assert error["code"] < 500, (error, body)
            return f"stream error {error['code']}"
        return "streamed 200"
    completion = ChatCompletion.model_validate_json(reply.content)
    assert [c.index for c in completion.choices] == list(range(n))
    assert completion.usage.completion_tokens <= n * 4
    return "200"


def test_fuzzed_requests_against_live_servers_get_no_5xx_no_hang_and_the_stack_serves_on(fleet):
    url = f"{fleet.url('pair')}/v1/chat/completions"
    outcomes = Counter()
    client = httpx.Client(timeout=httpx.Timeout(60, connect=5))

    hi = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url",
                                                                      "image_url": {"url": PICTURES[0]}}]}]

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bodies, as_text=st.booleans())
    # Values that pass validation but not the proto's field widths: they were a 500.
    @example(body={"model": MODEL, "messages": hi, "max_tokens": 2**32}, as_text=False)
    @example(body={"model": MODEL, "messages": hi, "max_completion_tokens": 2**40, "max_tokens": 1}, as_text=False)
    @example(body={"model": MODEL, "messages": hi, "max_tokens": 1, "top_k": 2**31, "stream": True}, as_text=False)
    # A seed and a prompt (two 7-tile images) longer than one prefill chunk: it killed vLLM's engine on CPU.
    @example(body={"model": MODEL, "messages": user("x", PICTURES[1], PICTURES[1]), "max_tokens": 1, "seed": 7},
             as_text=False)
    def fuzz(body, as_text):
        content = json.dumps(body) if as_text or not isinstance(body, dict) else None
        if content is not None and isinstance(body, dict) and body.get("model") == "":
            content = content[:-1]  # and now and then a body that is not JSON at all
        reply = client.post(url, content=content, json=None if content is not None else body,
                            headers={"content-type": "application/json"})
        outcome = check_reply(reply, body if isinstance(body, dict) else {})
        outcomes[outcome] += 1
        event(outcome)

    try:
        fuzz()
        # The fuzz reached the servers, not only the validation.
        assert outcomes["200"] + outcomes["streamed 200"] >= 5, outcomes
        assert httpx.get(f"{fleet.url('pair')}/health", timeout=10).status_code == 200
        reply = client.post(url, json={"model": MODEL, "max_tokens": 4, "messages": user("Describe.", PICTURES[0])})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 256
        assert reply.json()["usage"]["completion_tokens"] == 4
    finally:
        client.close()
        print(f"fuzz outcomes: {dict(outcomes)}")


# ---------------------------------------------------------------- two of each kind behind one gateway


def chat(url: str, seed: int, max_tokens: int = 4, stream: bool = False) -> dict:
    """Exactly max_tokens tokens: when the random model picks EOS depends on the CPU and on batching."""
    return {"model": MODEL, "max_tokens": max_tokens, "stream": stream, "temperature": 0, "ignore_eos": True,
            "messages": user("Describe this picture.", data_url(make_image(32, 32, seed)))}


def ask_many(url: str, count: int, max_tokens: int = 4, first_seed: int = 0) -> list[httpx.Response]:
    """`count` requests with an image each (seeds from `first_seed`), all sent at once."""
    start = threading.Barrier(count)

    def ask(i: int) -> httpx.Response:
        start.wait(30)
        return httpx.post(f"{url}/v1/chat/completions", json=chat(url, first_seed + i, max_tokens), timeout=120)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(ask, range(count)))


def ok_requests(servers: list[Server], metric_name: str) -> dict[str, float]:
    return {s.name: metric(s.metrics_url, metric_name, outcome="ok") for s in servers}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {name: int(after[name] - before[name]) for name in after}


def outstanding(fleet: Fleet, gateway: str) -> dict[str, float]:
    """The calls each vision and language server has outstanding from `gateway`, as it counts them."""
    return {s.name: metric(f"{fleet.url(gateway)}/metrics", "dvd_gateway_backend_outstanding", address=s.address)
            for s in (*fleet.vision, *fleet.language)}


def test_concurrent_requests_spread_across_both_vision_and_both_language_servers(fleet):
    """20 requests at once, both vision servers paused (SIGSTOP) so that every call is still outstanding when
    the next is placed: least-outstanding placement puts 10 Encode and 10 Generate calls on each server (the
    Generate calls wait for their features). Then the vision servers resume and all 20 are answered."""
    vision_before = ok_requests(fleet.vision, "dvd_vision_requests_total")
    language_before = ok_requests(fleet.language, "dvd_language_requests_total")
    paused = [fleet.launched.processes[s.name].pid for s in fleet.vision]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            replies = pool.submit(ask_many, fleet.url("spread"), 20, 8, 1000)  # images no server holds yet
            placed = {s.name: 10 for s in (*fleet.vision, *fleet.language)}
            wait_until(lambda: outstanding(fleet, "spread") == placed, 120,
                       lambda: f"10 calls placed on each server: {outstanding(fleet, 'spread')}")
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
            replies = replies.result(300)
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    assert [r.status_code for r in replies] == [200] * 20, [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 256 for r in replies)
    vision = delta(ok_requests(fleet.vision, "dvd_vision_requests_total"), vision_before)
    language = delta(ok_requests(fleet.language, "dvd_language_requests_total"), language_before)
    assert vision == {s.name: 10 for s in fleet.vision} and language == {s.name: 10 for s in fleet.language}
    # The other gateways ejected the paused servers; the next tests need them back.
    wait_until(http_ready(fleet.url("fleet"), health={"vision_servers_up": 2, "language_servers_up": 2}), 60,
               "the fleet gateway re-admits both vision servers")


def test_later_turns_of_chats_return_to_the_language_server_holding_their_images(fleet):
    """Four chats at once spread over both language servers; their second turns, also at once, each find
    their image's features where the first turn left them: no Encode, no features on the wire."""
    url = fleet.url("fleet")
    hits_before = sum(metric(s.metrics_url, "dvd_language_feature_cache_images_total", result="hit")
                      for s in fleet.language)
    encodes_before = sum(ok_requests(fleet.vision, "dvd_vision_requests_total").values())
    language_before = ok_requests(fleet.language, "dvd_language_requests_total")
    first_turns = [chat(url, 2000 + i, max_tokens=8) for i in range(4)]

    def ask_all(bodies: list[dict]) -> list[httpx.Response]:
        start = threading.Barrier(len(bodies))

        def ask(body: dict) -> httpx.Response:
            start.wait(30)
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(ask, bodies))

    replies = ask_all(first_turns)
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    follow_up = {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}
    answers = [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]} for r in replies]
    second_turns = [{**body, "messages": [*body["messages"], answer, follow_up]}
                    for body, answer in zip(first_turns, answers)]
    replies = ask_all(second_turns)
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    language = delta(ok_requests(fleet.language, "dvd_language_requests_total"), language_before)
    assert min(language.values()) >= 2, language  # both language servers served chats
    assert sum(ok_requests(fleet.vision, "dvd_vision_requests_total").values()) - encodes_before == 4
    hits = sum(metric(s.metrics_url, "dvd_language_feature_cache_images_total", result="hit") for s in fleet.language)
    assert hits - hits_before == 4


@dataclass
class Stream:
    """One streamed request, as its client saw it."""

    index: int
    request_id: str | None = None
    status: int | None = None
    tokens: int = 0  # content chunks received
    done: bool = False  # [DONE] arrived
    error: dict | None = None  # OpenAI error JSON, in the body or in-band
    exception: str | None = None  # anything else: a broken connection, a timeout, garbage
    ended_at: float | None = None

    def run(self, url: str, max_tokens: int) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat(url, 100 + self.index, max_tokens, True),
                              timeout=httpx.Timeout(120, connect=5)) as reply:
                self.request_id, self.status = reply.headers.get("x-request-id"), reply.status_code
                if reply.status_code != 200:
                    self.error = assert_openai_error(json.loads(reply.read()), reply.status_code)
                    return
                for line in sse_lines(reply):
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        self.done = True
                        return
                    payload = json.loads(data)
                    if "error" in payload:
                        self.error = assert_openai_error(payload, payload["error"]["code"])
                        return
                    self.tokens += sum(bool(c["delta"].get("content")) for c in payload["choices"])
                self.exception = "the stream ended without [DONE] or an error"
        except Exception as exc:  # noqa: BLE001 (recorded; the test fails on it)
            self.exception = repr(exc)
        finally:
            self.ended_at = time.monotonic()


def retries(fleet: Fleet) -> Counter:
    """Calls the fleet gateway moved to another server after theirs became unreachable, by kind."""
    lines = fleet.launched.log("fleet").splitlines()
    return Counter("Encode" if "retrying Encode" in line else "Generate" for line in lines
                   if "unavailable; retrying" in line)


BIG = [data_url(make_image(896, 672, 200 + i)) for i in range(6)]  # 13 tiles each: Encode takes a while


def test_killing_a_vision_and_a_language_server_mid_run_costs_only_the_requests_on_them(fleet):
    """SIGKILL language server B while 12 streams generate, then vision server B while 6 more requests wait
    for their Encode calls; then the survivors serve everything. The streams are long enough to be under way
    at the kill at any speed; both vision servers are stopped (SIGSTOP) while the 6 requests arrive, so
    least-outstanding leaves Encode calls waiting on each until the kill (vision A then resumes)."""
    url = fleet.url("fleet")
    vision_a, vision_b, language_b = fleet.vision[0], fleet.vision[1], fleet.language[1]
    streams = [Stream(i) for i in range(12)]
    threads = [threading.Thread(target=s.run, args=(url, 2000), daemon=True) for s in streams]
    burst = ThreadPoolExecutor(len(BIG))
    retries_before = retries(fleet)
    vision_pids = [fleet.launched.processes[server.name].pid for server in fleet.vision]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: all(s.tokens >= 2 or s.ended_at for s in streams), 120,
                   lambda: f"every stream generates: {[vars(s) for s in streams]}")
        outstanding = {s.name: outstanding_on(url, s) for s in fleet.language}
        killed_at = time.monotonic()
        fleet.launched.kill(language_b.name)  # with its children (vLLM's engine): a crashed container
        for pid in vision_pids:
            os.killpg(pid, signal.SIGSTOP)
        replies = [burst.submit(ask_about, url, image) for image in BIG]
        wait_until(lambda: outstanding_on(url, vision_a) >= 1 and outstanding_on(url, vision_b) >= 1, 60,
                   "Encode calls wait on both vision servers")
        outstanding |= {s.name: outstanding_on(url, s) for s in fleet.vision}
        fleet.launched.kill(vision_b.name)
        os.killpg(vision_pids[0], signal.SIGCONT)
        replies = [r.result(150) for r in replies]
    finally:
        for pid in vision_pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)
        burst.shutdown(wait=False, cancel_futures=True)
        for thread in threads:
            thread.join(150)
    assert not any(t.is_alive() for t in threads), "a request hung after the kill"
    on_killed = int(outstanding[language_b.name] + outstanding[vision_b.name])
    failed_streams = [s for s in streams if not s.done]
    failed_big = [r for r in replies if r.status_code != 200]
    print(f"in flight at the kill: {outstanding}; 12 streams: {len(failed_streams)} failed "
          f"({sorted({s.error['message'] for s in failed_streams if s.error})}); 6 being encoded: "
          f"{len(failed_big)} failed ({[r.json() for r in failed_big]}); "
          f"calls retried on a survivor: {retries(fleet) - retries_before}")
    assert outstanding[language_b.name] >= 1 and outstanding[vision_b.name] >= 1  # both kills hit live work
    assert not [s.exception for s in streams if s.exception], [vars(s) for s in streams if s.exception]
    assert len(failed_streams) + len(failed_big) <= on_killed, (outstanding, [vars(s) for s in failed_streams])
    check_failures_name_the_killed_servers(failed_streams, replies, (language_b.address, vision_b.address),
                                           killed_at)
    check_the_survivors_serve_everything(fleet, url, killed=(vision_b, language_b))


def ask_about(url: str, image: str) -> httpx.Response:
    """A chat completion about the image at data URL `image`."""
    body = {**chat(url, 0), "messages": user("Describe this picture.", image)}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def outstanding_on(url: str, server: Server) -> float:
    """Calls the gateway at `url` has outstanding on `server`."""
    return metric(f"{url}/metrics", "dvd_gateway_backend_outstanding", address=server.address)


def check_failures_name_the_killed_servers(failed_streams: list[Stream], big_replies: list[httpx.Response],
                                           killed: tuple[str, ...], killed_at: float) -> None:
    """Each failed request got a clear OpenAI error (in-band for a stream, which failed mid-way after the
    kill) naming a killed server (of the addresses `killed`); each 13-tile request that succeeded was whole."""
    for stream in failed_streams:
        assert stream.status == 200 and stream.error["code"] == 503, vars(stream)
        assert any(address in stream.error["message"] for address in killed), vars(stream)
        assert stream.tokens >= 2 and stream.ended_at >= killed_at
    for reply in big_replies:
        if reply.status_code == 200:
            assert reply.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 13 * 256
            continue
        error = assert_openai_error(reply.json(), reply.status_code)
        assert reply.status_code == 503 and any(address in error["message"] for address in killed), error


def check_the_survivors_serve_everything(fleet, url: str, killed) -> None:
    """New requests all succeed, on the first vision and language servers; the `killed` ones stay ejected."""
    vision_before = ok_requests(fleet.vision[:1], "dvd_vision_requests_total")
    language_before = ok_requests(fleet.language[:1], "dvd_language_requests_total")
    replies = ask_many(url, 8)
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies if r.status_code != 200]
    assert delta(ok_requests(fleet.vision[:1], "dvd_vision_requests_total"), vision_before) == {"vision-a": 8}
    assert delta(ok_requests(fleet.language[:1], "dvd_language_requests_total"), language_before) == \
        {"language-a": 8}
    for server in killed:
        assert metric(f"{url}/metrics", "dvd_gateway_backend_up", address=server.address) == 0
