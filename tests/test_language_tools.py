"""Tool calling and thinking in the language server: the prompt (tools block, tool calls, tool results), the
output split by vLLM's parsers (content, reasoning, tool-call deltas), and a real server with the random tiny
model, whose calls under a forced tool choice must always be schema-valid."""

from __future__ import annotations

import asyncio
import json

import grpc
import jsonschema
import pytest

from contracts.grpc_secret import client_interceptors
from language_server.output import OutputParsers
from language_server.prompt import ChatRenderer, load_chat_template, messages_to_dicts
from proto import dvd_pb2, dvd_pb2_grpc

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def text(role: str, content: str, **fields) -> dvd_pb2.ChatMessage:
    return dvd_pb2.ChatMessage(role=role, content=[dvd_pb2.ContentPart(text=content)], **fields)


HISTORY = [
    text("system", "Be brief."),
    text("user", "Weather in Paris for 3 days, and the time?"),
    dvd_pb2.ChatMessage(role="assistant", tool_calls=[
        dvd_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris", "days": 3}'),
        dvd_pb2.ToolCall(id="call_2", name="get_time", arguments="")]),
    text("tool", "sunny", tool_call_id="call_1"),
    text("tool", "12:00", tool_call_id="call_2"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(tiny_checkpoints["custom"]), trust_remote_code=True)


@pytest.fixture
def parsers(tokenizer) -> OutputParsers:
    """Made for each test (a fraction of a millisecond), so that `make mutation` runs every test that uses
    parsers against an edit in their construction, not only the first."""
    return OutputParsers(tokenizer, "hermes", "deepseek_r1")


# --- prompt ------------------------------------------------------------------------------------------------


def tool_dicts(parsers: OutputParsers) -> list[dict]:
    return parsers.tools_request(dvd_pb2.Tools(tools_json=json.dumps(TOOLS))).tool_dicts


def test_tools_render_as_qwen3_renders_them(tiny_checkpoints, parsers):
    renderer = ChatRenderer(load_chat_template(tiny_checkpoints["custom"]))
    prompt = renderer.render(messages_to_dicts(HISTORY), tools=tool_dicts(parsers))
    first_tool = json.dumps({"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                                               "parameters": PARAMETERS}}, ensure_ascii=False)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to "
                             "assist with the user query.\n\nYou are provided with function signatures within "
                             f"<tools></tools> XML tags:\n<tools>\n{first_tool}\n")
    assert prompt.endswith(
        '</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris for 3 days, and the time?<|im_end|>\n'
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n12:00\n</tool_response>'
        '<|im_end|>\n<|im_start|>assistant\n')
    assert prompt.count("<|im_start|>system") == 1


@pytest.mark.parametrize("fmt", ["custom", "hf"])
@pytest.mark.parametrize("with_tools", [True, False])
def test_prompt_equals_transformers_apply_chat_template(tiny_checkpoints, parsers, fmt, with_tools):
    """vLLM renders HF-tokenizer chats with transformers' `apply_chat_template`: same template, same prompt."""
    from transformers import AutoTokenizer

    path = tiny_checkpoints[fmt]
    messages = messages_to_dicts(HISTORY)
    tools = tool_dicts(parsers) if with_tools else None
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ChatRenderer(load_chat_template(path)).render(messages, tools=tools) == expected


def test_messages_without_tools_render_as_before(tiny_checkpoints):
    prompt = ChatRenderer(load_chat_template(tiny_checkpoints["custom"])).render(
        messages_to_dicts([text("system", "S"), text("user", "U"), text("assistant", "A"), text("user", "V")]))
    assert prompt == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA"
                      "<|im_end|>\n<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n")


def test_bad_tool_arguments_in_the_history_become_an_empty_object():
    message = dvd_pb2.ChatMessage(role="assistant", tool_calls=[dvd_pb2.ToolCall(name="f", arguments="{oops"),
                                                                dvd_pb2.ToolCall(name="g", arguments="[1]")])
    calls = messages_to_dicts([message])[0]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{}, {}]


