"""Every InternVL3.5 family member: presets with the published geometry (the model card's parameter counts),
`dvd checkpoint --dry-run` in both formats, config round trips, and the tiny Qwen3-MoE and GPT-OSS checkpoints
(weights as published, the o200k_harmony tokenizer, InternVL's GPT-OSS chat format)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import language_server.torch_compat  # noqa: F401  (before transformers imports torchvision)
from checkpoint.formats import read_model_config
from checkpoint.generate import hf_tensors, tensor_specs, write_checkpoint
from checkpoint.geometry import PRESETS, LanguageConfig, internvl_added_tokens
from checkpoint.tokenizer_families import HARMONY_SPECIAL_TOKENS, o200k_base_file
from dvd.cli import app
from language_server.prompt import ChatRenderer, PromptError, load_chat_template

FORMATS = ("custom", "hf")
FAMILY = ("1b", "2b", "4b", "8b", "14b", "38b", "20b-a4b", "30b-a3b", "241b-a28b")
# The model card's "Model Card" table (shared/reference/internvl3_5-readme.txt): ViT, MLP, LLM, total, in the
# card's own units and rounding.
CARD = {
    "1b": ("304.01M", "5.25M", "751.63M", "1.06B"),
    "2b": ("304.01M", "12.60M", "2.03B", "2.35B"),
    "4b": ("304.01M", "17.05M", "4.41B", "4.73B"),
    "8b": ("304.01M", "33.57M", "8.19B", "8.53B"),
    "14b": ("304.01M", "47.20M", "14.77B", "15.12B"),
    "38b": ("5.54B", "91.79M", "32.76B", "38.40B"),
    "20b-a4b": ("304.01M", "20.10M", "20.91B", "21.23B"),
    "30b-a3b": ("304.01M", "12.60M", "30.53B", "30.85B"),
    "241b-a28b": ("5.54B", "69.24M", "235.09B", "240.70B"),
}


def card_units(count: int, like: str) -> float:
    """`count` in the unit of the card's figure `like` (M or B), rounded as the card rounds."""
    return round(count / (1e6 if like.endswith("M") else 1e9), 2)


def vision_projector_language(preset: str) -> tuple[int, int, int]:
    cfg = PRESETS[preset]
    return cfg.vision.num_parameters(), cfg.projector_parameters(), cfg.language.num_parameters()


@pytest.mark.parametrize("preset", FAMILY)
def test_presets_have_the_model_card_s_parameter_counts(preset):
    counts = vision_projector_language(preset)
    for count, published in zip(counts, CARD[preset]):
        assert card_units(count, published) == float(published[:-1]), (preset, count, published)
    total = card_units(sum(counts), CARD[preset][3])
    # 38B: the card's total (38.40B) is 0.01B above the sum of its own rows (5.54B + 91.79M + 32.76B)
    assert abs(total - float(CARD[preset][3][:-1])) <= (0.01 if preset == "38b" else 0), (preset, total)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_counts_are_the_written_tensors(preset):
    """The geometry's counts (used by the table and the planner) add up what the generator writes."""
    written = {"vision": 0, "projector": 0, "language": 0}
    for spec in tensor_specs(PRESETS[preset]):
        part = {"vision_model": "vision", "mlp1": "projector", "language_model": "language"}[spec.name.split(".")[0]]
        written[part] += torch.Size(spec.shape).numel()
    assert (written["vision"], written["projector"], written["language"]) == vision_projector_language(preset)


def test_mixture_of_experts_presets_activate_their_published_share():
    active = {p: PRESETS[p].language.num_parameters(active=True) / 1e9 for p in ("30b-a3b", "241b-a28b", "20b-a4b")}
    assert round(active["30b-a3b"], 1) == 3.4  # Qwen3-30B-A3B: 3.3B activated (3.35B)
    assert round(active["241b-a28b"]) == 22  # Qwen3-235B-A22B: 22B activated
    gpt_oss = PRESETS["20b-a4b"].language
    # gpt-oss-20b: 3.6B active, not counting the input embedding (a lookup)
    assert round(active["20b-a4b"] - gpt_oss.vocab_size * gpt_oss.hidden_size / 1e9, 1) == 3.6
    vision = PRESETS["241b-a28b"].vision.num_parameters() / 1e9
    assert round(active["241b-a28b"] + vision) == 28  # InternVL3.5-241B-A28B: InternViT-6B + 22B active


def test_a_family_needs_experts_exactly_when_it_is_a_mixture():
    with pytest.raises(ValueError, match="qwen3_moe language model has no experts"):
        LanguageConfig(architecture="qwen3_moe")
    with pytest.raises(ValueError, match="qwen3 language model has experts"):
        LanguageConfig(experts=PRESETS["30b-a3b"].language.experts)


