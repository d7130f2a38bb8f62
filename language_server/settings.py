"""Language server settings: flags given on the command line, then `DVD_LANGUAGE_*`
environment variables, then these defaults. vLLM's engine arguments are not fields here: they come as flags,
or as one string in `DVD_LANGUAGE_ENGINE_ARGS` (language_server/arguments.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.settings import GrpcServing, RequestLimits


class LanguageServerSettings(BaseSettings, GrpcServing, RequestLimits):  # the shared pieces: contracts/settings.py
    model_config = SettingsConfigDict(env_prefix="DVD_LANGUAGE_")

    model: str = "checkpoints/tiny"  # the checkpoint `make up` writes
    port: int = 50061  # gRPC LanguageService
    feature_transport: Literal["tcp", "rdma"] = "tcp"  # rdma: feature_bind is rdma://host:port (needs pyverbs)
    feature_bind: str = "tcp://127.0.0.1:5600"  # where the feature receiver listens
    feature_secret: SecretStr | None = None  # shared with the vision servers: only they may send features
    rdma_device: str | None = None  # e.g. mlx5_0; None: the first RDMA device
    rdma_slots: int = 4  # receive buffers per RDMA connection, each one whole image's features
    feature_advertise: str | None = None  # endpoint vision servers should send to (default: the bound one)
    # vLLM's engine arguments as `vllm serve` takes them, e.g. "--tensor-parallel-size 2 --max-model-len 32768";
    # flags on the command line win over them (language_server/arguments.py).
    engine_args: str = ""
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU (whole GiB)
    feature_timeout_s: float = 60.0  # how long Generate waits for its features
    feature_ttl_s: float = 60.0  # how long unclaimed features are kept
    max_pending_feature_bytes: int = 4 << 30
    # Features of recently used images, by content key, so that a chat's later turns need not resend them;
    # 0 turns the cache off.
    feature_cache_bytes: int = 2 << 30
    # Output parsers, by their names in vLLM's registries (`vllm serve --tool-call-parser/--reasoning-parser`).
    # hermes: Qwen3's `<tool_call>` JSON blocks. deepseek_r1: with thinking on, a leading `<think>` is dropped,
    # text up to `</think>` is reasoning, the rest content; a completion cut off before `</think>` is all reasoning.
    tool_call_parser: str = "hermes"
    reasoning_parser: str = "deepseek_r1"
