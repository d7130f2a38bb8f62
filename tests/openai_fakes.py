"""Replies of an OpenAI-compatible server, for the benchmark tests that answer through `httpx.MockTransport`."""

from __future__ import annotations

import json

import httpx


def models_reply() -> httpx.Response:
    """`GET /v1/models` naming the one model "m"."""
    return httpx.Response(200, json={"object": "list", "data": [
        {"id": "m", "object": "model", "created": 0, "owned_by": "x"}]})


def streamed_reply() -> httpx.Response:
    """A streamed chat completion of the two tokens "a" and "b", its usage chunk and `[DONE]`."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    events = [chunk | {"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in ("a", "b")]
    events.append(chunk | {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())
