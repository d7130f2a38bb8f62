"""Gateway pieces on their own: the thinking splitter, image checks, SSRF address rules, settings sources, the app
in-process against fake servers, and the chat-completions translation (an OpenAI request as the servers' `Job`,
what is refused and with which message; the language server's responses as chunks and as the folded completion)."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from conftest import data_url, make_image
from gateway.app import create_app
from gateway.chat import chunks, fold, prepare_chat
from gateway.errors import APIError
from gateway.images import ImageFetcher, decode_data_url, image_format
from gateway.jobs import ImageSource, Job
from gateway.pools import LATE_CHECKS_TO_EJECT, VisionPool
from gateway.reasoning import R1_SYSTEM_PROMPT
from gateway.schemas.chat import ChatCompletionRequest
from gateway.settings import GatewaySettings, load_settings
from proto import dvd_pb2, dvd_pb2_grpc


def encoded(fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    make_image(40, 30, 0).save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_image_formats_are_recognised_by_their_bytes(fmt):
    assert image_format(encoded(fmt)) == fmt
    assert Image.open(io.BytesIO(encoded(fmt))).format == fmt


def test_data_urls_that_are_not_images_are_refused():
    import base64

    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    with pytest.raises(APIError, match="image 3: not a JPEG, PNG"):
        decode_data_url(svg, max_bytes=1 << 20, index=3)
    with pytest.raises(APIError, match="larger than the 100-byte limit"):
        decode_data_url("data:image/png;base64," + base64.b64encode(encoded("PNG")).decode(), max_bytes=100, index=0)
    with pytest.raises(APIError, match="holds no bytes"):
        decode_data_url("data:image/png;base64,", max_bytes=100, index=0)


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("172.16.5.5", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
])
def test_only_public_addresses_may_be_fetched_by_default(address, allowed):
    fetcher = ImageFetcher(max_bytes=1, timeout_s=1, max_redirects=0, allowed_networks=[])
    assert fetcher.allowed(address) is allowed


def test_allowed_networks_open_private_addresses():
    fetcher = ImageFetcher(max_bytes=1, timeout_s=1, max_redirects=0, allowed_networks=["10.1.0.0/16", "::1/128"])
    assert fetcher.allowed("10.1.200.3") and fetcher.allowed("::1")
    assert not fetcher.allowed("10.2.0.1") and not fetcher.allowed("127.0.0.1")


def test_a_dns_entry_stands_for_every_address_of_its_name():
    async def run():
        pool = VisionPool(["dns:localhost:50999", "127.0.0.2:50998"])
        assert [b.address for b in pool.backends] == ["127.0.0.2:50998"]
        await pool.resolve()
        addresses = {b.address for b in pool.backends}
        await pool.close()
        return addresses

    addresses = asyncio.run(run())
    assert {"127.0.0.1:50999", "127.0.0.2:50998"} <= addresses


def test_the_vision_pool_names_the_weights_its_healthy_servers_encode_with():
    """Part of every content key: a rollout that mixes two sets of weights keys with both; a server that
    is down does not count."""
    async def run():
        pool = VisionPool(["127.0.0.2:50997", "127.0.0.2:50996", "127.0.0.2:50995"])
        for backend, weights in zip(pool.backends, ("old", "new", "")):  # the third not checked yet
            backend.weights = weights
        mixed = pool.weights
        pool.backends[0].mark_down("test")
        rolled = pool.weights
        await pool.close()
        return mixed, rolled

    assert asyncio.run(run()) == ("new+old", "new")


def test_malformed_dns_entry_fails_at_start():
    with pytest.raises(ValueError, match="dns:NAME:PORT"):
        VisionPool(["dns:no-port"])


def test_settings_come_from_flags_then_env_then_file(tmp_path, monkeypatch):
    (tmp_path / "gateway.toml").write_text('port = 9001\nmax_n = 3\napi_keys = ["k1"]\n'
                                           'vision_servers = ["10.0.0.1:1", "10.0.0.2:1"]\n')
    (tmp_path / "gateway.json").write_text(json.dumps({"max_in_flight": 7}))
    monkeypatch.setenv("DVD_GATEWAY_MAX_N", "5")
    loaded = load_settings(tmp_path / "gateway.toml", port=9002)
    assert (loaded.port, loaded.max_n, loaded.api_keys) == (9002, 5, [SecretStr("k1")])
    assert loaded.vision_servers == ["10.0.0.1:1", "10.0.0.2:1"]
    assert load_settings(tmp_path / "gateway.json").max_in_flight == 7
    (tmp_path / "typo.toml").write_text("max_in_flite = 3\n")
    with pytest.raises(ValueError, match="max_in_flite"):
        load_settings(tmp_path / "typo.toml")
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


class SlowHealth(dvd_pb2_grpc.VisionServiceServicer):
    """A vision server whose Health answers after `delay_s` (a server busy on a loaded host)."""

    delay_s = 0.0

    async def Health(self, request, context):  # noqa: N802
        await asyncio.sleep(self.delay_s)
        return dvd_pb2.HealthResponse(ready=True, model="tiny", weights="w")


def test_a_server_answering_health_checks_late_is_ejected_only_after_three_in_a_row_and_a_gone_one_at_once():
    async def run():
        servicer = SlowHealth()
        server = grpc.aio.server()
        dvd_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = VisionPool([f"127.0.0.1:{port}"])
        backend = pool.backends[0]
        seen = []
        try:
            servicer.delay_s = 1.0
            for _ in range(LATE_CHECKS_TO_EJECT):
                seen.append((await pool.check(timeout_s=0.2), backend.up))
            servicer.delay_s = 0.0
            seen.append((await pool.check(timeout_s=5), backend.up))  # answers in time again: re-admitted
            servicer.delay_s = 1.0
            seen.append((await pool.check(timeout_s=0.2), backend.up))  # the count of late answers starts anew
            await server.stop(None)
            seen.append((await pool.check(timeout_s=5), backend.up))  # gone: refused at once
        finally:
            await server.stop(None)
            await pool.close()
        return seen

    late_but_kept = [(1, True)] * (LATE_CHECKS_TO_EJECT - 1)
    assert asyncio.run(run()) == [*late_but_kept, (0, False), (1, True), (1, True), (0, False)]


class FakeVision(dvd_pb2_grpc.VisionServiceServicer):
    async def Health(self, request, context):  # noqa: N802
        return dvd_pb2.HealthResponse(ready=True, model="tiny", weights="w")


class FakeLanguage(dvd_pb2_grpc.LanguageServiceServicer):
    """A language server that advertises `max_images` and answers every Generate with "ok"."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.image_counts: list[int] = []  # of the Generate calls it got

    async def Health(self, request, context):  # noqa: N802
        return dvd_pb2.HealthResponse(ready=True, model="tiny")

    async def Describe(self, request, context):  # noqa: N802
        return dvd_pb2.ModelDescription(model="/checkpoints/tiny", hidden_size=64, max_model_len=4096,
                                        feature_endpoint="tcp://127.0.0.1:9", max_images_per_request=self.max_images)

    async def Generate(self, request, context):  # noqa: N802
        self.image_counts.append(request.image_count)
        yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages())  # holds them all: nothing to encode
        yield dvd_pb2.GenerateResponse(text="ok", finish_reason="stop",
                                       usage=dvd_pb2.Usage(prompt_tokens=3, completion_tokens=1))


