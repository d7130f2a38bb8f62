"""The coupled baseline (`python -m benchmarks.vllm_cli serve`, what `dvd bench compare` and
benchmarks/plan_validation.py start) on a fresh machine: an empty `$VLLM_CACHE_ROOT`, so vLLM inspects its
built-in InternVL architecture in a fresh interpreter (`python -m vllm.model_executor.models.registry`)."""

from __future__ import annotations

import httpx
import pytest

from conftest import data_url, make_image


@pytest.mark.slow
def test_coupled_vllm_serve_starts_with_an_empty_vllm_cache_and_answers(tiny_checkpoints, tmp_path, monkeypatch):
    from benchmarks import servers

    cache = tmp_path / "vllm-cache"
    cache.mkdir()
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(cache))  # the servers inherit this process's environment
    model = tiny_checkpoints["custom"]  # architectures ["InternVLChatModel"]: vLLM's built-in class
    with servers.coupled(str(model), tmp_path) as target:
        models = httpx.get(f"{target.base_url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [model.name]
        reply = httpx.post(f"{target.base_url}/v1/chat/completions", timeout=300, json={
            "model": model.name, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_url(make_image(448, 448, seed=1))}}]}]})
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 256  # the image's 256 tokens at least
    assert list(cache.glob("modelinfos/*")), "vLLM inspected the architecture and cached what it found"
