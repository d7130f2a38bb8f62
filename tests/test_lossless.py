"""Lossless decoupling: DvD's output equals coupled inference of the same HF-format checkpoint.

The reference is transformers running the whole model (vision tower, projector and LLM in one
process, fp32; tests/coupled.py). DvD runs the vision server, the ZeroMQ transport, vLLM and the gateway
as separate processes, with fp32 features on the wire. Both generate exactly NEW_TOKENS tokens (EOS
ignored). Tolerance for log-probabilities: LOGPROB_ATOL (absolute). tests/test_lossless_1b.py does the
same at the 1B geometry.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import openai
import pytest
import torch

from conftest import encode_to_local_receiver, free_port, make_image, png_bytes
from coupled import TOP_K, Completion, CoupledReference, from_openai, greedy_chat, mismatches, user
from launcher import Stack
from proto import dvd_pb2, dvd_pb2_grpc

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 2e-3  # fp32 on both sides; vLLM's CPU kernels and transformers' differ in summation order
NEW_TOKENS = 8

IMAGES = {
    "wide": make_image(900, 300, seed=21),  # 3x1 grid + thumbnail
    "tall": make_image(320, 760, seed=22),  # 1x2 grid + thumbnail
    "small": make_image(120, 90, seed=23),  # 4:3, so a 4x3 grid + thumbnail
}


@pytest.fixture(scope="module")
def hf_stack(tiny_checkpoints, tmp_path_factory):
    stack = Stack(model=str(tiny_checkpoints["hf"]), gateway_port=free_port(), vision_port=free_port(),
                  language_port=free_port(), feature_port=free_port(), dtype="float32", feature_dtype="float32")
    with stack.servers(tmp_path_factory.mktemp("hf-stack-logs")).running(stack.ready()):
        yield stack


@pytest.fixture(scope="module")
def reference(tiny_checkpoints) -> CoupledReference:
    return CoupledReference(tiny_checkpoints["hf"])


@pytest.mark.parametrize("name", list(IMAGES))
def test_sent_features_equal_transformers_get_image_features(hf_stack, reference, name):
    """(a) What the vision server puts on the wire is the coupled model's image features."""
    pixels = reference.pixel_values([IMAGES[name]])[0]
    want = reference.image_features(pixels)

    reply, received = encode_to_local_receiver(hf_stack.vision_port, IMAGES[name])
    assert reply.images[0].num_tiles == pixels.shape[0]
    assert len(received) == 1 and received[0].tile_tokens == [256] * pixels.shape[0]
    got = received[0].features
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


CASES = [
    ("Describe the image.", ["wide"]),
    ("What is in this picture?", ["tall"]),
    ("Name one colour you see.", ["small"]),
    ("Compare the two images.", ["wide", "small"]),
    ("Tell me a short story.", []),
]


@pytest.mark.parametrize("text,names", CASES, ids=[f"{len(n)}img-{i}" for i, (_, n) in enumerate(CASES)])
def test_greedy_output_equals_coupled_inference(hf_stack, reference, text, names):
    """(b) Tokens and top logprobs through gateway -> vision -> wire -> vLLM equal the coupled run."""
    images = [IMAGES[n] for n in names]
    client = openai.OpenAI(base_url=f"{hf_stack.gateway_url}/v1", api_key="unused", max_retries=0)
    got = greedy_chat(client, text, images, NEW_TOKENS)
    assert mismatches(got, reference.generate(text, images, NEW_TOKENS), LOGPROB_ATOL) == []


def test_two_requests_in_flight_each_get_their_own_images(hf_stack, reference):
    """(b) Two concurrent requests, different images: each equals its own coupled run."""
    cases = [("Describe the image.", [IMAGES["wide"]]), ("Describe the image.", [IMAGES["tall"]])]

    async def both():
        client = openai.AsyncOpenAI(base_url=f"{hf_stack.gateway_url}/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        return await asyncio.gather(*[
            client.chat.completions.create(model=model, messages=user(text, images), max_tokens=NEW_TOKENS,
                                           temperature=0, logprobs=True, top_logprobs=TOP_K,
                                           extra_body={"ignore_eos": True})
            for text, images in cases])

    replies = asyncio.run(both())
    for (text, images), reply in zip(cases, replies):
        assert mismatches(from_openai(reply), reference.generate(text, images, NEW_TOKENS), LOGPROB_ATOL) == []


def _generate_with_features_of(stack: Stack, text: str, sent_image, prompt_image_count: int = 1) -> Completion:
    """Encode `sent_image` under a fresh request id straight to the language server, then Generate."""

    async def run() -> Completion:
        rid = uuid.uuid4().hex
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.language_port}") as lang_channel, \
                grpc.aio.insecure_channel(f"127.0.0.1:{stack.vision_port}") as vision_channel:
            language = dvd_pb2_grpc.LanguageServiceStub(lang_channel)
            endpoint = (await language.Describe(dvd_pb2.DescribeRequest())).feature_endpoint
            await dvd_pb2_grpc.VisionServiceStub(vision_channel).Encode(dvd_pb2.EncodeRequest(
                request_id=rid, feature_endpoint=endpoint, images=[dvd_pb2.ImageInput(data=png_bytes(sent_image))]))
            message = dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(text=text)] + [
                dvd_pb2.ContentPart(image=True)] * prompt_image_count)
            sampling = dvd_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=True, top_logprobs=TOP_K,
                                              ignore_eos=True)
            text_out, chosen, top = [], [], []
            async for response in language.Generate(dvd_pb2.GenerateRequest(
                    request_id=rid, messages=[message], sampling=sampling, image_count=prompt_image_count)):
                text_out.append(response.text)
                chosen += [t.logprob for t in response.logprobs]
                top += [[c.logprob for c in t.top] for t in response.logprobs]
            return Completion("".join(text_out), chosen, top)

    return asyncio.run(run())


def test_misrouted_features_are_caught_by_the_comparison(hf_stack, reference):
    """(c) Request B given request A's features no longer equals B's coupled run: the check can fail."""
    text = "Describe the image."
    want_b = reference.generate(text, [IMAGES["tall"]], NEW_TOKENS)
    assert mismatches(_generate_with_features_of(hf_stack, text, IMAGES["tall"]), want_b, LOGPROB_ATOL) == []
    misrouted = _generate_with_features_of(hf_stack, text, IMAGES["wide"])  # A's image under B's prompt
    assert mismatches(misrouted, want_b, LOGPROB_ATOL) != []