def test_the_gateway_takes_the_image_limit_the_language_server_advertises():
    language = FakeLanguage(max_images=2)
    pictures = [{"type": "image_url", "image_url": {"url": data_url(make_image(16, 16, seed))}} for seed in range(3)]

    def chat(images: int) -> dict:
        return {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": pictures[:images]}]}

    async def run():
        servers = []
        for add, servicer in ((dvd_pb2_grpc.add_VisionServiceServicer_to_server, FakeVision()),
                              (dvd_pb2_grpc.add_LanguageServiceServicer_to_server, language)):
            server = grpc.aio.server()
            add(servicer, server)
            servers.append((server, server.add_insecure_port("127.0.0.1:0")))
            await server.start()
        (_, vision_port), (_, language_port) = servers
        app = create_app(GatewaySettings(vision_servers=[f"127.0.0.1:{vision_port}"],
                                         language_servers=[f"127.0.0.1:{language_port}"]))
        try:
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
                too_many = await client.post("/v1/chat/completions", json=chat(3))
                allowed = await client.post("/v1/chat/completions", json=chat(2))
        finally:
            for server, _ in servers:
                await server.stop(None)
        return too_many, allowed

    too_many, allowed = asyncio.run(run())
    assert too_many.status_code == 400
    assert "3 images in one request; the language server takes at most 2" in too_many.json()["error"]["message"]
    assert allowed.status_code == 200 and allowed.json()["choices"][0]["message"]["content"] == "ok"
    assert language.image_counts == [2]  # the refused request never reached it


# --- the chat-completions translation --------------------------------------------------------------------------

CHAT_SETTINGS = GatewaySettings(max_n=4, max_tiles=6, video_frames=3)
PICTURE = "data:image/png;base64,AAAA"


def chat_request(messages=None, **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="tiny", messages=messages or [{"role": "user", "content": "Hi"}], **fields)


def chat_job(messages=None, **fields) -> Job:
    return prepare_chat(chat_request(messages, **fields), CHAT_SETTINGS, "req-1")


def refused(messages=None, **fields) -> APIError:
    with pytest.raises(APIError) as caught:
        chat_job(messages, **fields)
    assert caught.value.status == 400
    return caught.value


def texts(message: dvd_pb2.ChatMessage) -> list[str | None]:
    """A message's parts: the text of each text part, None for an image."""
    return [None if part.image else part.text for part in message.content]


# --- request ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, param, message", [
    ({"chat_template_kwargs": {"enable_thinking": True, "b": 1, "a": 2}}, "chat_template_kwargs",
     "chat_template_kwargs: only enable_thinking is supported, got ['a', 'b']"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs",
     "chat_template_kwargs.enable_thinking must be true or false"),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs requires logprobs=true"),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options is only allowed when stream is true"),
    ({"n": 5, "temperature": 1.0}, "n", "n=5 is more than the 4 choices this server allows"),
    ({"n": 2, "temperature": 0}, "n", "n > 1 needs sampling: with temperature 0 every choice would be the same"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop", "stop takes up to 16 non-empty strings"),
    ({"stop": ["ok", ""]}, "stop", "stop takes up to 16 non-empty strings"),
    ({"stop": ""}, "stop", "stop takes up to 16 non-empty strings"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format",
     "response_format cannot be combined with a required or named tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}, "response_format": {"type": "json_object"}},
     "response_format", "response_format cannot be combined with a required or named tool_choice"),
])
def test_a_bad_request_is_a_400_naming_the_parameter_and_why(fields, param, message):
    error = refused(**fields)
    assert (error.param, error.message) == (param, message)


