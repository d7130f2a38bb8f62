"""What one API key can learn of another's, through the official `openai` client with two keys, A and B, and
what vLLM's `cache_salt` does in the language server; recorded from the servers' own counters, never timed.

One vision and one language server; two gateways in front of them with the same keys: `scoped` (the default,
caches per tenant) and `shared` (`share_caches_across_tenants = true`, as every deployment was before tenants).

- stored responses: A stores one; B's GET, `previous_response_id` and DELETE on it; A's GET;
- images: A sends a fresh image, then B the same request, then A again (scoped); A then B (shared): each reply's
  `cached_tokens`, and how many images the vision server encoded and the gateway counted by source;
- vLLM's `cache_salt`: one prompt sent to the language server (gRPC) under salt one, salt two, salt one again
  and no salt: the cached tokens vLLM reports per request and its prefix-cache counters.

    python -m benchmarks.tenant_isolation --model checkpoints/tiny \
        --out benchmarks/results/tenant_isolation_cpu_tiny.json
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import openai
import typer

from benchmarks.toolkit import prometheus
from benchmarks.toolkit.chat import served_model_at
from benchmarks.toolkit.documents import command_line, print_and_write
from benchmarks.toolkit.images import image_url
from benchmarks.toolkit.machine import load_average, machine, versions
from benchmarks.toolkit.options import CheckpointOption, OutOption
from launcher import Servers, Stack, command_lines, free_port, http_ready, wait_until
from proto import dvd_pb2, dvd_pb2_grpc

KEY_A, KEY_B = "sk-bench-isolation-a-3f9e", "sk-bench-isolation-b-0c47"
TENANTS = f'[[tenants]]\nname = "a"\nkey = "{KEY_A}"\n\n[[tenants]]\nname = "b"\nkey = "{KEY_B}"\n'


def launch(model: str, folder: Path) -> tuple[Servers, Stack, dict[str, str]]:
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), vision_metrics_port=free_port(), language_metrics_port=free_port())
    (folder / "scoped.toml").write_text(TENANTS)
    (folder / "shared.toml").write_text("share_caches_across_tenants = true\n" + TENANTS)
    shared_port = free_port()
    commands = stack.commands()
    commands["gateway"] += ["--config", str(folder / "scoped.toml")]
    commands["shared"] = command_lines.gateway([f"127.0.0.1:{stack.vision_port}"],
                                               [f"127.0.0.1:{stack.language_port}"], port=shared_port,
                                               config=str(folder / "shared.toml"))
    return Servers(commands, log_dir=folder), stack, {"scoped": stack.gateway_url,
                                                      "shared": f"http://127.0.0.1:{shared_port}"}


def status_of(call) -> int:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def stored_responses(url: str, model: str) -> dict:
    a, b = (openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) for key in (KEY_A, KEY_B))
    made = a.responses.create(model=model, input="a private question", max_output_tokens=4)
    return {"b_get": status_of(lambda: b.responses.retrieve(made.id)),
            "b_previous_response_id": status_of(
                lambda: b.responses.create(model=model, input="and?", previous_response_id=made.id)),
            "b_delete": status_of(lambda: b.responses.delete(made.id)),
            "a_get": status_of(lambda: a.responses.retrieve(made.id)),
            "a_delete": status_of(lambda: a.responses.delete(made.id)),
            "a_get_after_delete": status_of(lambda: a.responses.retrieve(made.id))}


class Pages:
    """The counters of one gateway, the vision server and the language server."""

    def __init__(self, gateway: str, stack: Stack):
        self.urls = {"gateway": f"{gateway}/metrics",
                     "vision": f"http://127.0.0.1:{stack.vision_metrics_port}/metrics",
                     "language": f"http://127.0.0.1:{stack.language_metrics_port}/metrics"}

    def read(self) -> dict[str, float]:
        vision, language = prometheus.counters(self.urls["vision"]), prometheus.counters(self.urls["language"])
        sources = prometheus.counter_by(self.urls["gateway"], "dvd_gateway_images_total", "source")
        features = prometheus.counter_by(self.urls["language"], "dvd_language_feature_cache_images_total", "result")
        return {"vision_images_encoded": vision.get("dvd_vision_images_total", 0.0),
                "vision_dedup_images": vision.get("dvd_vision_dedup_images_total", 0.0),
                "gateway_images_vision": sources.get("vision", 0.0), "gateway_images_cache": sources.get("cache", 0.0),
                "feature_cache_hits": features.get("hit", 0.0), "feature_cache_misses": features.get("miss", 0.0),
                "vllm_prefix_cache_queries": language.get("vllm:prefix_cache_queries_total", 0.0),
                "vllm_prefix_cache_hits": language.get("vllm:prefix_cache_hits_total", 0.0)}


def settled(pages: Pages, before: dict[str, float], prompt_tokens: int) -> dict[str, float]:
    """The counters' growth since `before`, once vLLM's prefix-cache counters include the last request."""
    wait_until(lambda: pages.read()["vllm_prefix_cache_queries"] >= before["vllm_prefix_cache_queries"]
               + prompt_tokens, 30, "vLLM counts the request's prefix-cache lookup")
    return {name: value - before[name] for name, value in pages.read().items()}


def image_turns(url: str, stack: Stack, model: str, turns: list[str], seed: int) -> list[dict]:
    """The same request (one fresh 448x448 image, the same question, 4 tokens) by each key of `turns` in order."""
    pages, image = Pages(url, stack), image_url(448, 448, seed, "photo")
    rows = []
    for who in turns:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key={"a": KEY_A, "b": KEY_B}[who], max_retries=0)
        before = pages.read()
        reply = client.chat.completions.create(
            model=model, max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                   {"type": "text", "text": "Describe the picture in one line."}]}])
        usage = reply.usage
        rows.append({"key": who, "prompt_tokens": usage.prompt_tokens,
                     "image_tokens": usage.prompt_tokens_details.image_tokens,
                     "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                     **settled(pages, before, usage.prompt_tokens)})
    return rows


def generate(port: int, prompt: str, salt: str) -> dvd_pb2.Usage:
    """One text-only Generate straight to the language server at `port`, 2 tokens, with vLLM's cache salt `salt`."""

    async def call():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = dvd_pb2_grpc.LanguageServiceStub(channel).Generate(dvd_pb2.GenerateRequest(
                request_id=uuid.uuid4().hex, cache_salt=salt,
                messages=[dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(text=prompt)])],
                sampling=dvd_pb2.SamplingParams(max_tokens=2, ignore_eos=True, temperature=0)), timeout=120)
            return [r.usage async for r in stream if r.HasField("usage")][-1]

    return asyncio.run(call())


