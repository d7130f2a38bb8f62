"""Lossless decoupling: DvD's output equals coupled inference of the same HF-format checkpoint.

The reference is transformers running the whole model (vision tower, projector and LLM in one
process, fp32). DvD runs the vision server, the ZeroMQ transport, vLLM and the gateway as separate
processes, with fp32 features on the wire. Tolerance for log-probabilities: LOGPROB_ATOL (absolute).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import grpc
import openai
import pytest
import tokenizers
import torch

from checkpoint.formats import IMAGE_PLACEHOLDER
from checkpoint.presets import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from conftest import data_url, encode_to_local_receiver, free_port, make_image, png_bytes
from language_server.prompt import ChatRenderer, load_chat_template
from launcher import Stack
from proto import dvd_pb2, dvd_pb2_grpc
from vision_server.preprocess import preprocess

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 2e-3  # fp32 on both sides; vLLM's CPU kernels and transformers' differ in summation order
TOP_K = 5
NEW_TOKENS = 8

IMAGES = {
    "wide": make_image(900, 300, seed=21),  # 3x1 grid + thumbnail
    "tall": make_image(320, 760, seed=22),  # 1x2 grid + thumbnail
    "small": make_image(120, 90, seed=23),  # one tile
}


@pytest.fixture(scope="module")
def hf_stack(tiny_checkpoints, tmp_path_factory):
    stack = Stack(model=str(tiny_checkpoints["hf"]), gateway_port=free_port(), vision_port=free_port(),
                  language_port=free_port(), feature_port=free_port(), dtype="float32", feature_dtype="float32")
    with stack.servers(tmp_path_factory.mktemp("hf-stack-logs")).running(stack.ready()):
        yield stack


@dataclass
class Completion:
    text: str
    logprobs: list[float]  # of the chosen token at each step
    top_logprobs: list[list[float]]  # the TOP_K best log-probabilities at each step, best first


def mismatches(got: Completion, want: Completion) -> list[str]:
    """What differs between two greedy completions (empty: equal within LOGPROB_ATOL)."""
    problems = []
    if got.text != want.text:
        problems.append(f"text {got.text!r} != {want.text!r}")
    if len(got.logprobs) != len(want.logprobs):
        return problems + [f"{len(got.logprobs)} tokens != {len(want.logprobs)}"]
    for step, (a, b) in enumerate(zip(got.logprobs, want.logprobs)):
        if abs(a - b) > LOGPROB_ATOL:
            problems.append(f"step {step}: chosen logprob {a:.5f} != {b:.5f}")
    for step, (a, b) in enumerate(zip(got.top_logprobs, want.top_logprobs)):
        if len(a) != len(b) or max(abs(x - y) for x, y in zip(a, b)) > LOGPROB_ATOL:
            problems.append(f"step {step}: top logprobs {a} != {b}")
    return problems


class CoupledReference:
    """transformers' InternVLForConditionalGeneration on the whole checkpoint: the coupled baseline."""

    def __init__(self, path):
        import transformers

        self.model = transformers.InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        self.renderer = ChatRenderer(load_chat_template(path))
        self.tokens_per_tile = 256

    def pixel_values(self, images) -> list[torch.Tensor]:
        return [preprocess(png_bytes(image), max_tiles=12) for image in images]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                                      vision_feature_select_strategy="default")
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])  # [tiles * 256, H]

    def generate(self, text: str, images) -> Completion:
        pixels = self.pixel_values(images)
        content = [{"type": "text", "text": text}] + [{"type": "image"} for _ in images]
        prompt = self.renderer.render([{"role": "user", "content": content}])
        pieces = prompt.split(IMAGE_PLACEHOLDER["hf"])
        assert len(pieces) == len(images) + 1
        expanded = pieces[0]
        for piece, tiles in zip(pieces[1:], pixels):
            expanded += IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (tiles.shape[0] * self.tokens_per_tile) + IMG_END_TOKEN
            expanded += piece
        input_ids = torch.tensor([self.tokenizer.encode(expanded, add_special_tokens=False).ids])
        kwargs = {"pixel_values": torch.cat(pixels)} if images else {}
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                                      **kwargs)
        new_ids = out.sequences[0, input_ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
        eos = {151645, 151643}
        text_ids = [t for t in new_ids if t not in eos]
        return Completion(
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
            logprobs=[lp[t].item() for lp, t in zip(logprobs, new_ids)],
            top_logprobs=[lp.topk(TOP_K).values.tolist() for lp in logprobs],
        )


@pytest.fixture(scope="module")
def reference(tiny_checkpoints) -> CoupledReference:
    return CoupledReference(tiny_checkpoints["hf"])


def from_openai(reply) -> Completion:
    content = reply.choices[0].logprobs.content
    return Completion(text=reply.choices[0].message.content, logprobs=[c.logprob for c in content],
                      top_logprobs=[[t.logprob for t in c.top_logprobs] for c in content])


def user(text: str, images) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": parts}]


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
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=user(text, images), max_tokens=NEW_TOKENS,
                                           temperature=0, logprobs=True, top_logprobs=TOP_K)
    assert mismatches(from_openai(reply), reference.generate(text, images)) == []


def test_two_requests_in_flight_each_get_their_own_images(hf_stack, reference):
    """(b) Two concurrent requests, different images: each equals its own coupled run."""
    cases = [("Describe the image.", [IMAGES["wide"]]), ("Describe the image.", [IMAGES["tall"]])]

    async def both():
        client = openai.AsyncOpenAI(base_url=f"{hf_stack.gateway_url}/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        return await asyncio.gather(*[
            client.chat.completions.create(model=model, messages=user(text, images), max_tokens=NEW_TOKENS,
                                           temperature=0, logprobs=True, top_logprobs=TOP_K)
            for text, images in cases])

    replies = asyncio.run(both())
    for (text, images), reply in zip(cases, replies):
        assert mismatches(from_openai(reply), reference.generate(text, images)) == []


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
            sampling = dvd_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=True, top_logprobs=TOP_K)
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
    want_b = reference.generate(text, [IMAGES["tall"]])
    assert mismatches(_generate_with_features_of(hf_stack, text, IMAGES["tall"]), want_b) == []
    misrouted = _generate_with_features_of(hf_stack, text, IMAGES["wide"])  # A's image under B's prompt
    assert mismatches(misrouted, want_b) != []
