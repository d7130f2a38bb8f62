"""Tool calling and the Responses API through real servers (vLLM's hermes tool parser in the language server),
next to coupled `vllm serve --enable-auto-tool-choice --tool-call-parser hermes` of the same checkpoint, and
driven by the official `openai` client and the OpenAI Agents SDK.

The tiny model's text is random: the tests assert on the protocol (prompts, calls, schemas, item types),
never on the prose, and compare DvD with coupled serving only where both must agree.
"""

from __future__ import annotations

import json
from typing import Annotated

import openai
import pytest
from pydantic import Field

from benchmarks.toolkit.servers import VLLM_COMMAND
from conftest import data_url, make_image
from coupled import TOP_K, from_openai, mismatches
from launcher import Servers, Stack, free_port, http_ready

pytestmark = pytest.mark.slow

# Bounded fields: a random model writes an unbounded string or integer until max_tokens, grammar or not.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                   "required": ["city", "days"], "additionalProperties": False}}}
IMAGES = [data_url(make_image(448, 448, 3)), data_url(make_image(896, 448, 4))]
LOGPROB_ATOL = 1e-4  # both sides fp32; as in tests/test_lossless.py


def user(text: str, images: int = 0) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in IMAGES[:images]]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def schema_valid(arguments: str) -> bool:
    """The arguments are a JSON object matching WEATHER's parameters (the subset of JSON schema it uses)."""
    value = json.loads(arguments)
    return (isinstance(value, dict) and set(value) == {"city", "days"} and isinstance(value["city"], str)
            and isinstance(value["days"], int) and not isinstance(value["days"], bool))


@pytest.fixture(scope="module")
def servers(tiny_checkpoints, tmp_path_factory):
    """DvD (`dvd up`'s three servers) and coupled `vllm serve` of the same custom-format checkpoint.

    The coupled server starts from an empty `VLLM_CACHE_ROOT`, as on a fresh machine: vLLM then inspects the
    built-in InternVL architecture in a fresh interpreter, which must get the torchvision work-around too
    (dvd/site_hook.py, which the install puts in every interpreter of the environment)."""
    model = str(tiny_checkpoints["custom"])
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), dtype="float32", feature_dtype="float32")  # greedy equality needs fp32
    coupled_port = free_port()
    commands = stack.commands()
    commands["coupled"] = [*VLLM_COMMAND, "serve", model, "--port", str(coupled_port), "--trust-remote-code",
                           "--max-model-len", "8192", "--dtype", "float32", "--enable-auto-tool-choice",
                           "--tool-call-parser", "hermes", "--gpu-memory-utilization", "0.2", "--max-num-seqs", "8",
                           "--enforce-eager"]
    coupled_url = f"http://127.0.0.1:{coupled_port}"
    cache = tmp_path_factory.mktemp("vllm-cache")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache)}
    ready = [stack.ready(), http_ready(coupled_url)]
    with Servers(commands, log_dir=tmp_path_factory.mktemp("tools-logs"), env=env).running(
            lambda: all(check() for check in ready)):
        dvd = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=300)
        coupled = openai.OpenAI(base_url=f"{coupled_url}/v1", api_key="unused", max_retries=0, timeout=300)
        assert list(cache.glob("modelinfos/*")), "vLLM inspected the architecture itself and cached the result"
        yield dvd, coupled, dvd.models.list().data[0].id, coupled.models.list().data[0].id


# ---------------------------------------------------------------- equal to coupled serving


def greedy(client, model: str, messages: list[dict], new_tokens: int, **kwargs):
    """Exactly `new_tokens` greedy tokens (ignore_eos: never two empty answers), with their top logprobs."""
    return client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0,
                                          max_tokens=new_tokens, logprobs=True, top_logprobs=TOP_K,
                                          extra_body={"ignore_eos": True}, **kwargs)


