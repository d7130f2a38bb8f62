"""Lossless decoupling for the mixture-of-experts language families: a tiny Qwen3-MoE (InternVL3.5-30B-A3B,
-241B-A28B) and a tiny GPT-OSS (InternVL3.5-20B-A4B: attention sinks, a 128-token sliding window on every other
layer, biased experts with a clamped SwiGLU, the o200k_harmony tokenizer) checkpoint, each served through the
gateway, the vision server, the ZeroMQ wire and vLLM, against transformers running the whole HF-format model
(tests/coupled.py), as tests/test_lossless.py does for the dense family.

One stack at a time: the stack fixture is parametrized by family, so pytest stops one family's servers before it
starts the next one's. fp32 on both sides; both generate exactly NEW_TOKENS tokens (EOS ignored).
"""

from __future__ import annotations

import openai
import pytest
import torch

from checkpoint.generate import write_checkpoint
from conftest import encode_to_local_receiver, free_port, make_image
from coupled import CoupledReference, greedy_chat, mismatches
from launcher import Stack

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 2e-3  # as tests/test_lossless.py: fp32 on both sides, different summation orders
NEW_TOKENS = 8
# vLLM's parsers for GPT-OSS's output (`vllm serve --tool-call-parser openai --reasoning-parser openai_gptoss`):
# hermes and deepseek_r1 refuse a tokenizer without <tool_call> and <think>.
PARSERS = {
    "tiny-moe": {},
    "tiny-gpt-oss": {"DVD_LANGUAGE_TOOL_CALL_PARSER": "openai", "DVD_LANGUAGE_REASONING_PARSER": "openai_gptoss"},
}

IMAGES = {
    "wide": make_image(900, 300, seed=31),  # 3x1 grid + thumbnail: 1024 image tokens, 8 sliding windows
    "tall": make_image(320, 760, seed=32),  # 1x2 grid + thumbnail
}
CASES = [
    ("Describe the image.", ["wide"]),
    ("Compare the two images.", ["tall", "wide"]),
    ("Tell me a short story.", []),
]


@pytest.fixture(scope="module", params=list(PARSERS))
def family(request, tmp_path_factory):
    """(preset, its HF-format checkpoint, the running stack, the coupled reference)."""
    preset = request.param
    path = write_checkpoint(tmp_path_factory.mktemp(preset) / "hf", preset, "hf", seed=0)
    stack = Stack(model=str(path), gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), dtype="float32", feature_dtype="float32")
    reference = CoupledReference(path)
    with stack.servers(tmp_path_factory.mktemp(f"{preset}-logs"), env=PARSERS[preset]).running(stack.ready()):
        yield preset, path, stack, reference


def test_the_coupled_model_runs_the_family_s_own_language_model(family):
    """The reference is the family's transformers model, so that equality below means what it says."""
    preset, _, _, reference = family
    language_model = type(reference.model.model.language_model).__name__
    assert language_model == {"tiny-moe": "Qwen3MoeModel", "tiny-gpt-oss": "GptOssModel"}[preset]


@pytest.mark.parametrize("name", list(IMAGES))
def test_sent_features_equal_transformers_get_image_features(family, name):
    _, _, stack, reference = family
    pixels = reference.pixel_values([IMAGES[name]])[0]
    want = reference.image_features(pixels)
    reply, received = encode_to_local_receiver(stack.vision_port, IMAGES[name])
    assert reply.images[0].num_tiles == pixels.shape[0]
    got = received[0].features
    assert got.dtype == torch.float32 and got.shape == want.shape
    print(f"{family[0]} {name}: features max abs diff {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("text,names", CASES, ids=[f"{len(n)}img" for _, n in CASES])
def test_greedy_output_equals_coupled_inference(family, text, names):
    """Tokens and top logprobs through gateway -> vision -> wire -> vLLM equal the coupled run."""
    _, _, stack, reference = family
    images = [IMAGES[n] for n in names]
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=600)
    got = greedy_chat(client, text, images, NEW_TOKENS)
    want = reference.generate(text, images, NEW_TOKENS)
    print(f"{family[0]} {len(images)} image(s): {got.text!r} vs {want.text!r}, max logprob diff "
          f"{max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)):.3g}")
    assert mismatches(got, want, LOGPROB_ATOL) == []


def test_another_image_s_output_is_caught_by_the_comparison(family):
    """DvD's answer about one image differs from the coupled answer about another: the comparison can fail."""
    _, _, stack, reference = family
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=600)
    got = greedy_chat(client, "Describe the image.", [IMAGES["tall"]], NEW_TOKENS)
    assert mismatches(got, reference.generate("Describe the image.", [IMAGES["wide"]], NEW_TOKENS), LOGPROB_ATOL)
