"""One streamed chat completion, timed by the client (official `openai` client): what the tools that send requests
one at a time measure. `loadgen` is the concurrent counterpart."""

from __future__ import annotations

import time
from dataclasses import dataclass

import openai


@dataclass(frozen=True)
class Reply:
    ttft_s: float  # request sent -> first streamed content (-> the end when none came)
    latency_s: float  # request sent -> end of the stream
    prompt_tokens: int
    completion_tokens: int


def served_model(client: openai.OpenAI) -> str:
    """The first model the server lists."""
    models = client.models.list().data
    if not models:
        raise RuntimeError("the server lists no model")
    return models[0].id


def served_model_at(base_url: str, api_key: str = "unused") -> str:
    """The first model the server at `base_url` lists."""
    client = openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key, max_retries=0)
    try:
        return served_model(client)
    finally:
        client.close()


def user(*parts: dict | str) -> list[dict]:
    """A one-turn conversation: the user's parts in order, a string as text, a dict as it is."""
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def stream_chat(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int,
                ignore_eos: bool = False) -> Reply:
    """Greedy, streamed to the end; with `ignore_eos`, exactly `max_tokens` tokens (vLLM's `ignore_eos`)."""
    start = time.perf_counter()
    first = usage = None
    for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True} if ignore_eos else None):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        usage = chunk.usage or usage
    end = time.perf_counter()
    return Reply((first or end) - start, end - start, usage.prompt_tokens if usage else 0,
                 usage.completion_tokens if usage else 0)