def test_sampling_takes_every_given_parameter_and_leaves_the_others_unset():
    sampling = chat_job(max_tokens=7, stop="END", logprobs=True, top_logprobs=3, n=2, temperature=0.5, top_p=0.9,
                   top_k=5, min_p=0.1, seed=11, presence_penalty=0.2, frequency_penalty=0.3,
                   repetition_penalty=1.1, ignore_eos=True, logit_bias={"42": -5}).sampling
    assert (sampling.max_tokens, list(sampling.stop), sampling.logprobs, sampling.top_logprobs, sampling.n) == \
        (7, ["END"], True, 3, 2)
    assert dict(sampling.logit_bias) == {42: -5}
    assert (sampling.temperature, sampling.top_k, sampling.seed, sampling.ignore_eos) == (0.5, 5, 11, True)
    for name, value in (("top_p", 0.9), ("min_p", 0.1), ("presence_penalty", 0.2), ("frequency_penalty", 0.3),
                        ("repetition_penalty", 1.1)):
        assert getattr(sampling, name) == pytest.approx(value), name
    unset = chat_job().sampling
    assert [name for name in ("temperature", "top_p", "seed") if unset.HasField(name)] == []
    assert unset.ignore_eos is False
    assert (unset.max_tokens, list(unset.stop), unset.n, unset.json_object, unset.json_schema) == (0, [], 1, False, "")
    assert (unset.logprobs, unset.top_logprobs) == (False, 0)
    assert chat_job(n=4, temperature=1.0).sampling.n == 4  # as many choices as the server allows
    # sixteen stop strings are allowed; max_completion_tokens wins over the older max_tokens
    assert len(chat_job(stop=[f"s{i}" for i in range(16)]).sampling.stop) == 16
    assert chat_job(max_tokens=7, max_completion_tokens=9).sampling.max_tokens == 9
    greedy = chat_job(temperature=0.0).sampling
    assert (greedy.HasField("temperature"), greedy.temperature) == (True, 0.0)


