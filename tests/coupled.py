"""The coupled baseline of the lossless tests: transformers running a whole HF-format checkpoint (vision tower,
projector and LLM in one process, fp32), and how its greedy completions are compared with DvD's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from checkpoint.formats import IMAGE_PLACEHOLDER
from checkpoint.geometry import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from conftest import data_url, png_bytes
from language_server.prompt import ChatRenderer, load_chat_template
from vision_server.preprocess import preprocess

TOP_K = 5


@dataclass
class Completion:
    text: str
    logprobs: list[float]  # of the chosen token at each step
    top_logprobs: list[list[float]]  # the TOP_K best log-probabilities at each step, best first


def mismatches(got: Completion, want: Completion, atol: float) -> list[str]:
    """What differs between two greedy completions (empty: same text, log-probabilities equal within `atol`)."""
    problems = []
    if got.text != want.text:
        problems.append(f"text {got.text!r} != {want.text!r}")
    if len(got.logprobs) != len(want.logprobs):
        return problems + [f"{len(got.logprobs)} tokens != {len(want.logprobs)}"]
    for step, (a, b) in enumerate(zip(got.logprobs, want.logprobs)):
        if abs(a - b) > atol:
            problems.append(f"step {step}: chosen logprob {a:.5f} != {b:.5f}")
    for step, (a, b) in enumerate(zip(got.top_logprobs, want.top_logprobs)):
        if len(a) != len(b) or max(abs(x - y) for x, y in zip(a, b)) > atol:
            problems.append(f"step {step}: top logprobs {a} != {b}")
    return problems


class CoupledReference:
    """transformers' InternVLForConditionalGeneration on the whole checkpoint: the coupled baseline.

    It generates exactly `new_tokens` tokens (EOS does not stop it); DvD is asked with `ignore_eos` to match."""

    def __init__(self, path: Path):
        import transformers

        self.model = transformers.InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        self.renderer = ChatRenderer(load_chat_template(path))
        self.tokens_per_tile = self.model.config.image_seq_length
        self.eos_ids = set(json.loads((path / "generation_config.json").read_text())["eos_token_id"])

    def pixel_values(self, images) -> list[torch.Tensor]:
        return [preprocess(png_bytes(image), max_tiles=12) for image in images]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                                      vision_feature_select_strategy="default")
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])  # [tiles * 256, H]

    def generate(self, text: str, images, new_tokens: int) -> Completion:
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
                                      max_new_tokens=new_tokens, eos_token_id=None, output_logits=True,
                                      return_dict_in_generate=True, **kwargs)
        new_ids = out.sequences[0, input_ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
        text_ids = [t for t in new_ids if t not in self.eos_ids]
        return Completion(
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
            logprobs=[lp[t].item() for lp, t in zip(logprobs, new_ids)],
            top_logprobs=[lp.topk(TOP_K).values.tolist() for lp in logprobs],
        )


def from_openai(reply) -> Completion:
    content = reply.choices[0].logprobs.content
    return Completion(text=reply.choices[0].message.content, logprobs=[c.logprob for c in content],
                      top_logprobs=[[t.logprob for t in c.top_logprobs] for c in content])


def user(text: str, images) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": parts}]


def greedy_chat(client, text: str, images, new_tokens: int) -> Completion:
    """A greedy chat completion of exactly `new_tokens` tokens through the official `openai` client."""
    model = client.models.list().data[0].id
    return from_openai(client.chat.completions.create(
        model=model, messages=user(text, images), max_tokens=new_tokens, temperature=0, logprobs=True,
        top_logprobs=TOP_K, extra_body={"ignore_eos": True}))
