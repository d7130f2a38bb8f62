"""Builds the vLLM engine in embedding-only mode: the vision tower is neither built nor loaded.

The engine takes vLLM's own engine arguments (`language_server/arguments.py` puts them on the command line as
`vllm serve` spells them), except the few that embedding-only mode and the feature path need set one way
(`REFUSED`). On a GPU their defaults are vLLM's; on CPU, `CPU_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import os

from checkpoint.formats import detect_format
from language_server.settings import LanguageServerSettings
from language_server.vllm_plugin import ARCHITECTURES, BUSY_POLL_ENV, EXIT_FAST_ENV, register

# How long vLLM's worker busy-polls for the next step before it sleeps (vLLM's own: 1 s). Steps of a running
# request come milliseconds apart, so it still spins while generating; it sleeps while a request is upstream.
ENGINE_BUSY_POLL_S = 0.01

# Engine arguments DvD sets itself (`dvd_engine_arguments`), by field name, with why a user may not.
REFUSED: dict[str, str] = {
    "enable_mm_embeds": "embedding-only mode: images reach the engine as the vision server's features",
    "limit_mm_per_prompt": "embedding-only mode: no image may come as pixels (a zero limit, which also keeps "
                           "vLLM from building the vision tower); DVD_LANGUAGE_MAX_IMAGES_PER_REQUEST caps images",
    "language_model_only": "it would refuse the images' features; DvD's embedding-only mode already skips "
                           "the vision tower",
    "mm_encoder_only": "the vision encoder runs in the vision server; the language server runs the language "
                       "model",
    "mm_processor_cache_gb": "features are not pixels: vLLM's processor cache would hold a copy of every "
                             "image's features; DvD's own feature cache (--feature-cache-mib) serves later "
                             "turns",
    "hf_overrides": "DvD selects its model classes (language_server/vllm_models.py) through the architecture",
    "model_impl": "the model classes are DvD's (language_server/vllm_models.py), which take features of "
                  "varying length per image",
    "model_class_overrides": "the model classes are DvD's (language_server/vllm_models.py), which take "
                             "features of varying length per image",
    "worker_extension_cls": "DvD's worker extension reports what each rank loaded (no vision parameters)",
    "skip_tokenizer_init": "the language server renders chat prompts and parses output with the tokenizer",
    "runner": "the language server generates text",
    "convert": "the language server generates text",
}

# Today's CPU defaults (vLLM's own apply on a GPU). vLLM's CPU backend checks the memory fraction against NUMA
# node 0's free memory; its KV cache size is `--kv-cache-gib`. Chunked prefill is off: a seeded request whose
# prompt is prefilled in chunks kills the engine, since vLLM rewinds the request's generator after each
# chunk with `set_offset`, which CPU generators lack (vLLM does the same for MLA models on CPU); vLLM then
# budgets whole prompts (max_num_batched_tokens >= max_model_len).
CPU_DEFAULTS: dict[str, object] = {
    "max_model_len": 8192,
    "gpu_memory_utilization": 0.2,
    "enforce_eager": True,
    "max_num_seqs": 64,
    "enable_chunked_prefill": False,
}
# Everywhere: custom-format checkpoints ship their config's code.
DEFAULTS: dict[str, object] = {"trust_remote_code": True}


def default_engine_arguments(cpu: bool) -> dict[str, object]:
    """Where DvD's defaults differ from vLLM's, on CPU or on a GPU (`cpu` False)."""
    return {**DEFAULTS, **(CPU_DEFAULTS if cpu else {})}


def dvd_engine_arguments(model: str) -> dict[str, object]:
    """The `REFUSED` engine arguments, as DvD sets them for `model`."""
    return {
        "enable_mm_embeds": True,
        "limit_mm_per_prompt": {"image": 0, "video": 0},
        "mm_processor_cache_gb": 0,
        "hf_overrides": {"architectures": [ARCHITECTURES[detect_format(model)]]},
        "worker_extension_cls": "language_server.worker_extension.DvdWorkerExtension",
    }


def set_cpu_kv_cache(settings: LanguageServerSettings, environ=os.environ) -> None:
    """vLLM's CPU KV-cache size (`VLLM_CPU_KVCACHE_SPACE`, read by its engine processes) from `kv_cache_gib`.

    Given by a flag or `DVD_LANGUAGE_KV_CACHE_GIB`, it wins over an inherited `VLLM_CPU_KVCACHE_SPACE`; its
    default only fills that variable's absence."""
    if "kv_cache_gib" in settings.model_fields_set or "VLLM_CPU_KVCACHE_SPACE" not in environ:
        environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)


def build_engine(settings: LanguageServerSettings, engine_args):
    """Start an `AsyncLLM` with `engine_args` (vLLM's `AsyncEngineArgs` of `settings.model`), fed with image
    embeddings instead of pixels."""
    set_cpu_kv_cache(settings)
    os.environ.setdefault(BUSY_POLL_ENV, str(ENGINE_BUSY_POLL_S))  # read by the plugin in vLLM's processes
    os.environ.setdefault(EXIT_FAST_ENV, "1")
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    register()
    args = dataclasses.replace(engine_args, **dvd_engine_arguments(settings.model))
    # A server's context: vLLM's batch defaults are then those of `vllm serve`.
    return AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
