"""The gateway's own logic, in process, against scripted servers (tests/gateway_fakes.py): vision starting at
once, `missing` corrections, retries, 429, auth, errors, tool-call streaming and the Responses API."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import openai
import pytest
from gateway_fakes import MODEL, FakeLanguage, FakeVision, gateway, run

from conftest import data_url, make_image
from gateway import metrics
from gateway.schemas.responses import ResponsesRequest
from launcher import wait_until_async
from proto import dvd_pb2

IMAGE = data_url(make_image(32, 24, 0))
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def image_chat(text: str = "what is this?", url: str = IMAGE) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def finish(text: str = "", reason: str = "stop", **fields) -> dvd_pb2.GenerateResponse:
    return dvd_pb2.GenerateResponse(text=text, token_ids=[1], finish_reason=reason,
                                    usage=dvd_pb2.Usage(prompt_tokens=5, completion_tokens=3), **fields)


# ---------------------------------------------------------------- vision starts at once


def test_encode_leaves_before_the_language_server_answers():
    """With the feature cache on, a fresh image's Encode does not wait for the `missing` reply: the scripted
    language server only replies once the vision server has been called."""
    vision = FakeVision()

    async def after_encode(request, server):
        await asyncio.wait_for(vision.called.wait(), timeout=10)  # a gateway waiting for `missing` times out here
        yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=[0]))
        yield finish("seen")

    async def main():
        async with gateway(FakeLanguage(after_encode), vision) as (client, _):
            reply = await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3)
        return reply

    before = time.time_ns()
    reply = run(main())
    assert reply.choices[0].message.content == "seen"
    assert len(vision.requests) == 1 and vision.requests[0].images[0].image_index == 0
    assert vision.requests[0].image_count == 1
    # The request's arrival on the gateway's clock, for the dispatch metric.
    assert before <= vision.requests[0].request_arrival_unix_ns <= time.time_ns()


def test_an_image_the_server_holds_is_not_encoded_and_a_wrong_guess_is_corrected():
    """The second turn with the same image goes to the server that holds it, and nothing is encoded at once;
    when that server has evicted it after all (`missing` lists it), Encode follows the reply."""
    vision = FakeVision()
    evicted = {"now": False}

    async def script(request, server):
        missing = [0] if (len(server.requests) == 1 or evicted["now"]) else []
        encodes_before = len(vision.requests)
        yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=missing))
        yield finish(f"encodes before reply: {encodes_before}")

    async def main():
        async with gateway(FakeLanguage(script), vision) as (client, _):
            first = await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3)
            second = await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3)
            evicted["now"] = True
            third = await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3)
        return first, second, third

    first, second, third = run(main())
    assert len(vision.requests) == 2  # the first turn, and the correction of the third
    assert second.choices[0].message.content == "encodes before reply: 1"  # held: nothing sent at once
    assert third.choices[0].message.content == "encodes before reply: 1"  # predicted held; corrected after


def test_an_encode_the_server_did_not_need_is_stopped_and_counted():
    """Predicted missing, but the server holds the image (another gateway sent it): the slow Encode is cancelled
    and counted as needless; the answer does not wait for it."""
    vision = FakeVision(delay_s=30)

    async def holds_everything(request, server):
        await asyncio.wait_for(vision.called.wait(), timeout=10)
        yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=[]))
        yield finish("held")

    async def main():
        before = metrics.IMAGES_SENT_NEEDLESSLY._value.get()
        async with gateway(FakeLanguage(holds_everything), vision) as (client, _):
            reply = await asyncio.wait_for(
                client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3), timeout=20)
            await wait_until_async(lambda: vision.cancelled, 5, "the gateway cancels the Encode call")
        return reply, metrics.IMAGES_SENT_NEEDLESSLY._value.get() - before

    reply, needless = run(main())
    assert reply.choices[0].message.content == "held"
    assert needless == 1 and vision.cancelled == 1


def test_without_the_feature_cache_every_image_is_encoded_at_once():
    vision = FakeVision()

    async def main():
        async with gateway(vision=vision, feature_cache=False) as (client, _):
            await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3)
            await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3)
        return vision.requests

    requests = run(main())
    assert len(requests) == 2 and all(r.image_count == 0 and len(r.images) == 1 for r in requests)


# ---------------------------------------------------------------- admission, retries, auth, errors


def test_a_full_gateway_answers_429_with_retry_after():
    release = asyncio.Event()

    async def slow(request, server):
        await release.wait()
        yield finish("done")

    async def main():
        async with gateway(FakeLanguage(slow), max_in_flight=1) as (client, http):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            first = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            await wait_until_async(lambda: metrics.IN_FLIGHT.labels("default")._value.get(), 10,
                                   "the first request is in flight")
            refused = await http.post("/v1/chat/completions", json=body)
            release.set()
            return refused, await first

    refused, first = run(main())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert first.status_code == 200


def test_an_unreachable_language_server_is_skipped_for_another():
    language = FakeLanguage()

    async def main():
        async with gateway(language, language_addresses=["127.0.0.1:9"]) as (client, _):
            return [await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
                    for _ in range(3)]

    replies = run(main())
    assert [r.choices[0].message.content for r in replies] == ["ok"] * 3
    assert len(language.requests) == 3


def test_the_api_key_is_checked_on_the_apis_only():
    async def main():
        async with gateway(api_keys=["secret"]) as (client, http):
            models = await client.models.list()
            anonymous = await http.get("/v1/models")
            wrong = await http.post("/v1/responses", json={"model": MODEL, "input": "hi"},
                                    headers={"authorization": "Bearer nope"})
            health = await http.get("/health")
        return models, anonymous, wrong, health

    models, anonymous, wrong, health = run(main())
    assert [m.id for m in models.data] == [MODEL]
    assert anonymous.status_code == wrong.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json() == {"error": {"message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          "type": "authentication_error", "param": None, "code": 401}}
    assert health.status_code == 200


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "outside -100 to 100"),
    ({"functions": []}, "functions", "does not support this parameter"),
])
def test_bad_tool_and_bias_parameters_are_400s_that_name_them(body, param, words):
    async def main():
        async with gateway() as (_, http):
            return await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [
                {"role": "user", "content": "hi"}], **body})

    reply = run(main())
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param and words in reply.json()["error"]["message"]


def test_accepted_and_ignored_parameters_pass():
    language = FakeLanguage()

    async def main():
        async with gateway(language) as (client, _):
            return await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], store=False, metadata={"k": "v"},
                logit_bias={"42": 5.0}, service_tier="auto")

    reply = run(main())
    assert reply.choices[0].message.content == "ok"
    assert dict(language.requests[0].sampling.logit_bias) == {42: 5.0}


# ---------------------------------------------------------------- tool calls on chat completions


async def hermes_like(request, server):
    """What the language server sends for `<tool_call>{"name": "get_weather", ...}</tool_call>`."""
    yield dvd_pb2.GenerateResponse(text="Let me check. ", token_ids=[1])
    yield dvd_pb2.GenerateResponse(token_ids=[2], tool_calls=[dvd_pb2.ToolCallDelta(
        index=0, id="chatcmpl-tool-1", name="get_weather")])
    yield dvd_pb2.GenerateResponse(token_ids=[3], tool_calls=[dvd_pb2.ToolCallDelta(index=0, arguments='{"city": ')])
    yield dvd_pb2.GenerateResponse(token_ids=[4], tool_calls=[dvd_pb2.ToolCallDelta(index=0, arguments='"Paris"}')])
    yield finish(reason="tool_calls")


def test_tool_calls_stream_as_deltas_and_fold_into_the_message():
    language = FakeLanguage(hermes_like)

    async def main():
        async with gateway(language) as (client, _):
            kwargs = dict(model=MODEL, messages=image_chat("weather?"), tools=[WEATHER], parallel_tool_calls=False)
            whole = await client.chat.completions.create(**kwargs)
            stream = await client.chat.completions.create(**kwargs, stream=True)
            chunks = [chunk async for chunk in stream]
        return whole, chunks

    whole, chunks = run(main())
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.content == "Let me check. "
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "chatcmpl-tool-1", "get_weather", {"city": "Paris"})
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == "chatcmpl-tool-1" and deltas[0].type == "function"
    assert "".join(d.function.arguments or "" for d in deltas) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    tools = language.requests[0].tools
    assert json.loads(tools.tools_json) == [WEATHER] and tools.choice == "auto" and not tools.parallel_calls


def test_the_history_of_a_tool_loop_reaches_the_language_server():
    language = FakeLanguage()
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]

    async def main():
        async with gateway(language) as (client, _):
            return await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],
                                                        tool_choice={"type": "function",
                                                                     "function": {"name": "get_weather"}})

    run(main())
    sent = language.requests[0]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[1].tool_calls[0] == dvd_pb2.ToolCall(id="call_1", name="get_weather",
                                                              arguments='{"city":"Paris"}')
    assert sent.messages[2].tool_call_id == "call_1" and sent.messages[2].content[0].text == "sunny"
    assert sent.tools.function == "get_weather"


# ---------------------------------------------------------------- Responses API


async def thinks_then_calls(request, server):
    yield dvd_pb2.GenerateResponse(reasoning="I should ", token_ids=[1])
    yield dvd_pb2.GenerateResponse(reasoning="look it up.", token_ids=[2])
    yield dvd_pb2.GenerateResponse(token_ids=[3], tool_calls=[dvd_pb2.ToolCallDelta(
        index=0, id="call_9", name="get_weather", arguments='{"city":"Oslo"}')])
    yield finish(reason="tool_calls")


def test_responses_stream_and_body_agree_and_continue_a_conversation():
    language = FakeLanguage(thinks_then_calls)
    tool = {"type": "function", **WEATHER["function"]}

    async def main():
        async with gateway(language) as (client, _):
            kwargs = dict(model=MODEL, input=[{"role": "user", "content": [
                {"type": "input_text", "text": "weather?"}, {"type": "input_image", "image_url": IMAGE}]}],
                tools=[tool], reasoning={"effort": "medium"}, instructions="Be brief.")
            whole = await client.responses.create(**kwargs)
            events = [event async for event in await client.responses.create(**kwargs, stream=True)]
            language.script = hermes_like
            follow = await client.responses.create(
                model=MODEL, previous_response_id=whole.id, tools=[tool],
                input=[{"type": "function_call_output", "call_id": "call_9", "output": "cold"}])
            fetched = await client.responses.retrieve(whole.id)
            with pytest.raises(openai.NotFoundError, match="'resp_unknown' is not stored here"):
                await client.responses.retrieve("resp_unknown")
        return whole, events, follow, fetched

    whole, events, follow, fetched = run(main())
    assert [item.type for item in whole.output] == ["reasoning", "function_call"]
    assert whole.output[0].content[0].text == "I should look it up."
    assert (whole.output[1].name, whole.output[1].arguments, whole.output[1].call_id) == (
        "get_weather", '{"city":"Oslo"}', "call_9")
    assert whole.status == "completed" and whole.usage.input_tokens == 5
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert "response.reasoning_text.delta" in types and "response.function_call_arguments.done" in types
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    streamed = events[-1].response
    assert [i.model_dump(exclude={"id"}) for i in streamed.output] == [
        i.model_dump(exclude={"id"}) for i in whole.output]
    assert fetched.id == whole.id and fetched.output == whole.output
    # The follow-up carried the whole conversation: instructions are not carried over, as in OpenAI's API.
    sent = language.requests[2]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[1].reasoning == "I should look it up." and sent.messages[1].tool_calls[0].id == "call_9"
    assert sent.image_count == 1  # the first turn's image travels with the history
    assert [item.type for item in follow.output] == ["message", "function_call"]
    assert follow.previous_response_id == whole.id


def test_responses_cut_off_by_max_output_tokens_are_incomplete_and_store_false_is_not_kept():
    async def cut(request, server):
        yield finish("partial", reason="length")

    async def main(language):
        async with gateway(language) as (client, _):
            reply = await client.responses.create(model=MODEL, input="hi", max_output_tokens=1, store=False,
                                                  extra_body={"top_k": 5, "logit_bias": {"7": -100}})
            with pytest.raises(openai.NotFoundError, match=f"'{reply.id}' is not stored here"):
                await client.responses.create(model=MODEL, input="more", previous_response_id=reply.id)
        return reply

    language = FakeLanguage(cut)
    reply = run(main(language))
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    sampling = language.requests[0].sampling
    assert (sampling.max_tokens, sampling.top_k, dict(sampling.logit_bias)) == (1, 5, {7: -100.0})
    assert reply.output_text == "partial"


def test_responses_refuse_what_they_do_not_support_by_name():
    async def main():
        async with gateway() as (_, http):
            return [await http.post("/v1/responses", json={"model": MODEL, "input": "hi", **extra})
                    for extra in ({"background": True}, {"tools": [{"type": "web_search"}]},
                                  {"input": [{"type": "input_file", "file_id": "f"}]})]

    for reply in run(main()):
        assert reply.status_code == 400, reply.text


def test_the_response_store_is_bounded():
    from openai.types.responses import Response

    from gateway.responses import ResponseStore, output_as_input

    store = ResponseStore(max_bytes=3000, ttl_s=3600)
    request = ResponsesRequest(model=MODEL, input="x" * 500)
    for number in range(10):
        response = Response(id=f"resp_{number}", object="response", created_at=0, model=MODEL, output=[],
                            parallel_tool_calls=True, tool_choice="auto", tools=[])
        history = [*output_as_input(response), *([] if isinstance(request.input, str) else request.input)]
        store.put(response, history, store.size_of(response, history), "default")
    assert store.num_bytes <= 3000
    with pytest.raises(Exception, match="not stored"):
        store.get("resp_0", "default")
    assert store.get("resp_9", "default").id == "resp_9"


# ---------------------------------------------------------------- failures


class FailingVision(FakeVision):
    async def Encode(self, request, context):  # noqa: N802
        self.requests.append(request)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image 0: not an image the server can decode")


async def waits_for_features(request, server):
    """As the real server does: says what it lacks, then waits for features that never come."""
    yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=[0]))
    await asyncio.sleep(60)
    yield finish("too late")


def test_a_failed_encode_of_a_needed_image_fails_the_request_with_its_status():
    language = FakeLanguage(waits_for_features)

    async def main():
        async with gateway(language, FailingVision()) as (_, http):
            reply = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": image_chat()})
            await wait_until_async(lambda: language.cancelled, 5, "the gateway cancels the Generate call")
            return reply

    reply = run(main())
    assert reply.status_code == 400 and "not an image the server can decode" in reply.json()["error"]["message"]
    assert language.cancelled == 1  # the Generate waiting for the features was cancelled


async def dies_after_a_token(request, server):
    yield dvd_pb2.GenerateResponse(text="half", token_ids=[1])
    raise RuntimeError("engine gone")


def test_a_failure_after_the_first_token_ends_each_stream_in_band():
    async def main():
        async with gateway(FakeLanguage(dies_after_a_token)) as (client, http):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            chat = (await http.post("/v1/chat/completions", json=body)).text
            events = [e async for e in await client.responses.create(model=MODEL, input="hi", stream=True)]
        return chat, events

    chat, events = run(main())
    assert '"content":"half"' in chat and '"error"' in chat.split("\n\n")[-2] and "[DONE]" not in chat
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
