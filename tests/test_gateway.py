"""The gateway on its own: OpenAI-shaped errors when its servers are missing, and a fuzz of its HTTP API."""

from __future__ import annotations

import sys

import httpx
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import data_url, free_port, make_image
from gateway.schemas.chat import ChatCompletionRequest
from launcher import Servers

pytestmark = pytest.mark.slow  # a gateway process, and a 200-request fuzz against it


@pytest.fixture(scope="module")
def lonely_gateway(tmp_path_factory):
    """A gateway whose vision and language servers do not exist."""
    port = free_port()
    command = [sys.executable, "-m", "dvd.cli", "gateway", "--port", str(port), "--served-model-name", "tiny",
               "--vision-server", f"127.0.0.1:{free_port()}", "--language-server", f"127.0.0.1:{free_port()}"]
    url = f"http://127.0.0.1:{port}"
    gateway = Servers({"gateway": command}, log_dir=tmp_path_factory.mktemp("lonely-logs"))
    with gateway.running(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503,
                         what="the gateway answers, its servers missing"):
        yield url


def test_health_is_503_without_servers(lonely_gateway):
    reply = httpx.get(f"{lonely_gateway}/health", timeout=10)
    assert reply.status_code == 503
    assert reply.json() == {"vision_servers_up": 0, "language_servers_up": 0}


def test_chat_without_servers_is_a_503_in_openai_error_format(lonely_gateway):
    client = openai.OpenAI(base_url=f"{lonely_gateway}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 503
    assert error.value.body["message"] == "no language server is available"
    assert error.value.body["type"] == "service_unavailable"


def test_invalid_json_is_a_400(lonely_gateway):
    reply = httpx.post(f"{lonely_gateway}/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "min_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "logprobs", "top_logprobs", "response_format", "user", "chat_template_kwargs",
          "tools", "logit_bias"]
IMAGE = data_url(make_image(16, 16, 0))
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.sampled_from([IMAGE, "data:image/png;base64,AAAA", "data:,x", "ftp://x", "http://no.such.host.invalid/a.png"]),
         "detail": st.sampled_from(["auto", "low", "high", "medium"])})}),
    json_values,
)
messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]),
    "content": st.one_of(st.text(max_size=20), st.lists(parts, max_size=3), st.none(), json_values)}), max_size=3)
near_valid = st.fixed_dictionaries(
    {"model": st.just("tiny"), "messages": st.just([{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": IMAGE}}]}])},
    optional={"temperature": st.floats(-0.5, 2.5), "top_p": st.floats(0, 1), "top_k": st.integers(-2, 50),
              "min_p": st.floats(0, 1.2), "n": st.integers(0, 10), "max_tokens": st.integers(-1, 100),
              "stop": st.lists(st.text(max_size=3), max_size=3), "logprobs": st.booleans(),
              "top_logprobs": st.integers(-1, 25), "seed": st.integers(-(2**64), 2**64), "stream": st.booleans(),
              "presence_penalty": st.floats(-3, 3), "repetition_penalty": st.floats(-1, 3),
              "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                                                  {"type": "json_schema", "json_schema": {"name": "a"}}]),
              "chat_template_kwargs": st.sampled_from([{}, {"enable_thinking": True}, {"enable_thinking": 1}])},
)
requests = st.one_of(
    json_values,
    near_valid,
    st.fixed_dictionaries({"model": st.sampled_from(["tiny", "other"]), "messages": messages},
                          optional={name: json_values for name in FIELDS[2:]}),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=requests)
def test_fuzzed_requests_get_openai_errors_and_never_a_server_error(lonely_gateway, body):
    """Without servers, a valid request is a 503; anything else is a 4xx; never a 500, never a hang."""
    reply = httpx.post(f"{lonely_gateway}/v1/chat/completions", json=body, timeout=15)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == reply.status_code
    try:
        valid = isinstance(body, dict) and ChatCompletionRequest.model_validate(body).model == "tiny"
    except ValidationError:
        valid = False
    event(f"HTTP {reply.status_code}")
    if reply.status_code == 503:
        assert valid, error
    else:
        assert reply.status_code in (400, 404), error
    assert len(reply.headers["x-request-id"]) == 32