def salted_prompts(stack: Stack, gateway: str) -> list[dict]:
    pages, prompt = Pages(gateway, stack), " ".join(f"word{uuid.uuid4().hex[:4]}" for _ in range(300))
    rows = []
    for salt in ("salt-one", "salt-two", "salt-one", ""):
        before = pages.read()
        usage = generate(stack.language_port, prompt, salt)
        growth = settled(pages, before, usage.prompt_tokens)
        rows.append({"cache_salt": salt or None, "prompt_tokens": usage.prompt_tokens,
                     "cached_tokens": usage.cached_tokens,
                     "vllm_prefix_cache_queries": growth["vllm_prefix_cache_queries"],
                     "vllm_prefix_cache_hits": growth["vllm_prefix_cache_hits"]})
    return rows


def main(model: CheckpointOption = "checkpoints/tiny", seed: int = 500, out: OutOption = None) -> None:
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="dvd-tenant-isolation-") as folder:
        servers, stack, urls = launch(model, Path(folder))
        ready = [http_ready(url, headers={"authorization": f"Bearer {KEY_A}"}) for url in urls.values()]
        start = time.perf_counter()
        with servers.running(lambda: all(check() for check in ready)):
            served = served_model_at(urls["scoped"], KEY_A)
            results = {"stored_response_statuses": stored_responses(urls["scoped"], served),
                       "image_scoped": image_turns(urls["scoped"], stack, served, ["a", "b", "a"], seed),
                       "image_shared": image_turns(urls["shared"], stack, served, ["a", "b"], seed + 1),
                       "language_server_cache_salt": salted_prompts(stack, urls["scoped"])}
        seconds = time.perf_counter() - start
    document = {"command": command_line(), "machine": machine(), "versions": versions(),
                "load_average_before": load_before, "load_average_after": load_average(),
                "note": "counts from the servers' Prometheus counters, never timings; the machine is shared with "
                        "other work (load average above), which changes no count",
                "seconds": round(seconds, 1), "results": results}
    print_and_write(document, out)


if __name__ == "__main__":
    typer.run(main)