def assert_same_tokens(ours, theirs, new_tokens: int) -> None:
    """The same tokens, each with the same top logprobs (both sides fp32): a prompt that differed in any token
    would move them."""
    tokens = [[entry.token for entry in reply.choices[0].logprobs.content] for reply in (ours, theirs)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == new_tokens, tokens
    assert mismatches(from_openai(ours), from_openai(theirs), LOGPROB_ATOL) == []


@pytest.mark.parametrize("images", [0, 1, 2])
def test_the_prompt_with_tools_equals_coupled_serving(servers, images):
    """A question with tools, then the same after a call and its result: the same prompt on both sides, seen as
    the same length and the same first tokens with the same logprobs."""
    dvd, coupled, dvd_model, coupled_model = servers
    history = [user("What is the weather where this was taken?", images),
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    for messages in (history[:1], history):
        ours = greedy(dvd, dvd_model, messages, 4)
        theirs = greedy(coupled, coupled_model, messages, 4)
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
        assert_same_tokens(ours, theirs, 4)


def test_auto_tool_choice_gives_coupled_serving_s_output(servers):
    """Under `auto`, the same 24 tokens, and the hermes parser makes the same content, calls and finish reason
    of them on both sides."""
    dvd, coupled, dvd_model, coupled_model = servers
    for images in (0, 1):
        messages = [user("Weather in Paris for 2 days?", images)]
        ours = greedy(dvd, dvd_model, messages, 24, tool_choice="auto")
        theirs = greedy(coupled, coupled_model, messages, 24, tool_choice="auto")
        assert_same_tokens(ours, theirs, 24)
        ours, theirs = ours.choices[0], theirs.choices[0]
        assert ours.message.content == theirs.message.content
        assert [(c.function.name, c.function.arguments) for c in ours.message.tool_calls or []] == \
            [(c.function.name, c.function.arguments) for c in theirs.message.tool_calls or []]
        assert ours.finish_reason == theirs.finish_reason == "length"  # ignore_eos: the length ends both


# ---------------------------------------------------------------- better than coupled serving


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_a_constrained_call_always_finishes_schema_valid(servers, tool_choice, stream):
    """Even from a random model: the grammar has no whitespace to loop in, so the call closes."""
    dvd, _, model, _ = servers
    for seed in range(3):
        kwargs = dict(model=model, messages=[user("Weather in Paris?", 1)], tools=[WEATHER], tool_choice=tool_choice,
                      temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=False)
        if stream:
            calls: dict[int, dict] = {}
            for chunk in dvd.chat.completions.create(**kwargs, stream=True):
                for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                    call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
            found = list(calls.values())
        else:
            message = dvd.chat.completions.create(**kwargs).choices[0].message
            found = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
        assert [c["name"] for c in found] == ["get_weather"]
        assert schema_valid(found[0]["arguments"]), found


# ---------------------------------------------------------------- the official client's tool loops


def test_a_two_turn_tool_loop_with_an_image_on_chat_completions(servers):
    dvd, _, model, _ = servers
    messages = [user("What is the weather where this photo was taken?", 1)]
    first = dvd.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice="required",
                                        max_tokens=100)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"weather": "sunny"})}]
    second = dvd.chat.completions.create(model=model, messages=messages, tools=[WEATHER], max_tokens=8,
                                         extra_body={"ignore_eos": True})
    # ignore_eos: eight tokens, cut by the length (a call among them would turn only a "stop" into "tool_calls")
    assert second.choices[0].finish_reason == "length" and second.usage.completion_tokens == 8
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    assert second.usage.prompt_tokens_details.image_tokens == first.usage.prompt_tokens_details.image_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_on_the_responses_api_with_previous_response_id(servers, stream):
    dvd, _, model, _ = servers
    tool = {"type": "function", **WEATHER["function"]}

    def create(**kwargs):
        if not stream:
            return dvd.responses.create(model=model, tools=[tool], **kwargs)
        events = list(dvd.responses.create(model=model, tools=[tool], stream=True, **kwargs))
        assert events[0].type == "response.created" and events[-1].type in ("response.completed",
                                                                             "response.incomplete")
        return events[-1].response

    first = create(input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": IMAGES[0]}, {"type": "input_text", "text": "Weather here?"}]}],
        tool_choice="required", parallel_tool_calls=False, max_output_tokens=100, instructions="Use the tools.")
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and schema_valid(calls[0].arguments)
    second = create(previous_response_id=first.id, max_output_tokens=8, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert second.previous_response_id == first.id and second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn, image included, came along
    assert dvd.responses.retrieve(second.id).output == second.output


# ---------------------------------------------------------------- a real agent framework


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_an_openai_agents_sdk_agent_calls_its_tool(servers, api):
    """The Agents SDK's own loop: the model must call the tool (tool_choice required), the SDK runs it.

    Through chat completions the loop goes on as usual: the result goes back to the model (tool_choice reset
    to auto, the SDK's default) and its answer ends the run. Through the Responses model the run stops at the
    tool's result (`stop_on_first_tool`): the SDK fails a response cut off by max_output_tokens, and the
    random model writes until that limit; the raw-client test above sends the result back on that API."""
    import agents
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled

    dvd, _, model_name, _ = servers
    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=12)], days: Annotated[int, Field(ge=1, le=14)]) -> str:
        """Current weather of a city."""
        calls.append((city, days))
        return "sunny"

    client = openai.AsyncOpenAI(base_url=str(dvd.base_url), api_key="unused", max_retries=0, timeout=300)
    chat = api == "chat_completions"
    model_cls = agents.OpenAIChatCompletionsModel if chat else agents.OpenAIResponsesModel
    agent = Agent(name="forecaster", instructions="Answer with the weather.", tools=[get_weather],
                  model=model_cls(model=model_name, openai_client=client),
                  tool_use_behavior="run_llm_again" if chat else "stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=64,
                                               temperature=0.7))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert len(calls) == 1 and isinstance(calls[0][0], str) and 1 <= calls[0][1] <= 14
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    if chat:
        assert kinds[2:] == ["message_output_item"] and isinstance(result.final_output, str)
    else:
        assert kinds[2:] == [] and result.final_output == "sunny"
