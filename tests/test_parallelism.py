"""A language server across devices through vLLM's own engine arguments: `dvd up --tensor-parallel-size 2` (and
`--pipeline-parallel-size 2`) serves a language server whose engine spans two ranks (on CPU, one process per
core) and answers as a single-rank one does, through the gateway and the official `openai` client: the same
prompt tokens and greedy tokens for 0, 1 and 2 images, and every rank's parameters, none of them the vision
tower's (pipeline stages hold different ones).

Float32 (`--dtype float32`): the partitions of the computation then round alike far below the gap between the
top two logits, so equal greedy tokens test the partition rather than luck. Pipeline parallelism on vLLM's CPU
backend needs `--no-enforce-eager`: a later stage's input buffers are allocated in the compile warm-up, which
eager mode skips. Run the module alone: it needs both cores.
"""

from __future__ import annotations

import grpc
import openai
import pytest

from conftest import data_url, free_port, make_image
from language_server.server import VISION_PREFIXES
from launcher import Servers, Stack
from proto import dvd_pb2, dvd_pb2_grpc

pytestmark = pytest.mark.slow
MAX_TOKENS = 12
# vLLM's CPU backend: one core list per rank; its engine's queue on loopback (else the machine's address).
TP2_ENVIRONMENT = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_HOST_IP": "127.0.0.1"}
IMAGES = [make_image(448, 448, 1), make_image(1344, 896, 2)]  # 1 tile; 3x2 tiles + thumbnail


def _conversations() -> dict[int, list[dict]]:
    """A user turn with 0, 1 and 2 images, by image count."""
    conversations = {}
    for count in (0, 1, 2):
        parts = [{"type": "text", "text": f"Describe these {count} pictures."}]
        parts += [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in IMAGES[:count]]
        conversations[count] = [{"role": "user", "content": parts}]
    return conversations


def _serve_and_ask(checkpoint: str, engine_args: tuple[str, ...], env: dict[str, str], log_dir) -> dict:
    """Start `dvd up` with `engine_args`, ask every conversation greedily; what came back, and the language
    server's parameter names."""
    stack = Stack(model=checkpoint, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), engine_args=("--dtype", "float32", *engine_args))
    answers = {}
    with Servers({"dvd up": stack.up_command()}, log_dir=log_dir, env={"VLLM_HOST_IP": "127.0.0.1", **env},
                 stop_timeout_s=60).running(stack.ready()):
        client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        for count, messages in _conversations().items():
            reply = client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
                extra_body={"ignore_eos": True})
            answers[count] = reply
        with grpc.insecure_channel(f"{stack.host}:{stack.language_port}") as channel:
            description = dvd_pb2_grpc.LanguageServiceStub(channel).Describe(dvd_pb2.DescribeRequest(), timeout=60)
    return {"answers": answers, "parameter_names": list(description.parameter_names)}


PARALLELISM = {"tensor": ("--tensor-parallel-size", "2"), "pipeline": ("--pipeline-parallel-size", "2",
                                                                      "--no-enforce-eager")}


@pytest.fixture(scope="module")
def served(tiny_checkpoints, tmp_path_factory) -> dict[str, dict]:
    """The same requests to a single-rank language server ("one") and to two-rank ones, by kind of parallelism."""
    checkpoint = str(tiny_checkpoints["custom"])
    served = {"one": _serve_and_ask(checkpoint, (), {}, tmp_path_factory.mktemp("one-rank-logs"))}
    for kind, engine_args in PARALLELISM.items():
        served[kind] = _serve_and_ask(checkpoint, engine_args, TP2_ENVIRONMENT, tmp_path_factory.mktemp(f"{kind}-logs"))
    return served


@pytest.mark.parametrize("images", [0, 1, 2])
@pytest.mark.parametrize("kind", list(PARALLELISM))
def test_two_ranks_give_the_prompt_tokens_and_greedy_tokens_of_one(served, kind, images):
    one, two = served["one"]["answers"][images], served[kind]["answers"][images]
    assert one.usage.prompt_tokens == two.usage.prompt_tokens
    assert (one.usage.prompt_tokens_details.image_tokens or 0) == {0: 0, 1: 256, 2: 256 + 7 * 256}[images]
    assert one.usage.completion_tokens == two.usage.completion_tokens == MAX_TOKENS
    tokens = [[t.token for t in answer.choices[0].logprobs.content] for answer in (one, two)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == MAX_TOKENS
    assert one.choices[0].message.content == two.choices[0].message.content
    for a, b in zip(one.choices[0].logprobs.content, two.choices[0].logprobs.content, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


@pytest.mark.parametrize("kind", list(PARALLELISM))
def test_every_rank_reports_its_parameters_and_none_is_the_vision_towers(served, kind):
    names = served[kind]["parameter_names"]
    assert not [n for n in names if n.startswith(VISION_PREFIXES)]
    # Tensor-parallel ranks hold shards of the same parameters, pipeline stages a layer each: all of them together.
    assert sorted(names) == sorted(served["one"]["parameter_names"])
    assert any(".layers.0." in n for n in names) and any(".layers.1." in n for n in names)
