"""Repeated images end to end: a chat that resends its images on every turn encodes and sends each once.

One vision server and one language server (real vLLM), two gateways in front of them: `cached` (the
default, content keys on) and `uncached` (`--no-feature-cache`), so both runs see the same servers; and a
second vision server with other vision weights behind a third gateway (`retrained`), for the same
language server.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import openai
import pytest

from checkpoint.generate import write_checkpoint
from conftest import data_url, encode_to_local_receiver, free_port, make_image, metric
from launcher import Stack, http_ready, wait_until

pytestmark = pytest.mark.slow


@dataclass
class CacheStack(Stack):
    uncached_port: int = 0
    retrained_model: str = ""  # a checkpoint with other vision weights
    retrained_vision_port: int = 0
    retrained_port: int = 0  # its gateway, in front of the same language server

    def commands(self) -> dict[str, list[str]]:
        commands = super().commands()
        dvd = [sys.executable, "-m", "dvd.cli"]
        language = ["--language-server", f"{self.host}:{self.language_port}"]
        commands["uncached"] = dvd + ["gateway", "--port", str(self.uncached_port),
                                      "--vision-server", f"{self.host}:{self.vision_port}", *language,
                                      "--no-feature-cache"]
        commands["retrained-vision"] = dvd + ["vision-server", "--model", self.retrained_model,
                                              "--port", str(self.retrained_vision_port)]
        commands["retrained"] = dvd + ["gateway", "--port", str(self.retrained_port),
                                       "--vision-server", f"{self.host}:{self.retrained_vision_port}", *language]
        return commands


# The language server's feature cache holds six one-tile images (bf16, hidden size 64: 32 KiB each), so that a
# test can evict an image by sending six others.
TILE_BYTES = 256 * 64 * 2
CACHE_BYTES = 6 * TILE_BYTES


@pytest.fixture(scope="module")
def running(tiny_checkpoints, tmp_path_factory):
    retrained = write_checkpoint(tmp_path_factory.mktemp("retrained") / "tiny", "tiny", "custom", seed=1)
    stack = CacheStack(model=str(tiny_checkpoints["custom"]), gateway_port=free_port(), vision_port=free_port(),
                       language_port=free_port(), feature_port=free_port(), vision_metrics_port=free_port(),
                       language_metrics_port=free_port(), uncached_port=free_port(), retrained_model=str(retrained),
                       retrained_vision_port=free_port(), retrained_port=free_port())
    servers = stack.servers(tmp_path_factory.mktemp("feature-cache-logs"),
                            {"DVD_LANGUAGE_FEATURE_CACHE_BYTES": str(CACHE_BYTES)})
    with servers.running(lambda: all(ready() for ready in gateways_ready(stack))):
        yield stack, servers


@pytest.fixture(scope="module")
def stack(running) -> CacheStack:
    return running[0]


def gateways_ready(stack: CacheStack) -> list:
    """Each gateway's readiness: its vision server and the language server up."""
    health = {"vision_servers_up": 1, "language_servers_up": 1}
    return [http_ready(f"http://127.0.0.1:{port}", health=health)
            for port in (stack.gateway_port, stack.uncached_port, stack.retrained_port)]


class Counters:
    """Deltas of the servers' counters across a block of requests."""

    NAMES = {"encoded": ("vision", "dvd_vision_images_total"),
             "dedup": ("vision", "dvd_vision_dedup_images_total"),
             "received": ("language", "dvd_language_features_received_total"),
             "hits": ("language", "dvd_language_feature_cache_images_total")}

    def __init__(self, stack: CacheStack):
        self._urls = {"vision": f"http://127.0.0.1:{stack.vision_metrics_port}/metrics",
                      "language": f"http://127.0.0.1:{stack.language_metrics_port}/metrics"}
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        values = {name: metric(self._urls[server], sample) for name, (server, sample) in self.NAMES.items()}
        values["hits"] = metric(self._urls["language"], "dvd_language_feature_cache_images_total", result="hit")
        return values

    def delta(self) -> dict[str, float]:
        now = self._read()
        return {name: now[name] - self._start[name] for name in now}


def ask(port: int, model: str, messages: list[dict], max_tokens: int = 8):
    """Greedy, exactly `max_tokens` tokens (ignore_eos), with each token's logprob entry to compare by."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                          logprobs=True, extra_body={"ignore_eos": True})


def tokens(reply) -> list[tuple[str, tuple[int, ...]]]:
    """The reply's tokens, each as its text and its bytes."""
    return [(entry.token, tuple(entry.bytes or ())) for entry in reply.choices[0].logprobs.content]


def chat_turns(port: int, model: str, pictures, turns: int = 3):
    """A chat that resends its pictures on every turn; returns each turn's reply."""
    images = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]
    questions = ["Describe both pictures.", "What differs between them?", "Which one is brighter?"]
    messages, replies = [], []
    for question in questions[:turns]:
        messages.append({"role": "user", "content": [*images, {"type": "text", "text": question}]})
        reply = ask(port, model, messages)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        replies.append(reply)
    return replies


def served_model(stack: Stack) -> str:
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused")
    return client.models.list().data[0].id


