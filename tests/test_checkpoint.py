"""The checkpoint generator writes loadable InternVL3.5 checkpoints in both formats, with the same weights."""

from __future__ import annotations

import json

import jinja2
import pytest
import torch
import transformers  # after language_server.torch_compat, which conftest imports first
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from tokenizers import Tokenizer

import language_server.torch_compat  # noqa: F401  (before transformers imports torchvision)
from checkpoint.config_files import custom_config, hf_config
from checkpoint.formats import IMAGE_PLACEHOLDER, CheckpointConfigError, detect_format, read_model_config
from checkpoint.generate import (
    VIDEO_TOKEN,
    TensorSpec,
    hf_tensors,
    plan_shards,
    tensor_specs,
    video_token_id,
    write_checkpoint,
)
from checkpoint.geometry import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    INTERNVL_ADDED_TOKENS,
    PRESETS,
)

FORMATS = ("hf", "custom")
SMALL_SHARD_BYTES = 100_000  # splits tiny's ~0.4 MB of non-embedding tensors over several shards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: write_checkpoint(root / fmt, "tiny", fmt, seed=0) for fmt in FORMATS}


@pytest.fixture(scope="module")
def hf_model(tiny):
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        tiny["hf"], dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def load_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def render(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    return jinja2.Template(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


# --- tokenizer and chat template --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenizer_has_internvl_tokens_at_their_real_ids(tiny, fmt):
    tokenizer = Tokenizer.from_file(str(tiny[fmt] / "tokenizer.json"))
    for token, token_id in INTERNVL_ADDED_TOKENS.items():
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False).ids.count(token_id) == 1
    assert tokenizer.token_to_id("<|im_end|>") == 151645
    config = json.loads((tiny[fmt] / "tokenizer_config.json").read_text())
    assert (
        config["added_tokens_decoder"][str(INTERNVL_ADDED_TOKENS[IMG_CONTEXT_TOKEN])]["content"]
        == IMG_CONTEXT_TOKEN
    )
    generation = json.loads((tiny[fmt] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]


def test_hf_tokenizer_names_the_processor_tokens(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["hf"])
    assert tokenizer.context_image_token == IMG_CONTEXT_TOKEN
    assert tokenizer.start_image_token == IMG_START_TOKEN and tokenizer.end_image_token == IMG_END_TOKEN
    assert tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) == video_token_id("qwen3")


@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_template_renders_image_parts_as_the_format_placeholder(tiny, fmt):
    template = (tiny[fmt] / "chat_template.jinja").read_text()
    assert json.loads((tiny[fmt] / "tokenizer_config.json").read_text())["chat_template"] == template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "image"}],
        },
    ]
    p = IMAGE_PLACEHOLDER[fmt]
    assert render(template, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{p}\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        f"<|im_start|>user\nAnd these?{p}\n{p}\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_adds_no_system_prompt_and_generation_prompt_only_on_request(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["custom"])
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


# --- configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format(tiny, fmt):
    assert detect_format(tiny[fmt]) == fmt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_read_model_config_round_trips_every_preset(tmp_path, fmt, preset):
    cfg = PRESETS[preset]
    if preset == "tiny":  # the real writer, processor files included
        path = write_checkpoint(tmp_path, preset, fmt, max_shard_bytes=10**9)
    else:  # configs only: real-shape weights are too big for a test
        path = tmp_path
        (path / "config.json").write_text(
            json.dumps(custom_config(cfg) if fmt == "custom" else hf_config(cfg))
        )
    assert read_model_config(path) == cfg


def test_custom_config_loads_through_its_shipped_remote_code(tiny):
    config = transformers.AutoConfig.from_pretrained(tiny["custom"], trust_remote_code=True)
    assert type(config).__name__ == "InternVLChatConfig"
    assert config.vision_config.hidden_size == PRESETS["tiny"].vision.hidden_size
    assert type(config.llm_config).__name__ == "Qwen3Config"
    assert config.llm_config.head_dim == PRESETS["tiny"].language.head_dim


def test_unknown_or_missing_config_is_named(tmp_path):
    with pytest.raises(CheckpointConfigError, match="config.json: file not found"):
        detect_format(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointConfigError, match="not an InternVL checkpoint.*'llama'"):
        read_model_config(tmp_path)
    config = custom_config(PRESETS["tiny"])
    del config["vision_config"]["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointConfigError, match="vision_config: missing key 'hidden_size'"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointConfigError, match="cannot read JSON"):
        detect_format(tmp_path)


def test_real_shape_presets_have_their_published_sizes():
    def billions(preset: str) -> float:
        return sum(torch.Size(spec.shape).numel() for spec in tensor_specs(PRESETS[preset])) / 1e9

    assert 1.0 < billions("1b") < 1.1  # InternVL3.5-1B: 1.06B (InternViT-300M + Qwen3-0.6B, untied lm_head)
    assert 8.2 < billions("8b") < 8.8  # InternVL3.5-8B: 8.5B (untied lm_head)
    assert "language_model.lm_head.weight" in {s.name for s in tensor_specs(PRESETS["8b"])}
    assert "language_model.lm_head.weight" not in {s.name for s in tensor_specs(PRESETS["tiny"])}


# --- weights ----------------------------------------------------------------------------------------


def test_hf_checkpoint_loads_in_transformers_with_no_missing_or_unexpected_keys(hf_model):
    _, info = hf_model
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]


def test_both_formats_hold_the_same_weights_for_a_seed(tiny):
    custom, hf = load_tensors(tiny["custom"]), load_tensors(tiny["hf"])
    mapped = dict(pair for name, tensor in custom.items() for pair in hf_tensors(name, tensor))
    assert mapped.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(mapped[name], tensor), name
    assert all(t.dtype == torch.bfloat16 for t in hf.values())
    # the fused qkv rows are q, then k, then v
    qkv = custom["vision_model.encoder.layers.0.attn.qkv.weight"]
    k = hf["model.vision_tower.encoder.layer.0.attention.k_proj.weight"]
    assert torch.equal(qkv[k.shape[0] : 2 * k.shape[0]], k)


def test_another_seed_gives_other_weights(tiny, tmp_path):
    other = load_tensors(write_checkpoint(tmp_path, "tiny", "custom", seed=1))
    ours = load_tensors(tiny["custom"])
    name = "mlp1.3.weight"
    assert not torch.equal(ours[name], other[name])


def gradient() -> torch.Tensor:
    x = torch.linspace(0, 1, 448)
    return torch.stack([x.expand(448, 448), x[:, None].expand(448, 448), 1 - x.expand(448, 448)])


def checkerboard() -> torch.Tensor:
    squares = (torch.arange(448)[:, None] // 56 + torch.arange(448) // 56) % 2
    return squares.float().expand(3, 448, 448)


def test_tiny_greedy_output_depends_on_the_image(tiny, hf_model):
    model, _ = hf_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["hf"])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * PRESETS["tiny"].tokens_per_tile + IMG_END_TOKEN
    input_ids = tokenizer(
        prompt.replace(IMAGE_PLACEHOLDER["hf"], image_tokens, 1), return_tensors="pt"
    ).input_ids
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    outputs = []
    for image in (gradient(), checkerboard()):
        pixel_values = ((image - mean) / std)[None]  # one 448x448 tile
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values,
                max_new_tokens=8,
                do_sample=False,
            )
        outputs.append(out[0, input_ids.shape[1] :].tolist())
    assert len(outputs[0]) == len(outputs[1]) == 8
    assert outputs[0] != outputs[1]


