"""A request in the servers' terms (gateway/jobs.py): image sources and their tiles, the images the language
server waits for, logit bias and tools checked before anything is sent."""

from __future__ import annotations

import json
import time

import pytest

from gateway.errors import APIError
from gateway.jobs import ImageSource, Job, logit_bias, tools_message
from gateway.request_context import REQUEST_ARRIVAL_NS
from proto import dvd_pb2

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("detail", "tiles"), [("low", 1), ("high", 12), ("auto", 12)])
def test_an_images_detail_sets_its_tiles(detail, tiles):
    assert ImageSource.image("data:,x", detail, max_tiles=12) == ImageSource("data:,x", tiles)


def test_the_language_server_waits_for_one_image_per_picture_and_per_video_frame():
    sources = [ImageSource("a", 12), ImageSource("v", 1, video_frames=8), ImageSource("b", 1)]
    job = Job("r", "tiny", [], sources, dvd_pb2.SamplingParams())
    assert [s.images for s in sources] == [1, 8, 1] and job.image_count == 10
    assert Job("r", "tiny", [], [], dvd_pb2.SamplingParams()).image_count == 0


def test_choices_default_to_one():
    assert Job("r", "tiny", [], [], dvd_pb2.SamplingParams()).n == 1
    assert Job("r", "tiny", [], [], dvd_pb2.SamplingParams(n=3)).n == 3


def test_a_job_arrives_when_its_request_did_or_else_now():
    token = REQUEST_ARRIVAL_NS.set(123)
    try:
        assert Job("r", "tiny", [], [], dvd_pb2.SamplingParams()).arrival_unix_ns == 123
    finally:
        REQUEST_ARRIVAL_NS.reset(token)
    before = time.time_ns()
    assert before <= Job("r", "tiny", [], [], dvd_pb2.SamplingParams()).arrival_unix_ns <= time.time_ns()


def test_logit_bias_takes_token_ids_and_biases_within_100():
    assert logit_bias(None) == {} and logit_bias({}) == {}
    assert logit_bias({"0": -100, "4294967295": 100, "7": 0.5}) == {0: -100, 4294967295: 100, 7: 0.5}


@pytest.mark.parametrize(("bias", "message"), [
    ({"abc": 1}, "logit_bias: 'abc' is not a token id"),
    ({"-1": 1}, "logit_bias: '-1' is not a token id"),
    ({"4294967296": 1}, "logit_bias: '4294967296' is not a token id"),
    ({"5": 100.5}, "logit_bias: 100.5 for token 5 is outside -100 to 100"),
    ({"5": -100.5}, "logit_bias: -100.5 for token 5 is outside -100 to 100"),
])
def test_bad_logit_bias_is_a_400_naming_the_entry(bias, message):
    with pytest.raises(APIError, match=f"^{message}$") as caught:
        logit_bias(bias)
    assert (caught.value.status, caught.value.param) == (400, "logit_bias")


def test_tools_go_to_the_language_server_with_the_choice():
    tools = tools_message([WEATHER, TIME], "required", None, parallel=False)
    assert json.loads(tools.tools_json) == [WEATHER, TIME]
    assert (tools.choice, tools.function, tools.parallel_calls) == ("required", "", False)
    named = tools_message([WEATHER, TIME], None, "get_time", parallel=True)
    assert (named.choice, named.function, named.parallel_calls) == ("", "get_time", True)
    assert tools_message([WEATHER], None, None, parallel=True).choice == "auto"  # OpenAI's default with tools
    assert tools_message([WEATHER], "none", None, parallel=True).choice == "none"


def test_without_tools_there_is_nothing_to_send_unless_a_choice_needs_them():
    assert tools_message([], None, None, parallel=True) is None
    assert tools_message([], "none", None, parallel=True) is None
    for choice, named in (("auto", None), ("required", None), (None, "get_time")):
        with pytest.raises(APIError, match="^tool_choice needs tools$") as caught:
            tools_message([], choice, named, parallel=True)
        assert (caught.value.status, caught.value.param) == (400, "tool_choice")


def test_tools_with_one_name_twice_or_a_choice_of_none_of_them_are_a_400():
    with pytest.raises(APIError, match="^tools: function names must be unique$") as caught:
        tools_message([WEATHER, WEATHER], None, None, parallel=True)
    assert (caught.value.status, caught.value.param) == (400, "tools")
    with pytest.raises(APIError, match="^tool_choice names 'get_time', which is not among the tools$") as caught:
        tools_message([WEATHER], None, "get_time", parallel=True)
    assert (caught.value.status, caught.value.param) == (400, "tool_choice")