def test_a_three_turn_chat_encodes_and_sends_each_image_once_with_the_tokens_of_an_uncached_run(stack):
    model = served_model(stack)
    pictures = [make_image(896, 448, 31), make_image(448, 448, 32)]  # 2 + 1 tiles and 1 tile

    counters = Counters(stack)
    cached = chat_turns(stack.gateway_port, model, pictures)
    seen = counters.delta()
    assert seen["encoded"] == 2 and seen["received"] == 2, seen  # turns 2 and 3 encode and send nothing
    assert seen["hits"] == 4, seen
    for number, (earlier, turn) in enumerate(zip(cached, cached[1:]), start=2):
        assert turn.usage.prompt_tokens_details.image_tokens == number * 1024  # 4 tiles per turn, resent
        # the earlier turn's prompt, its images included, comes from vLLM's prefix cache (whole blocks)
        cached_tokens = turn.usage.prompt_tokens_details.cached_tokens
        assert earlier.usage.prompt_tokens_details.image_tokens <= cached_tokens <= earlier.usage.prompt_tokens

    counters = Counters(stack)
    uncached = chat_turns(stack.uncached_port, model, pictures)
    assert counters.delta()["encoded"] == 2 + 4 + 6  # every turn resends every image
    assert [tokens(r) for r in cached] == [tokens(r) for r in uncached]
    assert all(len(tokens(r)) == 8 for r in cached)
    assert [r.usage.prompt_tokens for r in cached] == [r.usage.prompt_tokens for r in uncached]


def test_an_image_given_twice_in_one_request_is_encoded_and_sent_once(stack):
    model = served_model(stack)
    picture = {"type": "image_url", "image_url": {"url": data_url(make_image(200, 200, 33))}}
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused")
    counters = Counters(stack)
    reply = client.chat.completions.create(model=model, max_tokens=2, messages=[
        {"role": "user", "content": [picture, picture, {"type": "text", "text": "Same?"}]}])
    assert reply.usage.prompt_tokens_details.image_tokens == 2 * 256
    assert counters.delta()["encoded"] == 1 and counters.delta()["received"] == 1


def test_the_vision_server_encodes_identical_images_of_one_request_once(stack):
    counters = Counters(stack)
    picture = make_image(500, 300, 34)
    reply, received = encode_to_local_receiver(stack.vision_port, [picture, picture])
    assert [e.image_index for e in reply.images] == [0, 1] and len(received) == 2
    first, second = sorted(received, key=lambda item: item.image_index)
    assert first.features.equal(second.features) and first.tile_tokens == second.tile_tokens
    assert counters.delta()["dedup"] == 1


def image_part(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(make_image(220, 220, seed))}}  # one tile


def test_an_image_evicted_or_lost_in_a_language_server_restart_is_encoded_again_for_the_same_tokens(running):
    """The gateway counts on the language server holding an earlier turn's image. Once the server's cache has
    evicted it (six newer images fill the budget), and again once a restart has emptied the cache, the server
    says the image is missing, it is encoded and sent again, and the answer is token for token the one the
    uncached gateway gives."""
    stack, servers = running
    model = served_model(stack)
    old, new = image_part(35), image_part(36)
    ask(stack.gateway_port, model, [{"role": "user", "content": [old]}], max_tokens=1)
    counters = Counters(stack)
    ask(stack.gateway_port, model, [{"role": "user", "content": [old, {"type": "text", "text": "Again."}]}], 1)
    assert counters.delta()["hits"] == 1  # held, so far

    for seed in range(40, 46):  # six newer images: the oldest, `old`, is evicted
        ask(stack.gateway_port, model, [{"role": "user", "content": [image_part(seed)]}], max_tokens=1)
    language_metrics = f"http://127.0.0.1:{stack.language_metrics_port}/metrics"
    assert metric(language_metrics, "dvd_language_feature_cache_bytes") == CACHE_BYTES
    conversation = [{"role": "user", "content": [old]}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [new, {"type": "text", "text": "And this one?"}]}]
    want = tokens(ask(stack.uncached_port, model, conversation))
    counters = Counters(stack)
    reply = ask(stack.gateway_port, model, conversation)
    assert reply.usage.prompt_tokens_details.image_tokens == 2 * 256
    seen = counters.delta()
    assert seen["encoded"] == 2 and seen["received"] == 2 and seen["hits"] == 0, seen
    assert tokens(reply) == want and len(want) == 8

    servers.stop("language-server")
    wait_until(lambda: not any(ready() for ready in gateways_ready(stack)), 60,
               "every gateway sees the language server gone")
    servers.start("language-server")
    servers.wait_until(lambda: all(ready() for ready in gateways_ready(stack)), 600,
                       "every gateway re-admits the restarted language server")
    counters = Counters(stack)  # the restarted server counts from zero
    reply = ask(stack.gateway_port, model, conversation)
    seen = counters.delta()
    assert seen["received"] == 2 and seen["hits"] == 0, seen
    assert tokens(reply) == want


def test_features_cached_for_other_vision_weights_are_not_used(stack):
    """The same image through a vision server with other weights is encoded again, not taken from the
    language server's cache; each set of weights then has its own cached features."""
    model = served_model(stack)
    picture = {"type": "image_url", "image_url": {"url": data_url(make_image(240, 240, 37))}}
    messages = [{"role": "user", "content": [picture, {"type": "text", "text": "What is it?"}]}]
    clients = {name: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
               for name, port in (("original", stack.gateway_port), ("retrained", stack.retrained_port))}
    seen = []
    for name in ("original", "retrained", "retrained", "original"):
        counters = Counters(stack)
        clients[name].chat.completions.create(model=model, max_tokens=2, messages=messages)
        delta = counters.delta()
        seen.append((name, delta["received"], delta["hits"]))
    assert seen == [("original", 1, 0), ("retrained", 1, 0), ("retrained", 0, 1), ("original", 0, 1)]