def test_response_formats_become_the_servers_json_constraints():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert chat_job(response_format={"type": "json_object"}).sampling.json_object
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    constrained = chat_job(response_format=response_format).sampling
    assert (json.loads(constrained.json_schema), constrained.json_object) == (schema, False)
    text = chat_job(response_format={"type": "text"}, tools=[{"type": "function", "function": {"name": "f"}}],
               tool_choice="required")
    assert (text.sampling.json_object, text.sampling.json_schema, text.tools.choice) == (False, "", "required")


def test_tools_and_a_named_choice_reach_the_language_server():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    named = chat_job(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}},
                     parallel_tool_calls=False)
    assert (named.tools.function, named.tools.choice, named.tools.parallel_calls) == ("f", "", False)
    assert chat_job(tools=tools, parallel_tool_calls=True).tools.parallel_calls
    assert json.loads(named.tools.tools_json)[0]["function"]["name"] == "f"
    assert chat_job().tools is None


def test_messages_keep_their_roles_text_reasoning_and_tool_calls():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image_url", "image_url": {"url": PICTURE, "detail": "low"}},
                                     {"type": "image_url", "image_url": {"url": PICTURE}}]},
        {"role": "assistant", "content": None, "reasoning_content": "thought",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {"role": "assistant", "content": "ok", "reasoning": "older field"},
    ]
    made = chat_job(messages)
    assert [m.role for m in made.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert [texts(m) for m in made.messages] == [["Be brief."], ["Look:", None, None], [""], ["done"], ["ok"]]
    assert [(c.id, c.name, c.arguments) for c in made.messages[2].tool_calls] == [("c1", "f", "{}")]
    assert [m.reasoning for m in made.messages] == ["", "", "thought", "", "older field"]
    assert [m.tool_call_id for m in made.messages] == ["", "", "", "c1", ""]
    assert made.sources == [ImageSource(PICTURE, 1), ImageSource(PICTURE, 6)]  # "low" is one tile
    assert (made.request_id, made.model, made.thinking) == ("req-1", "tiny", False)


def test_a_video_is_its_frames_each_an_image_named_in_the_text():
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    default = chat_job([{"role": "user", "content": [video]}])
    assert texts(default.messages[0]) == ["Frame1: ", None, "Frame2: ", None, "Frame3: ", None]
    assert default.sources == [ImageSource("data:video/mp4;base64,AAAA", 1, 3)]
    two = chat_job([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v", "num_frames": 2}}]}])
    assert texts(two.messages[0]) == ["Frame1: ", None, "Frame2: ", None]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "tool_calls belong to assistant messages, not user"),
    ([{"role": "tool", "content": "x"}], "tool messages, and only they, need tool_call_id"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "tool messages, and only they, need tool_call_id"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PICTURE}}]}],
     "images are only accepted in user messages, not system"),
    ([{"role": "developer", "content": [{"type": "image_url", "image_url": {"url": PICTURE}}]}],
     "images are only accepted in user messages, not developer"),
])
def test_misplaced_message_fields_are_refused_naming_them(messages, message):
    error = refused(messages)
    assert (error.param, error.message) == ("messages", message)


