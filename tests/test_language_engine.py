"""The language server's vLLM settings that need no engine to check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from language_server.engine import set_cpu_kv_cache
from language_server.settings import LanguageServerSettings
from language_server.vllm_plugin import BUSY_POLL_ENV


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


def _busy_loop_default(environ: dict[str, str]) -> float:
    """The default busy-poll of vLLM's shared-memory queue readers after DvD's plugin ran (in a fresh interpreter:
    the plugin patches vLLM process-wide)."""
    code = ("import inspect; from language_server.vllm_plugin import register; register(); "
            "from vllm.distributed.device_communicators.shm_broadcast import SpinCondition; "
            "print(inspect.signature(SpinCondition.__init__).parameters['busy_loop_s'].default)")
    env = {k: v for k, v in os.environ.items() if k != BUSY_POLL_ENV} | environ
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_the_plugin_shortens_vllm_workers_busy_poll_only_in_the_language_servers_engine():
    assert _busy_loop_default({BUSY_POLL_ENV: "0.05"}) == 0.05
    assert _busy_loop_default({}) == 1  # any other vLLM in this environment keeps vLLM's own