# --- dvd checkpoint --dry-run --------------------------------------------------------------------------------


def test_help_lists_every_preset():
    result = CliRunner().invoke(app, ["checkpoint", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert all(name in result.output for name in PRESETS)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", FAMILY)
def test_dry_run_writes_the_config_and_shard_index_without_weights(tmp_path, preset, fmt):
    result = CliRunner().invoke(app, ["checkpoint", str(tmp_path), "--preset", preset, "--format", fmt, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert read_model_config(tmp_path) == PRESETS[preset]
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "tokenizer.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    parameters = sum(vision_projector_language(preset))
    assert index["metadata"]["total_size"] == 2 * parameters  # bf16
    names = {name for spec in tensor_specs(PRESETS[preset]) for name, _ in hf_tensors(spec.name, torch.empty(
        spec.shape, device="meta"))} if fmt == "hf" else {spec.name for spec in tensor_specs(PRESETS[preset])}
    assert set(index["weight_map"]) == names
    language = PRESETS[preset].language
    assert f"language model {language.num_parameters() / 1e9:.2f}B parameters" in result.output


def test_published_language_configs_keep_their_family_s_keys(tmp_path):
    """The keys vLLM's and transformers' Qwen3-MoE and GPT-OSS models read, with the published values."""
    write_checkpoint(tmp_path / "moe", "241b-a28b", "custom", dry_run=True)
    write_checkpoint(tmp_path / "oss", "20b-a4b", "hf", dry_run=True)
    moe = json.loads((tmp_path / "moe" / "config.json").read_text())["llm_config"]
    oss = json.loads((tmp_path / "oss" / "config.json").read_text())["text_config"]
    assert (moe["architectures"], moe["num_experts"], moe["num_experts_per_tok"], moe["moe_intermediate_size"],
            moe["norm_topk_prob"], moe["decoder_sparse_step"], moe["mlp_only_layers"]) == (
        ["Qwen3MoeForCausalLM"], 128, 8, 1536, True, 1, [])
    assert (oss["architectures"], oss["num_local_experts"], oss["num_experts_per_tok"], oss["sliding_window"],
            oss["swiglu_limit"], oss["rope_theta"], oss["rope_scaling"]["factor"], oss["attention_bias"]) == (
        ["GptOssForCausalLM"], 32, 4, 128, 7.0, 150000.0, 32.0, True)
    assert oss["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert len(oss["layer_types"]) == 24


# --- the tiny Qwen3-MoE and GPT-OSS checkpoints ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {(preset, fmt): write_checkpoint(root / f"{preset}-{fmt}", preset, fmt, seed=0)
            for preset in ("tiny-moe", "tiny-gpt-oss") for fmt in FORMATS}


@pytest.mark.parametrize("preset,language_model", [("tiny-moe", "Qwen3MoeModel"), ("tiny-gpt-oss", "GptOssModel")])
def test_hf_checkpoint_loads_in_transformers_with_no_missing_or_unexpected_keys(tiny_family, preset, language_model):
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        tiny_family[preset, "hf"], dtype=torch.float32, output_loading_info=True)
    assert type(model.model.language_model).__name__ == language_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    if preset == "tiny-moe":  # transformers fuses the published per-expert weights on load
        tensors = load_file(tiny_family[preset, "hf"] / "model.safetensors")
        gate_up = model.model.language_model.layers[1].mlp.experts.gate_up_proj[5]
        p = "model.language_model.layers.1.mlp.experts.5"
        want = torch.cat([tensors[f"{p}.gate_proj.weight"], tensors[f"{p}.up_proj.weight"]]).float()
        assert torch.equal(gate_up, want)


@pytest.mark.parametrize("preset,config_class", [("tiny-moe", "Qwen3MoeConfig"), ("tiny-gpt-oss", "GptOssConfig")])
def test_custom_config_loads_the_family_s_language_config_through_remote_code(tiny_family, preset, config_class):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_family[preset, "custom"], trust_remote_code=True)
    assert type(config.llm_config).__name__ == config_class
    assert read_model_config(tiny_family[preset, "custom"]) == PRESETS[preset]


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-gpt-oss"])
def test_both_formats_hold_the_same_weights_for_a_seed(tiny_family, preset):
    custom = load_file(tiny_family[preset, "custom"] / "model.safetensors")
    hf = load_file(tiny_family[preset, "hf"] / "model.safetensors")
    mapped = dict(pair for name, tensor in custom.items() for pair in hf_tensors(name, tensor))
    assert mapped.keys() == hf.keys()
    assert all(torch.equal(mapped[name], tensor) for name, tensor in hf.items())


def test_gpt_oss_tokenizer_is_o200k_harmony_with_internvl_s_tokens_after_it(tiny_family, tmp_path, monkeypatch):
    """Checked against openai_harmony's own o200k_harmony encoding (the library vLLM uses for GPT-OSS)."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    from tokenizers import Tokenizer

    o200k_base_file(tmp_path)
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    harmony = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    tokenizer = Tokenizer.from_file(str(tiny_family["tiny-gpt-oss", "hf"] / "tokenizer.json"))
    for text in ["Hello, world! It's 12345 o'clock.\n\n\tTabs  and   spaces", "数学 émigré naïve — ∑ x² 🙂",
                 "def f(x):\r\n    return {'a': [1, 2]}  # done"]:
        assert tokenizer.encode(text, add_special_tokens=False).ids == harmony.encode(text, allowed_special=set())
    for token, token_id in HARMONY_SPECIAL_TOKENS.items():
        assert tokenizer.token_to_id(token) == token_id
        # harmony calls 200018 <|reserved_200018|>; o200k_base (and GPT-OSS's tokenizer) <|endofprompt|>
        assert harmony.decode_utf8([token_id]) == token or (token_id, token) == (200018, "<|endofprompt|>")
    for token, token_id in internvl_added_tokens("gpt_oss").items():
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False).ids.count(token_id) == 1
    generation = json.loads((tiny_family["tiny-gpt-oss", "hf"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [200002, 200012, 199999]  # <|return|>, <|call|>, <|endoftext|>


# --- chat templates --------------------------------------------------------------------------------------------

IMAGE = {"type": "image"}
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [IMAGE, IMAGE, {"type": "text", "text": "Compare."}]},
     {"role": "assistant", "content": "They differ."}, {"role": "user", "content": "How?"}],
]


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-gpt-oss"])
def test_prompt_token_ids_equal_vllm_s_chat_template_rendering(tiny_family, preset, fmt, chat):
    """vLLM renders an HF tokenizer's chat with transformers' `apply_chat_template(tokenize=True)`
    (vllm/renderers/hf.py, `safe_apply_chat_template`); DvD renders the same template and tokenizes the text."""
    from vllm.tokenizers import get_tokenizer

    path = tiny_family[preset, fmt]
    tokenizer = get_tokenizer(str(path), trust_remote_code=True)
    vllm_ids = tokenizer.apply_chat_template(CHATS[chat], tokenize=True, return_dict=False,
                                             add_generation_prompt=True)
    prompt = ChatRenderer(load_chat_template(path)).render(CHATS[chat])
    assert tokenizer.encode(prompt, add_special_tokens=False) == vllm_ids
    assert prompt.count(load_placeholder(fmt)) == sum(
        isinstance(m["content"], list) and m["content"].count(IMAGE) for m in CHATS[chat])


def load_placeholder(fmt: str) -> str:
    from checkpoint.formats import IMAGE_PLACEHOLDER

    return IMAGE_PLACEHOLDER[fmt]


def test_gpt_oss_template_renders_internvl_s_harmony_conversation(tiny_family):
    """InternVL's `internvl3_5_gpt_oss` conversation: its default system message, one harmony frame per turn,
    assistant turns on the final channel, `<|start|>assistant` as the generation prompt."""
    renderer = ChatRenderer(load_chat_template(tiny_family["tiny-gpt-oss", "custom"]))
    assert renderer.render(CHATS[1]) == (
        "<|start|>system<|message|>You are InternVL, a large language model trained by Shanghai AI Laboratory.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. "
        "Channel must be included for every message.<|end|><|start|>user<|message|>What is this?<image>\n<|end|>"
        "<|start|>assistant")
    assert renderer.render(CHATS[2]).endswith(
        "<|start|>system<|message|>Be brief.<|end|><|start|>user<|message|><image>\n<image>\nCompare.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>They differ.<|end|><|start|>user<|message|>How?<|end|>"
        "<|start|>assistant")
    assert renderer.render(CHATS[2]).count("<|start|>system") == 1


def test_gpt_oss_template_refuses_tools_it_has_no_format_for(tiny_family):
    renderer = ChatRenderer(load_chat_template(tiny_family["tiny-gpt-oss", "hf"]))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(PromptError, match="declares no tools"):
        renderer.render(CHATS[0], tools=[tool])
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function",
                                                                  "function": {"name": "f", "arguments": {}}}]}
    with pytest.raises(PromptError, match="has no tool calls"):
        renderer.render([*CHATS[0], call])


def test_moe_family_uses_the_dense_family_s_chat_template(tiny_family, tiny_checkpoints):
    for fmt in FORMATS:
        assert load_chat_template(tiny_family["tiny-moe", fmt]) == load_chat_template(tiny_checkpoints[fmt])
