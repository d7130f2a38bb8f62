"""Lossless decoupling at the 1B geometry (InternViT-300M + Qwen3-0.6B, random weights, fp32) on CPU.

tests/test_lossless.py's checks at full size, against the same coupled reference (tests/coupled.py): the
features the vision server sends equal transformers' `get_image_features`, and one- and two-image chats
through the gateway (official `openai` client) give the coupled model's greedy tokens. The reference runs
first and is freed before the servers start, so the two never hold memory at the same time.
"""

from __future__ import annotations

import ctypes
import gc
import shutil

import openai
import pytest
import torch

from checkpoint.generate import write_checkpoint
from conftest import encode_to_local_receiver, free_port, make_image
from coupled import CoupledReference, greedy_chat, mismatches
from launcher import Stack

pytestmark = [pytest.mark.slow, pytest.mark.full_size, pytest.mark.timeout(1800)]  # minutes per setup on a shared CPU

NEW_TOKENS = 4
# Both sides fp32. Seen here (2-core AMD EPYC VM, AVX-512): features bit-identical, logprobs within 1e-6 (one float32
# step at -11). The tolerances leave room for other CPUs' kernels and summation orders: features as in
# tests/test_lossless.py (1e-5 relative, 1e-5 of the largest value absolute); logprobs 1e-4, 100x what was seen
# and below the smallest gap seen between the reference's two best tokens (1.4e-3): an error large enough to flip
# a greedy token cannot pass.
FEATURE_RTOL, FEATURE_ATOL = 1e-5, 1e-5
LOGPROB_ATOL = 1e-4
MAX_MODEL_LEN = 4096  # the 1 GiB KV cache holds 4480 tokens of fp32 Qwen3-0.6B, not the default 8192
SLOW_CPU_S = 600  # feature wait and request deadline: one 1B tile takes seconds to a minute on a shared CPU

# Square images: the 1x1 grid fits best, so each is one tile (no thumbnail), 256 image tokens.
IMAGES = {"a": make_image(448, 448, seed=31), "b": make_image(300, 300, seed=32)}
CASES = {"one image": ("Describe the image.", ["a"]), "two images": ("Compare the two images.", ["a", "b"])}


@pytest.fixture(scope="module")
def checkpoint_1b(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("checkpoints-1b") / "1b-hf", "1b", "hf", seed=0)
    yield path
    shutil.rmtree(path)  # 1.7 GB


@pytest.fixture(scope="module")
def expected(checkpoint_1b) -> dict:
    """The coupled run's features of image "a" and its greedy completion of each case, then the model freed."""
    reference = CoupledReference(checkpoint_1b)
    want = {"features": reference.image_features(reference.pixel_values([IMAGES["a"]])[0])}
    for case, (text, names) in CASES.items():
        want[case] = reference.generate(text, [IMAGES[n] for n in names], NEW_TOKENS)
    want["other image"] = reference.generate(CASES["one image"][0], [IMAGES["b"]], NEW_TOKENS)
    del reference
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc keeps ~1.7 GB of freed heap otherwise
    if trim:
        trim(0)
    return want


@pytest.fixture(scope="module")
def stack_1b(checkpoint_1b, expected, tmp_path_factory):  # after `expected`: the reference is gone by now
    stack = Stack(model=str(checkpoint_1b), gateway_port=free_port(), vision_port=free_port(),
                  language_port=free_port(), feature_port=free_port(), dtype="float32", feature_dtype="float32",
                  max_model_len=MAX_MODEL_LEN)
    env = {"DVD_LANGUAGE_FEATURE_TIMEOUT_S": str(SLOW_CPU_S),
           "DVD_GATEWAY_REQUEST_TIMEOUT_S": str(SLOW_CPU_S)}
    with stack.servers(tmp_path_factory.mktemp("1b-stack-logs"), env).running(stack.ready()):
        yield stack


def test_sent_features_equal_transformers_get_image_features_at_1b(stack_1b, expected):
    """The vision server's fp32 features of a 1B-geometry tile equal the coupled model's image features."""
    want = expected["features"]
    reply, received = encode_to_local_receiver(stack_1b.vision_port, IMAGES["a"], timeout_s=SLOW_CPU_S)
    assert reply.images[0].num_tiles == 1
    assert len(received) == 1 and received[0].tile_tokens == [256]
    got = received[0].features
    assert got.dtype == torch.float32 and got.shape == want.shape == (256, 1024)
    torch.testing.assert_close(got, want, rtol=FEATURE_RTOL, atol=FEATURE_ATOL * want.abs().max().item())


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_coupled_inference_at_1b(stack_1b, expected, case):
    """One- and two-image chats through the gateway give the coupled model's greedy tokens and logprobs."""
    text, names = CASES[case]
    client = openai.OpenAI(base_url=f"{stack_1b.gateway_url}/v1", api_key="unused", max_retries=0,
                           timeout=SLOW_CPU_S)
    got = greedy_chat(client, text, [IMAGES[n] for n in names], NEW_TOKENS)
    want = expected[case]
    assert mismatches(got, want, LOGPROB_ATOL) == []


def test_dvd_tells_the_two_images_apart_as_the_coupled_model_does(stack_1b, expected):
    """Image "b" under image "a"'s prompt, through DvD: the coupled model's answer for "b", which the comparison
    tells from its answer for "a", so features sent to the wrong request would fail it."""
    client = openai.OpenAI(base_url=f"{stack_1b.gateway_url}/v1", api_key="unused", max_retries=0,
                           timeout=SLOW_CPU_S)
    got = greedy_chat(client, CASES["one image"][0], [IMAGES["b"]], NEW_TOKENS)
    assert mismatches(got, expected["other image"], LOGPROB_ATOL) == []
    assert mismatches(got, expected["one image"], LOGPROB_ATOL) != []
