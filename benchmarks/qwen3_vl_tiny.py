"""A tiny random Qwen3-VL (2 layers each side) with Qwen3-VL's published processor settings.

    python -m benchmarks.qwen3_vl_tiny OUT TOKENIZER_DIR    # TOKENIZER_DIR holds Qwen's tokenizer.json

Only torch and transformers: `benchmarks/mm_processor.py` runs it with the Python of the vLLM install it measures,
so that install's transformers writes the checkpoint and can read it back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import (
    Qwen2TokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

# Qwen's chat layout: each content item in order, an image as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def write(out: Path, tokenizer_dir: Path) -> Path:
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                intermediate_size=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, deepstack_visual_indexes=[0, 1],
                  num_position_embeddings=2304)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer = Qwen2TokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    settings = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**settings, size={"shortest_edge": 65536, "longest_edge": 16777216}),
        tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(**settings), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    write(Path(sys.argv[1]), Path(sys.argv[2]))
