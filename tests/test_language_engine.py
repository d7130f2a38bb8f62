"""The language server's vLLM settings that need no engine to check."""

from __future__ import annotations

from language_server.engine import set_cpu_kv_cache
from language_server.settings import LanguageServerSettings


def test_a_given_kv_cache_size_beats_an_inherited_vllm_cpu_kvcache_space():
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    set_cpu_kv_cache(LanguageServerSettings(kv_cache_gib=3), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_the_kv_cache_default_leaves_an_inherited_vllm_cpu_kvcache_space_alone(monkeypatch):
    monkeypatch.delenv("DVD_LANGUAGE_KV_CACHE_GIB", raising=False)
    environ = {"VLLM_CPU_KVCACHE_SPACE": "5"}
    set_cpu_kv_cache(LanguageServerSettings(), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "5"


def test_the_kv_cache_default_fills_an_absent_vllm_cpu_kvcache_space(monkeypatch):
    monkeypatch.delenv("DVD_LANGUAGE_KV_CACHE_GIB", raising=False)
    environ: dict[str, str] = {}
    set_cpu_kv_cache(LanguageServerSettings(), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == str(LanguageServerSettings.model_fields["kv_cache_gib"].default)


def test_the_environment_setting_counts_as_given(monkeypatch):
    monkeypatch.setenv("DVD_LANGUAGE_KV_CACHE_GIB", "2")
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    set_cpu_kv_cache(LanguageServerSettings(), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
