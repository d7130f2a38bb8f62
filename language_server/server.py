"""Language server process: vLLM engine + feature receiver + gRPC LanguageService."""

from __future__ import annotations

import asyncio
import functools
import logging

import torch

from checkpoint.formats import VIR_PREFIXES, detect_format
from contracts.grpc_server import grpc_server, until_stopped
from language_server import metrics
from language_server.engine import build_engine
from language_server.feature_cache import FeatureCache
from language_server.feature_store import FeatureStore
from language_server.output import OutputParsers
from language_server.prompt import ChatRenderer, load_chat_template
from language_server.service import LanguageService
from language_server.settings import LanguageServerSettings
from proto import dvd_pb2, dvd_pb2_grpc
from transport.backends import build_receiver
from transport.frames import ImageFeatures

log = logging.getLogger(__name__)

VISION_PREFIXES = ("vision_model.", "mlp1.", "vision_tower.", "multi_modal_projector.", *VIR_PREFIXES)


async def serve(settings: LanguageServerSettings, engine_args) -> None:
    """Serve until SIGINT/SIGTERM; `engine_args`: vLLM's `AsyncEngineArgs` (language_server/arguments.py)."""
    OutputParsers.check_names(settings.tool_call_parser, settings.reasoning_parser)  # before the slow engine start
    engine = build_engine(settings, engine_args)
    serial_front_end()
    try:
        await _serve(settings, engine)
    finally:
        engine.shutdown()


def serial_front_end() -> None:
    """One intra-op thread for this process's tensor work when vLLM's engine runs on these CPUs in processes of
    its own.

    The engine's threads hold the cores, so each parallel op here first waits for a scheduler slice to wake
    the intra-op pool: checking one image's features (isfinite, all) took ~30 ms with 2 threads, 0.1 ms
    with 1, and it sits between the last feature's arrival and the prefill."""
    import vllm.envs
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:  # in-process: the engine's threads
        torch.set_num_threads(1)


async def _language_only_parameters(engine) -> list[str]:
    """The parameter names of every rank (one list each; tensor-parallel ranks share names, pipeline stages do
    not); embedding-only mode must not build the vision tower, so none is a vision one."""
    per_rank = await engine.collective_rpc("dvd_parameter_names")
    parameter_names = list(dict.fromkeys(name for names in per_rank for name in names))
    vision_held = [n for n in parameter_names if n.startswith(VISION_PREFIXES)]
    if vision_held:
        raise RuntimeError(f"the language engine loaded vision parameters, e.g. {vision_held[:3]}")
    return parameter_names


def _feature_intake(settings: LanguageServerSettings, hidden_size: int, max_model_len: int):
    """Where features arrive: the receiver, the store that holds them for their Generate call, and the cache of
    recently used images (None when off), each reporting to the metrics."""

    def on_drop(reason: str, num_bytes: int = 0) -> None:
        metrics.FEATURES_DROPPED.labels(reason).inc()

    store = FeatureStore(ttl_s=settings.feature_ttl_s, max_bytes=settings.max_pending_feature_bytes,
                         on_drop=on_drop)
    metrics.FEATURES_PENDING_BYTES.set_function(lambda: store.num_bytes)
    metrics.FEATURES_PENDING_BYTES_PEAK.set_function(lambda: store.peak_bytes)
    metrics.FEATURES_PENDING_REQUESTS.set_function(lambda: len(store))
    cache = FeatureCache(settings.feature_cache_bytes) if settings.feature_cache_bytes else None
    metrics.FEATURE_CACHE_BYTES.set_function(lambda: cache.num_bytes if cache else 0)

    def on_features(item: ImageFeatures) -> None:
        if store.put(item):
            metrics.FEATURES_RECEIVED.inc()
            metrics.FEATURE_BYTES.inc(item.num_bytes)
            if item.sent_unix_ns:
                metrics.FEATURE_TRANSFER.observe(max(0, item.received_unix_ns - item.sent_unix_ns) / 1e9)

    # No image can hold more tokens than the context; fp32 is the widest dtype on the wire.
    max_payload = max_model_len * hidden_size * 4
    receiver = build_receiver(
        settings.feature_transport, settings.feature_bind, on_features, max_payload_bytes=max_payload,
        on_drop=on_drop, hidden_size=hidden_size,
        secret=settings.feature_secret.get_secret_value() if settings.feature_secret else None,
        rdma_device=settings.rdma_device, rdma_slots=settings.rdma_slots,
    )
    return receiver, store, cache


def _describe(settings: LanguageServerSettings, model_config, feature_endpoint: str,
              parameter_names: list[str]) -> dvd_pb2.ModelDescription:
    """What the gateway learns from `Describe`: the model, its geometry, where features go, the limits."""
    return dvd_pb2.ModelDescription(
        model=settings.model,
        checkpoint_format=detect_format(settings.model),
        hidden_size=model_config.get_hidden_size(),
        max_model_len=model_config.max_model_len,
        feature_endpoint=settings.feature_advertise or feature_endpoint,
        max_images_per_request=settings.max_images_per_request,
        parameter_names=parameter_names,
    )


async def _serve(settings: LanguageServerSettings, engine) -> None:
    model_config = engine.model_config
    parsers = OutputParsers(engine.get_tokenizer(), settings.tool_call_parser, settings.reasoning_parser)
    parameter_names = await _language_only_parameters(engine)
    receiver, store, cache = _feature_intake(settings, model_config.get_hidden_size(), model_config.max_model_len)
    description = _describe(settings, model_config, receiver.endpoint, parameter_names)
    stop = asyncio.Event()
    engine_dead = asyncio.Event()

    def on_engine_dead() -> None:  # exit non-zero so that a supervisor restarts the server
        engine_dead.set()
        stop.set()

    service = LanguageService(
        engine, store, ChatRenderer(load_chat_template(settings.model)), description,
        model_dtype=model_config.dtype, feature_timeout_s=settings.feature_timeout_s, cache=cache,
        on_engine_dead=on_engine_dead, parsers=parsers, vocab_size=model_config.get_vocab_size(),
    )
    add_service = functools.partial(dvd_pb2_grpc.add_LanguageServiceServicer_to_server, service)
    async with grpc_server(settings, add_service, max_message_bytes=64 << 20) as security:
        background = [asyncio.create_task(receiver.run()), asyncio.create_task(store.expire_forever())]
        log.info("language server ready: gRPC %s:%s (%s), features %s, model %s", settings.host, settings.port,
                 security, description.feature_endpoint, settings.model)
        await until_stopped(stop)
        log.info("language server stopping")
    for task in background:
        task.cancel()
    receiver.close()
    if engine_dead.is_set():
        raise SystemExit("the vLLM engine died")


def main(settings: LanguageServerSettings, engine_args) -> None:
    asyncio.run(serve(settings, engine_args))