@pytest.mark.parametrize("tools, message", [
    (dvd_pb2.Tools(tools_json="{"), "not valid JSON"),
    (dvd_pb2.Tools(tools_json="{}"), "^tools_json must be a JSON array of tools$"),
    (dvd_pb2.Tools(tools_json=json.dumps(TOOLS), choice="sometimes"),
     "^tool choice 'sometimes' is not one of auto, none, required$"),
    (dvd_pb2.Tools(tools_json=json.dumps(TOOLS), function="nope"), "nope"),
    (dvd_pb2.Tools(tools_json=json.dumps([{"type": "function"}])), "invalid tools"),
])
def test_bad_tools_are_refused_with_a_clear_message(parsers, tools, message):
    with pytest.raises(ValueError, match=message):
        parsers.tools_request(tools)


def test_unknown_parser_names_fail_with_the_registered_ones():
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    with pytest.raises(ValueError, match="unknown tool call parser 'nope'.*hermes") as tool:
        OutputParsers.check_names("nope", "deepseek_r1")
    assert str(tool.value).split("; vLLM has: ")[1].split(", ") == sorted(ToolParserManager.list_registered())
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'.*deepseek_r1") as reasoning:
        OutputParsers.check_names("hermes", "nope")
    assert str(reasoning.value).split("; vLLM has: ")[1].split(", ") == sorted(
        ReasoningParserManager.list_registered())


def test_forced_choices_get_vllms_schema_and_hermes_keeps_special_tokens(parsers):
    required = parsers.tools_request(dvd_pb2.Tools(tools_json=json.dumps(TOOLS), choice="required"))
    assert json.loads(required.json_schema)["maxItems"] == 1  # parallel_calls false: at most one call
    assert not required.skip_special_tokens
    named = parsers.tools_request(dvd_pb2.Tools(tools_json=json.dumps(TOOLS), function="get_weather"))
    assert json.loads(named.json_schema) == PARAMETERS
    assert parsers.tools_request(dvd_pb2.Tools(tools_json=json.dumps(TOOLS))).json_schema is None
    assert parsers.tools_request(dvd_pb2.Tools(tools_json=json.dumps(TOOLS), choice="none")).skip_special_tokens


# --- output ------------------------------------------------------------------------------------------------


def add_call_deltas(calls: dict[int, dict], deltas) -> None:
    """`ToolCallDelta`s joined into whole calls by index: ids, names and arguments concatenated."""
    for delta in deltas:
        whole = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
        for key in whole:
            whole[key] += getattr(delta, key)


