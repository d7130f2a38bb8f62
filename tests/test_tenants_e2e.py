"""Tenants end to end, through the official `openai` client with two keys: a stored response is its creator's,
an image one tenant sent is neither cached nor shared for another (unless the deployment shares caches), and
vLLM's `cache_salt` keeps two salts' prompts from sharing prefix blocks, by vLLM's own prefix-cache counters.

One vision server and one language server (real vLLM); two gateways in front of them with the same two keys:
`scoped` (the default: caches per tenant) and `shared` (`share_caches_across_tenants = true`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from benchmarks.tenant_isolation import generate
from conftest import data_url, free_port, make_image, metric
from launcher import Stack, command_lines, http_ready, wait_until
from proto import dvd_pb2

pytestmark = pytest.mark.slow
ALPHA, BETA = "sk-e2e-alpha-0b7d51f2", "sk-e2e-beta-c93a0e64"
TENANTS = f'[[tenants]]\nname = "alpha"\nkey = "{ALPHA}"\n\n[[tenants]]\nname = "beta"\nkey = "{BETA}"\n'
QUESTION = "Describe the picture in one line."


@dataclass
class TenantStack(Stack):
    shared_port: int = 0
    config_dir: str = ""

    def config(self, name: str, text: str) -> str:
        path = Path(self.config_dir) / name
        path.write_text(text)
        return str(path)

    def commands(self) -> dict[str, list[str]]:
        commands = super().commands()
        servers = [f"{self.host}:{self.vision_port}"], [f"{self.host}:{self.language_port}"]
        commands["gateway"] += ["--config", self.config("scoped.toml", TENANTS)]
        commands["shared"] = command_lines.gateway(
            *servers, port=self.shared_port,
            config=self.config("shared.toml", "share_caches_across_tenants = true\n" + TENANTS))
        return commands

    def url(self, gateway: str) -> str:
        return self.gateway_url if gateway == "scoped" else f"http://{self.host}:{self.shared_port}"

    def client(self, gateway: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url(gateway)}/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("tenants-e2e-logs")
    stack = TenantStack(model=str(tiny_checkpoints["custom"]), gateway_port=free_port(), vision_port=free_port(),
                        language_port=free_port(), feature_port=free_port(), vision_metrics_port=free_port(),
                        language_metrics_port=free_port(), shared_port=free_port(), config_dir=str(logs))
    ready = [http_ready(stack.url(g), headers={"authorization": f"Bearer {ALPHA}"}) for g in ("scoped", "shared")]
    with stack.servers(logs).running(lambda: all(check() for check in ready)):
        yield stack


@pytest.fixture(scope="module")
def model(stack) -> str:
    return stack.client("scoped", ALPHA).models.list().data[0].id


class Counters:
    """Deltas of the servers' and one gateway's counters across a block of requests."""

    def __init__(self, stack: TenantStack, gateway: str):
        self.pages = {"vision": f"http://127.0.0.1:{stack.vision_metrics_port}/metrics",
                      "language": f"http://127.0.0.1:{stack.language_metrics_port}/metrics",
                      "gateway": f"{stack.url(gateway)}/metrics"}
        self.start = self.read()

    def read(self) -> dict[str, float]:
        return {"encoded": metric(self.pages["vision"], "dvd_vision_images_total"),
                "dedup": metric(self.pages["vision"], "dvd_vision_dedup_images_total"),
                "feature_misses": metric(self.pages["language"], "dvd_language_feature_cache_images_total",
                                         result="miss"),
                "gateway_vision": metric(self.pages["gateway"], "dvd_gateway_images_total", source="vision"),
                "gateway_cache": metric(self.pages["gateway"], "dvd_gateway_images_total", source="cache")}

    def delta(self) -> dict[str, float]:
        """The change since the last call (or since made)."""
        now = self.read()
        delta = {name: now[name] - self.start[name] for name in now}
        self.start = now
        return delta


def ask_about(client: openai.OpenAI, model: str, image_url: str):
    """One image and the same question, 4 output tokens whatever the random model says."""
    return client.chat.completions.create(model=model, max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
                                          messages=[{"role": "user", "content": [
                                              {"type": "image_url", "image_url": {"url": image_url}},
                                              {"type": "text", "text": QUESTION}]}])


def cached(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


def test_another_key_gets_404_for_a_stored_response_by_get_previous_response_id_and_delete(stack, model):
    alpha, beta = stack.client("scoped", ALPHA), stack.client("scoped", BETA)
    made = alpha.responses.create(model=model, max_output_tokens=4, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": data_url(make_image(448, 448, 280))},
        {"type": "input_text", "text": "a private picture"}]}])
    for attempt in (lambda: beta.responses.retrieve(made.id),
                    lambda: beta.responses.create(model=model, input="and?", previous_response_id=made.id),
                    lambda: beta.responses.delete(made.id)):
        with pytest.raises(openai.NotFoundError, match="is not stored here"):
            attempt()
    follow = alpha.responses.create(model=model, input="and?", max_output_tokens=4, previous_response_id=made.id)
    assert follow.usage.input_tokens > made.usage.input_tokens >= 256  # A's history, its image included
    assert alpha.responses.retrieve(made.id).id == made.id
    alpha.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError, match="is not stored here"):
        alpha.responses.retrieve(made.id)


def test_an_image_one_tenant_sent_is_neither_cached_nor_encoded_once_for_another(stack, model):
    """A sends an image; B's identical request hits nothing (0 cached tokens, encoded again, a feature-cache miss),
    while A's repeat hits everything that A's first turn left: the entries were there, only not for B."""
    image = data_url(make_image(448, 448, 281))  # one tile: 256 image tokens
    alpha, beta = stack.client("scoped", ALPHA), stack.client("scoped", BETA)
    counters = Counters(stack, "scoped")
    first = ask_about(alpha, model, image)
    assert counters.delta()["encoded"] == 1
    other = ask_about(beta, model, image)
    seen_by_beta = counters.delta()
    again = ask_about(alpha, model, image)
    seen_by_alpha = counters.delta()

    assert cached(other) == 0 and other.usage.prompt_tokens == first.usage.prompt_tokens
    assert seen_by_beta == {"encoded": 1, "dedup": 0, "feature_misses": 1, "gateway_vision": 1, "gateway_cache": 0}
    assert first.usage.prompt_tokens_details.image_tokens <= cached(again) <= again.usage.prompt_tokens
    assert seen_by_alpha == {"encoded": 0, "dedup": 0, "feature_misses": 0, "gateway_vision": 0, "gateway_cache": 1}


def test_with_caches_shared_across_tenants_the_other_tenant_hits_them(stack, model):
    image = data_url(make_image(448, 448, 282))
    counters = Counters(stack, "shared")
    first = ask_about(stack.client("shared", ALPHA), model, image)
    assert counters.delta()["encoded"] == 1
    other = ask_about(stack.client("shared", BETA), model, image)
    assert first.usage.prompt_tokens_details.image_tokens <= cached(other) <= other.usage.prompt_tokens
    assert counters.delta() == {"encoded": 0, "dedup": 0, "feature_misses": 0, "gateway_vision": 0,
                                "gateway_cache": 1}


def test_vllms_cache_salt_keeps_two_salts_from_sharing_any_prefix_block(stack):
    """The same 300-word prompt under salt one, salt two, salt one again and no salt: only the repeat of salt
    one finds cached blocks, by vLLM's own prefix-cache counters (tokens) and the server's per-request count."""
    page = f"http://127.0.0.1:{stack.language_metrics_port}/metrics"
    prompt = " ".join(f"word{uuid.uuid4().hex[:4]}" for _ in range(300))

    def counted(usage: dvd_pb2.Usage, before: dict[str, float]) -> dict[str, float]:
        """vLLM's prefix-cache counters' growth once they include this request (its prompt queried)."""
        wait_until(lambda: metric(page, "vllm:prefix_cache_queries_total") >= before["queries"] + usage.prompt_tokens,
                   30, "vLLM counts the request's prefix-cache lookup")
        return {"queries": metric(page, "vllm:prefix_cache_queries_total") - before["queries"],
                "hits": metric(page, "vllm:prefix_cache_hits_total") - before["hits"],
                "cached": metric(page, "dvd_language_cached_prompt_tokens_total") - before["cached"]}

    def run(salt: str) -> tuple[dvd_pb2.Usage, dict[str, float]]:
        before = {"queries": metric(page, "vllm:prefix_cache_queries_total"),
                  "hits": metric(page, "vllm:prefix_cache_hits_total"),
                  "cached": metric(page, "dvd_language_cached_prompt_tokens_total")}
        usage = generate(stack.language_port, prompt, salt)
        return usage, counted(usage, before)

    one, two, one_again, unsalted = run("salt-one"), run("salt-two"), run("salt-one"), run("")
    assert one[0].prompt_tokens == two[0].prompt_tokens > 300
    for usage, growth in (one, two, unsalted):
        assert usage.cached_tokens == 0 and growth["hits"] == 0 and growth["cached"] == 0, (usage, growth)
    usage, growth = one_again
    # Every whole block (128 tokens on CPU, 16 on GPU) but the last token's
    assert usage.prompt_tokens - 128 <= usage.cached_tokens < usage.prompt_tokens
    assert growth["hits"] == growth["cached"] == usage.cached_tokens


def test_a_cache_salt_vllm_would_refuse_is_invalid_argument(stack):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        generate(stack.language_port, "hello", "a/b")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt must be at most 128 characters" in refused.value.details()