# --- sharding ---------------------------------------------------------------------------------------


@given(
    sizes=st.lists(st.integers(1, 50), max_size=30),
    max_shard_bytes=st.integers(1, 120),
)
def test_plan_shards_keeps_order_and_limit(sizes, max_shard_bytes):
    specs = [TensorSpec(f"t{i}", (n,)) for i, n in enumerate(sizes)]
    shards = plan_shards(specs, 2, max_shard_bytes)
    assert [s for shard in shards for s in shard] == specs
    for shard in shards:
        assert len(shard) == 1 or sum(2 * s.shape[0] for s in shard) <= max_shard_bytes


def test_sharded_checkpoint_has_an_index_and_loads(tiny, tmp_path):
    path = write_checkpoint(tmp_path, "tiny", "hf", seed=0, max_shard_bytes=SMALL_SHARD_BYTES)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 3 and not (path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == files
    sharded = load_tensors(path)
    assert index["weight_map"].keys() == sharded.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sharded.values())
    unsharded = load_tensors(tiny["hf"])
    assert sharded.keys() == unsharded.keys()
    assert all(torch.equal(sharded[name], unsharded[name]) for name in sharded)

    _, info = transformers.InternVLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_rewriting_a_checkpoint_drops_its_old_shards(tmp_path):
    write_checkpoint(tmp_path, "tiny", "custom", max_shard_bytes=SMALL_SHARD_BYTES)
    write_checkpoint(tmp_path, "tiny", "custom")
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]
