"""Builds the vLLM engine in embedding-only mode: the vision tower is neither built nor loaded."""

from __future__ import annotations

import os

from checkpoint.formats import detect_format
from language_server.settings import LanguageServerSettings
from language_server.vllm_plugin import ARCHITECTURES, BUSY_POLL_ENV, register

# How long vLLM's worker busy-polls for the next step before it sleeps (vLLM's own: 1 s). Steps of a running
# request come milliseconds apart, so it still spins while generating; it sleeps while a request is upstream.
ENGINE_BUSY_POLL_S = 0.01


def set_cpu_kv_cache(settings: LanguageServerSettings, environ=os.environ) -> None:
    """vLLM's CPU KV-cache size (`VLLM_CPU_KVCACHE_SPACE`, read by its engine processes) from `kv_cache_gib`.

    Given by a flag or `DVD_LANGUAGE_KV_CACHE_GIB`, it wins over an inherited `VLLM_CPU_KVCACHE_SPACE`; its
    default only fills that variable's absence."""
    if "kv_cache_gib" in settings.model_fields_set or "VLLM_CPU_KVCACHE_SPACE" not in environ:
        environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)


def build_engine(settings: LanguageServerSettings):
    """Start an `AsyncLLM` fed with image embeddings instead of pixels."""
    set_cpu_kv_cache(settings)
    os.environ.setdefault(BUSY_POLL_ENV, str(ENGINE_BUSY_POLL_S))  # read by the plugin in vLLM's processes
    from vllm import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    register()
    architecture = ARCHITECTURES[detect_format(settings.model)]
    # On CPU, a seeded request whose prompt is prefilled in chunks kills the engine: vLLM rewinds the
    # request's generator after each chunk with `set_offset`, which CPU generators lack. Whole prompts
    # only, then (vLLM does the same for MLA models on CPU).
    whole_prompts = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(settings.max_model_len, 2048)}

    args = AsyncEngineArgs(
        model=settings.model,
        trust_remote_code=True,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=settings.enforce_eager,
        # Embedding-only: image embeddings are accepted and no image may be given as pixels, which
        # makes vLLM skip the vision tower. It also skips its per-prompt image count check, so the
        # service caps images per request itself.
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 0, "video": 0},
        mm_processor_cache_gb=0,
        hf_overrides={"architectures": [architecture]},
        worker_extension_cls="language_server.worker_extension.DvdWorkerExtension",
        **(whole_prompts if current_platform.is_cpu() else {}),
    )
    return AsyncLLM.from_engine_args(args)