def test_thinking_puts_the_model_card_s_prompt_first():
    made = chat_job(chat_template_kwargs={"enable_thinking": True})
    assert made.thinking and [m.role for m in made.messages] == ["system", "user"]
    assert texts(made.messages[0]) == [R1_SYSTEM_PROMPT]
    assert not chat_job(chat_template_kwargs={"enable_thinking": False}).thinking


# --- output -------------------------------------------------------------------------------------------------


def responses(*items: dvd_pb2.GenerateResponse):
    async def stream():
        for item in items:
            yield item
    return stream()


def collect(made: Job, items, logprobs: bool = False) -> list:
    async def run():
        return [c async for c in chunks(made, "tiny", 1234, responses(*items), logprobs=logprobs)]
    return asyncio.run(run())


def folded(made: Job, items, thinking: bool = False, logprobs: bool = False):
    return asyncio.run(fold(chunks(made, "tiny", 1234, responses(*items), logprobs=logprobs), thinking=thinking))


def logprob(token: str, value: float, *top: tuple[str, float]) -> dvd_pb2.TokenLogprob:
    return dvd_pb2.TokenLogprob(token=token, logprob=value,
                                top=[dvd_pb2.TopLogprob(token=t, logprob=v) for t, v in top])


def call(index: int, id: str = "", name: str = "", arguments: str = "") -> dvd_pb2.ToolCallDelta:
    return dvd_pb2.ToolCallDelta(index=index, id=id, name=name, arguments=arguments)


USAGE = dvd_pb2.Usage(prompt_tokens=10, completion_tokens=3, image_tokens=4, cached_tokens=2)