def run(parsers, tokenizer, output: str, tools: dvd_pb2.Tools | None = None, thinking: bool = False,
        step: int = 1, finish: str = "stop") -> dict:
    """`output`'s tokens fed `step` at a time to one choice's parser, the engine ending it with `finish`: the
    deltas joined, the pieces, and what a client held after each step."""
    chat_request = parsers.tools_request(tools).chat_request if tools else parsers.chat_request(None)
    parser = parsers.choice_parser(chat_request, thinking)
    ids = tokenizer.encode(output, add_special_tokens=False)
    joined = {"content": "", "reasoning": "", "calls": {}, "pieces": [], "so_far": {}}
    for start in range(0, len(ids), step):
        before = tokenizer.decode(ids[:start], skip_special_tokens=False)
        delta = tokenizer.decode(ids[:start + step], skip_special_tokens=False)[len(before):]
        piece = parser.feed(delta, ids[start:start + step], finished=start + step >= len(ids))
        joined["pieces"].append(piece)
        joined["content"] += piece.content
        joined["reasoning"] += piece.reasoning
        add_call_deltas(joined["calls"], piece.tool_calls)
        # what a client holds after this step, by the count of tokens generated (ids as "was one sent")
        joined["so_far"][min(start + step, len(ids))] = (
            joined["content"], joined["reasoning"],
            [(c["name"], c["arguments"], bool(c["id"])) for c in joined["calls"].values()])
    joined["finish_reason"] = parser.finish_reason(finish)
    return joined


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
AUTO = dvd_pb2.Tools(tools_json=json.dumps(TOOLS), parallel_calls=True)


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_hermes_call_split_across_deltas(parsers, tokenizer, step):
    out = run(parsers, tokenizer, "Let me look." + CALL, AUTO, step=step)
    assert out["content"] == "Let me look."
    [call] = out["calls"].values()
    assert call["name"] == "get_weather" and call["id"].startswith("chatcmpl-tool-")
    assert json.loads(call["arguments"]) == {"city": "Paris", "days": 3}
    assert out["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_reasoning_then_a_tool_call(parsers, tokenizer, step):
    out = run(parsers, tokenizer, "<think>Paris, 3 days.</think>\n\n" + CALL + "\n" + CALL.replace("3", "4"),
              AUTO, thinking=True, step=step)
    assert out["reasoning"] == "Paris, 3 days."
    assert out["content"].strip() == ""
    assert [json.loads(c["arguments"])["days"] for c in out["calls"].values()] == [3, 4]


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_cut_off_reasoning_is_all_reasoning_and_the_think_tag_is_dropped(parsers, tokenizer, step):
    assert run(parsers, tokenizer, "<think>Still thinking about it", thinking=True, step=step)["reasoning"] == \
        "Still thinking about it"
    out = run(parsers, tokenizer, "No tag here</think>\n\nAnswer.", thinking=True, step=step)
    assert (out["reasoning"], out["content"]) == ("No tag here", "\n\nAnswer.")


def test_text_held_back_as_a_possible_tag_is_flushed_at_the_end(parsers, tokenizer):
    out = run(parsers, tokenizer, "Hello <tool", AUTO)
    assert (out["content"], out["reasoning"], out["calls"], out["finish_reason"]) == ("Hello <tool", "", {}, "stop")


STREAMED = [
    ("<think>Paris, 3 days.</think>\n\n" + CALL, AUTO, True),
    ("<think>a</think>b</think>c", None, True),  # a marker twice in one step
    ("<think>x<think>y</think>z", None, True),
    ("No tag</think>\n\nAnswer.", None, True),
    ("Hi." + CALL + "\n" + CALL.replace("3", "4"), AUTO, False),
]


@pytest.mark.parametrize("step", [2, 3, 5])
@pytest.mark.parametrize("output, tools, thinking", STREAMED)
def test_steps_of_several_tokens_stream_what_one_token_steps_do(parsers, tokenizer, output, tools, thinking, step):
    """The engine merges steps under load: after each merged step a client holds exactly what it held at the
    same token count when every step was one token (vLLM's parsers' own pace), not only at the end."""
    one = run(parsers, tokenizer, output, tools, thinking, step=1)["so_far"]
    merged = run(parsers, tokenizer, output, tools, thinking, step=step)["so_far"]
    assert len(merged) > 1
    for tokens, held in merged.items():
        assert held == one[tokens], tokens


def test_content_reasoning_and_calls_stream_before_the_end(parsers, tokenizer):
    """What is parsed goes out as it is generated: the flush at the end adds nothing here."""
    out = run(parsers, tokenizer, "<think>Paris, 3 days.</think>\n\nLet me look." + CALL, AUTO, thinking=True)
    *streamed, last = out["pieces"]
    assert "".join(p.reasoning for p in streamed) == "Paris, 3 days."
    assert "".join(p.content for p in streamed) == "\n\nLet me look."
    arguments = [d.arguments for p in streamed for d in p.tool_calls if d.arguments]
    assert len(arguments) > 3 and json.loads("".join(arguments)) == {"city": "Paris", "days": 3}
    assert (last.content, last.reasoning) == ("", "")


def test_each_call_s_id_and_name_come_once_in_its_first_delta(parsers, tokenizer):
    out = run(parsers, tokenizer, CALL + "\n" + CALL.replace("3", "4"), AUTO, step=3)
    deltas = [d for p in out["pieces"] for d in p.tool_calls]
    ids = []
    for index in (0, 1):
        first, *rest = [d for d in deltas if d.index == index]
        assert first.name == "get_weather" and first.id.startswith("chatcmpl-tool-")
        assert rest and all((d.id, d.name) == ("", "") and d.arguments for d in rest)
        ids.append(first.id)
    assert ids[0] != ids[1]


def test_a_call_cut_off_by_max_tokens_streams_as_vllm_streams_it(parsers, tokenizer):
    """Cut off inside its arguments: the call as far as it streamed, and none of its markup as content (the
    non-streaming parse of the whole text, which gives it back as raw text, does not overrule the stream)."""
    cut = CALL[:CALL.index('"days"') + 3]
    out = run(parsers, tokenizer, "Sure." + cut, AUTO, finish="length")
    assert (out["content"], out["reasoning"], out["finish_reason"]) == ("Sure.", "", "length")
    [call] = out["calls"].values()
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city": "Paris", "da')


def test_choice_none_leaves_markup_as_content(parsers, tokenizer):
    tools = dvd_pb2.Tools(tools_json=json.dumps(TOOLS), choice="none")
    out = run(parsers, tokenizer, CALL, tools)
    assert (out["content"], out["calls"], out["finish_reason"]) == (CALL, {}, "stop")
    # it does not force a call, so thinking is still split off
    thought = run(parsers, tokenizer, "<think>no tools</think>" + CALL, tools, thinking=True)
    assert (thought["reasoning"], thought["content"], thought["calls"]) == ("no tools", CALL, {})


def test_without_parallel_calls_only_the_first_is_kept(parsers, tokenizer):
    out = run(parsers, tokenizer, CALL + "\n" + CALL, dvd_pb2.Tools(tools_json=json.dumps(TOOLS)))
    assert list(out["calls"]) == [0]


def test_forced_choices_become_calls(parsers, tokenizer):
    required = run(parsers, tokenizer, '[{"name":"get_time","parameters":{}}]',
                   dvd_pb2.Tools(tools_json=json.dumps(TOOLS), choice="required"), thinking=True)
    assert [(c["name"], c["arguments"]) for c in required["calls"].values()] == [("get_time", "{}")]
    assert (required["content"], required["finish_reason"]) == ("", "tool_calls")
    named = run(parsers, tokenizer, '{"city":"Oslo","days":1}',
                dvd_pb2.Tools(tools_json=json.dumps(TOOLS), function="get_weather"))
    assert [(c["name"], c["arguments"]) for c in named["calls"].values()] == [("get_weather",
                                                                             '{"city":"Oslo","days":1}')]
    assert named["finish_reason"] == "stop"  # as vLLM (and OpenAI) for a named choice


class ScriptedParser:
    """vLLM's `Parser` interface with a scripted stream (one DeltaMessage or None per delta) and a scripted parse
    of the whole text: for the merge rules of `ChoiceParser`, whatever a given vLLM parser happens to stream."""

    reasoning_parser = None

    def __init__(self, stream, whole):
        self.stream, self.whole = list(stream), whole

    def parse_delta(self, text, token_ids, request, prompt_token_ids, finished):
        return self.stream.pop(0)

    def parse(self, text, request, enable_auto_tools, model_output_token_ids):
        return self.whole


def scripted(parsers, stream, whole, tools=AUTO):
    from language_server.output import ChoiceParser

    chat_request = parsers.tools_request(tools).chat_request
    parser = ChoiceParser(lambda: ScriptedParser(stream, whole), chat_request)
    pieces = [parser.feed(f"t{i}", [i], finished=i == len(stream) - 1) for i in range(len(stream))]
    calls: dict[int, dict] = {}
    for piece in pieces:
        add_call_deltas(calls, piece.tool_calls)
    return pieces, calls, parser


def call_delta(index, name=None, arguments=None, id=None):
    from vllm.entrypoints.generate.base.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall

    return DeltaMessage(tool_calls=[DeltaToolCall(index=index, id=id, function=DeltaFunctionCall(
        name=name, arguments=arguments))])


def test_the_end_adds_the_arguments_the_stream_stopped_short_of_and_the_calls_it_never_showed(parsers):
    from vllm.entrypoints.generate.base.protocol import DeltaMessage, FunctionCall

    stream = [DeltaMessage(content="Hi"), call_delta(0, "get_weather", id="call_a"), call_delta(0, arguments='{"ci'),
              call_delta(0, arguments='ty":'), None]
    whole = ("", "Hi there", [FunctionCall(id="call_a", name="get_weather", arguments='{"city":"Oslo"}'),
                              FunctionCall(id="call_b", name="get_time", arguments="{}")])
    pieces, calls, parser = scripted(parsers, stream, whole)
    assert "".join(p.content for p in pieces) == "Hi there" and pieces[-1].content == " there"
    assert calls == {0: {"id": "call_a", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
                     1: {"id": "call_b", "name": "get_time", "arguments": "{}"}}
    assert [(d.index, d.id, d.name, d.arguments) for d in pieces[-1].tool_calls] == [
        (0, "", "", '"Oslo"}'), (1, "call_b", "get_time", "{}")]
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"


def test_the_end_makes_an_id_for_a_call_the_parser_gave_none_and_never_renames_a_call(parsers):
    from vllm.entrypoints.generate.base.protocol import FunctionCall

    stream = [call_delta(0, "get_weather"), call_delta(0, arguments='{"a":1}'), None]
    # the whole text's parse disagrees on call 0 (another name, other arguments): what was streamed stands
    whole = (None, None, [FunctionCall(name="get_time", arguments='{"b":2}'), FunctionCall(name="get_time",
                                                                                           arguments="")])
    pieces, calls, _ = scripted(parsers, stream, whole)
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == '{"a":1}'
    assert calls[0]["id"].startswith("chatcmpl-tool-") and calls[1]["id"].startswith("chatcmpl-tool-")
    assert (calls[1]["name"], calls[1]["arguments"]) == ("get_time", "")
    assert calls[0]["id"] != calls[1]["id"]
    # other arguments for the same name: not a continuation, so nothing is added
    pieces, calls, _ = scripted(parsers, [call_delta(0, "get_weather", id="c"), call_delta(0, arguments='{"a":1'),
                                          None], (None, None, [FunctionCall(name="get_weather", arguments='{"b":2}')]))
    assert calls == {0: {"id": "c", "name": "get_weather", "arguments": '{"a":1'}}
    # a call with no arguments at all: the end adds none
    _, calls, _ = scripted(parsers, [call_delta(0, "get_time", id="t"), None],
                           (None, None, [FunctionCall(name="get_time", arguments="")]))
    assert calls == {0: {"id": "t", "name": "get_time", "arguments": ""}}


def test_a_call_s_id_and_name_go_once_whatever_order_the_parser_gives_them_in(parsers):
    """Arguments before the name, the name repeated, a delta with no function part: one id and one name per
    call, on the delta that first names it; the arguments in the order they came."""
    from vllm.entrypoints.generate.base.protocol import DeltaMessage, DeltaToolCall

    stream = [call_delta(0, arguments='{"a"'), call_delta(0, "f", id="c"), call_delta(0, "f", id="c"),
              DeltaMessage(tool_calls=[DeltaToolCall(index=0, id="c")]), call_delta(0, arguments=":1}"), None]
    pieces, calls, _ = scripted(parsers, stream, (None, None, None))
    deltas = [(d.id, d.name, d.arguments) for p in pieces for d in p.tool_calls]
    assert deltas == [("", "", '{"a"'), ("c", "f", ""), ("", "", ":1}")]
    assert calls == {0: {"id": "c", "name": "f", "arguments": '{"a":1}'}}


def test_where_the_whole_text_s_parse_disagrees_with_the_stream_nothing_is_added(parsers):
    from vllm.entrypoints.generate.base.protocol import DeltaMessage

    stream = [DeltaMessage(content="Hi", reasoning="hm"), None]
    pieces, calls, _ = scripted(parsers, stream, ("other thoughts", "Hello there", []))
    assert [(p.content, p.reasoning) for p in pieces] == [("Hi", "hm"), ("", "")] and calls == {}


def test_without_parallel_calls_the_end_adds_no_second_call(parsers):
    from vllm.entrypoints.generate.base.protocol import FunctionCall

    whole = (None, None, [FunctionCall(name="get_weather", arguments="{}"), FunctionCall(name="get_time",
                                                                                          arguments="{}")])
    _, calls, _ = scripted(parsers, [None, None], whole, tools=dvd_pb2.Tools(tools_json=json.dumps(TOOLS)))
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"


def generate_responses(tokenizer, output: str, index: int, step: int = 4) -> list[tuple[dvd_pb2.GenerateResponse,
                                                                                      list[int]]]:
    ids = tokenizer.encode(output, add_special_tokens=False)
    responses = []
    for start in range(0, len(ids), step):
        before = tokenizer.decode(ids[:start], skip_special_tokens=False)
        text = tokenizer.decode(ids[:start + step], skip_special_tokens=False)[len(before):]
        last = start + step >= len(ids)
        responses.append((dvd_pb2.GenerateResponse(index=index, text=text, finish_reason="stop" if last else ""),
                          ids[start:start + step]))
    return responses


def test_choices_split_each_choice_s_deltas_with_its_own_parser_in_place(parsers, tokenizer):
    """Two choices whose deltas interleave, as `n=2` streams them: each keeps its own parser state."""
    choices = parsers.choices(parsers.tools_request(AUTO), enable_thinking=True)
    first = generate_responses(tokenizer, "<think>hm</think>" + CALL, 0)
    second = generate_responses(tokenizer, "<think>no</think>Plain answer.", 1)
    for response, ids in [r for pair in zip(first, second) for r in pair] + first[len(second):] + \
            second[len(first):]:
        choices.split(response, ids)
    joined = {}
    for index, responses in enumerate((first, second)):
        calls: dict[int, dict] = {}
        for response, _ in responses:
            add_call_deltas(calls, response.tool_calls)
        joined[index] = ("".join(r.text for r, _ in responses), "".join(r.reasoning for r, _ in responses),
                         {i: (c["name"], json.loads(c["arguments"])) for i, c in calls.items()},
                         responses[-1][0].finish_reason)
    assert joined[0] == ("", "hm", {0: ("get_weather", {"city": "Paris", "days": 3})}, "tool_calls")
    assert joined[1] == ("Plain answer.", "no", {}, "stop")
    assert all(not r.finish_reason for r, _ in first[:-1] + second[:-1])


def test_a_choice_s_last_response_flushes_what_its_parser_held_back(parsers, tokenizer):
    choices = parsers.choices(parsers.tools_request(AUTO), enable_thinking=False)
    sent = generate_responses(tokenizer, "Hello <tool", 0, step=1)
    for response, ids in sent:
        choices.split(response, ids)
    assert "".join(r.text for r, _ in sent) == "Hello <tool" and sent[-1][0].text.endswith("<tool")


def test_choices_are_parsed_only_when_tools_or_thinking_ask_for_it(parsers):
    assert parsers.choices(None, enable_thinking=False) is None
    assert parsers.choices(None, enable_thinking=True) is not None
    assert parsers.choices(parsers.tools_request(AUTO), enable_thinking=False) is not None


# --- a real server -------------------------------------------------------------------------------------------


@pytest.fixture
def language_server(hardened_stack):
    """The reliability modules' stack (tests/hardened.py): its language server, called as the gateway calls it,
    with the internal secret."""
    return hardened_stack


def generate(stack, messages, tools: dvd_pb2.Tools | None = None, **sampling) -> dict[int, dict]:
    """One Generate call; per choice, its joined content, reasoning, tool calls, token ids and finish reason."""

    async def call():
        request = dvd_pb2.GenerateRequest(request_id=f"tools-{id(messages)}-{sorted(sampling.items())}",
                                          messages=messages, sampling=dvd_pb2.SamplingParams(**sampling))
        if tools is not None:
            request.tools.CopyFrom(tools)
        choices: dict[int, dict] = {}
        async with grpc.aio.insecure_channel(f"{stack.host}:{stack.language_port}",
                                             interceptors=client_interceptors(stack.internal_secret)) as channel:
            async for response in dvd_pb2_grpc.LanguageServiceStub(channel).Generate(request, timeout=300):
                choice = choices.setdefault(response.index, {"content": "", "reasoning": "", "calls": {},
                                                             "token_ids": [], "finish_reason": ""})
                choice["content"] += response.text
                choice["reasoning"] += response.reasoning
                choice["token_ids"] += response.token_ids
                choice["finish_reason"] += response.finish_reason
                add_call_deltas(choice["calls"], response.tool_calls)
        return choices

    return asyncio.run(call())


def assert_valid_calls(choice: dict, names: set[str]) -> None:
    assert choice["calls"], choice
    for call in choice["calls"].values():
        assert call["id"] and call["name"] in names, call
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["name"])
        jsonschema.validate(json.loads(call["arguments"]), schema)


USER = [text("user", "Weather in Paris?")]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_required_choice_always_ends_as_a_schema_valid_call(language_server, seed):
    tools = dvd_pb2.Tools(tools_json=json.dumps(TOOLS), choice="required")
    choices = generate(language_server, USER, tools, max_tokens=96, temperature=1.0, seed=seed, n=2)
    assert sorted(choices) == [0, 1]
    for choice in choices.values():
        assert choice["finish_reason"] == "tool_calls", choice
        assert len(choice["calls"]) == 1 and choice["content"] == ""
        assert_valid_calls(choice, {"get_weather", "get_time"})


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_named_choice_always_ends_as_a_schema_valid_call(language_server, seed):
    tools = dvd_pb2.Tools(tools_json=json.dumps(TOOLS), function="get_weather")
    [choice] = generate(language_server, USER, tools, max_tokens=96, temperature=1.0, seed=seed).values()
    assert choice["finish_reason"] == "stop", choice
    assert_valid_calls(choice, {"get_weather"})


@pytest.mark.slow
def test_choice_none_makes_no_calls(language_server):
    tools = dvd_pb2.Tools(tools_json=json.dumps(TOOLS), choice="none")
    [choice] = generate(language_server, USER, tools, max_tokens=8, ignore_eos=True).values()
    assert choice["calls"] == {} and choice["finish_reason"] == "length"


@pytest.mark.slow
def test_auto_with_a_tool_history_renders_and_runs_with_two_choices(language_server):
    tools = dvd_pb2.Tools(tools_json=json.dumps(TOOLS), parallel_calls=True)
    choices = generate(language_server, HISTORY, tools, max_tokens=8, n=2, ignore_eos=True)
    assert sorted(choices) == [0, 1]
    for choice in choices.values():
        assert len(choice["token_ids"]) == 8
        assert choice["finish_reason"] == "length", choice  # ignore_eos: a call, if any, never stopped the model


@pytest.mark.slow
def test_logit_bias_makes_greedy_output_that_token(language_server):
    [choice] = generate(language_server, USER, max_tokens=4, temperature=0.0, ignore_eos=True,
                        logit_bias={1000: 100.0}).values()
    assert choice["token_ids"] == [1000] * 4


@pytest.mark.slow
def test_logit_bias_outside_the_vocabulary_is_refused(language_server):
    with pytest.raises(grpc.RpcError) as caught:
        generate(language_server, USER, max_tokens=2, logit_bias={10_000_000: 1.0})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vocabulary" in caught.value.details()


@pytest.mark.slow
def test_a_bad_tool_choice_is_an_invalid_argument(language_server):
    with pytest.raises(grpc.RpcError) as caught:
        generate(language_server, USER, dvd_pb2.Tools(tools_json=json.dumps(TOOLS), function="nope"), max_tokens=2)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in caught.value.details()