def test_the_chunks_are_a_role_per_choice_then_each_delta_then_the_usage():
    made = chat_job(n=2, temperature=1.0)
    sent = collect(made, [
        dvd_pb2.GenerateResponse(index=1, text="B"),
        dvd_pb2.GenerateResponse(index=0, text=""),  # carries nothing: no chunk
        dvd_pb2.GenerateResponse(index=0, text="A", finish_reason="length"),
        dvd_pb2.GenerateResponse(index=1, reasoning="r", finish_reason="stop", usage=USAGE),
    ])
    assert {(c.id, c.model, c.created) for c in sent} == {("chatcmpl-req-1", "tiny", 1234)}
    assert [[(ch.index, ch.delta.role, ch.delta.content, ch.delta.reasoning_content, ch.finish_reason)
             for ch in c.choices] for c in sent[:-1]] == [
        [(0, "assistant", "", None, None)], [(1, "assistant", "", None, None)],
        [(1, None, "B", None, None)], [(0, None, "A", None, "length")], [(1, None, None, "r", "stop")]]
    assert all(c.usage is None for c in sent[:-1])
    last = sent[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (10, 3, 13)
    details = last.usage.prompt_tokens_details
    assert (details.image_tokens, details.cached_tokens) == (4, 2)


def test_logprobs_are_sent_only_when_asked_with_each_token_s_bytes():
    made = chat_job(logprobs=True, top_logprobs=1)
    items = [dvd_pb2.GenerateResponse(text="é", logprobs=[logprob("é", -0.5, ("é", -0.5), ("e", -1.5))]),
             dvd_pb2.GenerateResponse(text="!", finish_reason="stop", logprobs=[logprob("!", -0.25)])]
    sent = collect(made, items, logprobs=True)
    first = sent[1].choices[0].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("é", -0.5, [195, 169])
    assert [(t.token, t.logprob, t.bytes) for t in first.top_logprobs] == [("é", -0.5, [195, 169]),
                                                                           ("e", -1.5, [101])]
    assert all(ch.logprobs is None for c in collect(made, items, logprobs=False) for ch in c.choices)
    answer = folded(made, items, logprobs=True)
    assert [t.token for t in answer.choices[0].logprobs.content] == ["é", "!"]
    assert folded(made, items, logprobs=False).choices[0].logprobs is None


def test_tool_call_deltas_carry_id_and_type_only_on_a_call_s_first_delta():
    sent = collect(chat_job(), [dvd_pb2.GenerateResponse(tool_calls=[call(0, "c0", "f", ""), call(1, "c1", "g", "{}")]),
                           dvd_pb2.GenerateResponse(tool_calls=[call(0, arguments='{"a":')]),
                           dvd_pb2.GenerateResponse(tool_calls=[call(0, arguments="1}")], finish_reason="tool_calls")])
    deltas = [(d.index, d.id, d.type, d.function.name, d.function.arguments)
              for c in sent for ch in c.choices for d in ch.delta.tool_calls or []]
    assert deltas == [(0, "c0", "function", "f", ""), (1, "c1", "function", "g", "{}"),
                      (0, None, None, None, '{"a":'), (0, None, None, None, "1}")]


def test_the_folded_completion_joins_each_choice_s_deltas():
    made = chat_job(n=2, temperature=1.0)
    answer = folded(made, [
        dvd_pb2.GenerateResponse(index=1, text="Hel", reasoning="hm"),
        dvd_pb2.GenerateResponse(index=0, tool_calls=[call(1, "c1", "g", "{}"), call(0, "c0", "f", '{"a":')]),
        dvd_pb2.GenerateResponse(index=0, tool_calls=[call(0, arguments="1}")], finish_reason="tool_calls"),
        dvd_pb2.GenerateResponse(index=1, text="lo", reasoning=" ok", finish_reason="stop", usage=USAGE),
    ], thinking=True)
    assert (answer.id, answer.model, answer.created, answer.usage.total_tokens) == ("chatcmpl-req-1", "tiny", 1234, 13)
    calls, text = answer.choices
    assert (calls.index, calls.finish_reason, calls.message.content, calls.message.reasoning_content) == \
        (0, "tool_calls", None, "")  # calls and no text: content is null, as OpenAI sends it
    assert [(c.id, c.function.name, c.function.arguments) for c in calls.message.tool_calls] == [
        ("c0", "f", '{"a":1}'), ("c1", "g", "{}")]  # in index order
    assert (text.index, text.finish_reason, text.message.content, text.message.reasoning_content) == \
        (1, "stop", "Hello", "hm ok")
    assert text.message.tool_calls == []
    plain = folded(chat_job(), [dvd_pb2.GenerateResponse(text="x", reasoning="r", finish_reason="stop")])
    assert (plain.choices[0].message.content, plain.choices[0].message.reasoning_content) == ("x", None)
    both = folded(chat_job(), [dvd_pb2.GenerateResponse(text="Sure.", tool_calls=[call(0, "c", "f", "{}")],
                                                   finish_reason="tool_calls")])
    assert both.choices[0].message.content == "Sure." and len(both.choices[0].message.tool_calls) == 1
    unfinished = folded(chat_job(), [dvd_pb2.GenerateResponse(text="x")])  # no finish reason came: null, not ""
    assert unfinished.choices[0].finish_reason is None


def test_each_choice_s_time_per_output_token_is_recorded_for_its_tenant():
    from prometheus_client import REGISTRY

    made = chat_job(n=2, temperature=1.0)
    made.tenant = "tenant-tpot-test"

    def count() -> float:
        return REGISTRY.get_sample_value("dvd_gateway_tpot_seconds_count", {"tenant": "tenant-tpot-test"}) or 0.0

    before = count()
    collect(made, [dvd_pb2.GenerateResponse(index=i, text="a", token_ids=[1]) for i in (0, 1)] +
            [dvd_pb2.GenerateResponse(index=i, text="b", token_ids=[2], finish_reason="stop") for i in (0, 1)])
    assert count() == before + 2
