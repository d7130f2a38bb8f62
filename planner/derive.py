"""A *derived* GPU profile: stage costs computed from a model's FLOPs and bytes and a device's data sheet.

For sizing before any GPU run exists. The profile holds the roofline itself (`planner.roofline`: accelerator,
model geometry, tensor parallelism, efficiencies), so the simulator prices each engine step by what it holds
(prefill chunks, decodes, the encoder's images); the tables written beside it are the same roofline at a few
batch sizes, for reading. It also holds vLLM's scheduler settings for the device, and the host work of the front
ends, measured on CPU (`benchmarks/results/mm_processor_cpu.json` for vLLM's API server, the project's CPU
profile and `cpu_per_request` for DvD's servers). The file is marked `provenance: derived` and the report says
so; a measured GPU profile replaces it as is.
"""

from __future__ import annotations

import json
from pathlib import Path

from planner.engine import SchedulerConfig
from planner.files import ProfileError
from planner.geometry import ModelGeometry, NativeImages, TiledImages, geometry
from planner.hardware import Accelerator
from planner.profiles import (
    DecodePoint,
    FrontendCosts,
    Geometry,
    LanguageProfile,
    PrefillPoint,
    StageProfiles,
    TransportProfile,
    VisionPoint,
    VisionProfile,
)
from planner.roofline import Efficiency, Roofline, StepShape

# DvD's own front ends, CPU seconds of each process per request on this 2-core host, 16 and 150 output tokens
# (benchmarks/results/cpu_per_request_cpu_tiny_{16,150}tokens.json, `python -m benchmarks.cpu_per_request
# --max-tokens 16|150`): the gateway 21.1 and 53.9 ms, a language server's front end (its own process, not vLLM's
# engine core) 19.5 and 81.0 ms; split into a per-request and a per-output-token part.
DVD_GATEWAY = FrontendCosts(request_s=0.0172, output_token_s=0.000245,
                            source="DvD's gateway, measured on CPU: cpu_per_request_cpu_tiny_{16,150}tokens.json")
DVD_LANGUAGE_FRONTEND = FrontendCosts(
    request_s=0.0122, output_token_s=0.000459,
    source="a DvD language server's front end, measured on CPU: cpu_per_request_cpu_tiny_{16,150}tokens.json")


def language_params(model: ModelGeometry) -> int:
    """Weights one token multiplies by in the layers (kept for callers of the old name)."""
    return model.language.active_params()


def vision_flop_per_tile(model: ModelGeometry) -> float:
    """The vision encoder and projector on one encoder sequence of the model's usual size (one 448 px tile, or
    a 448x448 image at native resolution)."""
    patches = model.image_sequences(448, 448)[0]
    matmul, attention = model.vision.flops(patches, model.language.hidden_size)
    return matmul + attention


def scheduler_defaults(accelerator: Accelerator, model: ModelGeometry, tensor_parallel: int) -> SchedulerConfig:
    """`vllm serve`'s defaults on this device (`vllm/engine/arg_utils.py`, `get_batch_defaults`: 8192 tokens and
    1024 sequences at >= 70 GiB unless an A100, else 2048 and 256), and vLLM's encoder budget rule."""
    large = accelerator.memory_gib >= 70 and "a100" not in accelerator.name.lower()
    return SchedulerConfig(max_num_batched_tokens=8192 if large else 2048, max_num_seqs=1024 if large else 256,
                           max_item_tokens=model.images.max_tokens())


def api_server_costs(model: ModelGeometry, measured: Path) -> FrontendCosts:
    """vLLM's API server per request, image, tile, text token and output token, measured on CPU for this model's
    processor family (`benchmarks/mm_processor.py`). One process per GPU of a data-parallel deployment (vLLM
    0.32's default `--api-server-count`); a plan may say otherwise."""
    family = "qwen3-vl" if isinstance(model.images, NativeImages) else "internvl"
    try:
        document = json.loads(Path(measured).read_text())
        fit = document["models"][family]["fit"]
    except OSError:
        raise ProfileError(f"{measured}: no such API-server cost file "
                           "(python -m benchmarks.mm_processor writes it)") from None
    except KeyError:
        raise ProfileError(f"{measured}: no measured costs for the {family} processor") from None
    where = document["machine"]  # `cpus` as benchmarks/toolkit/machine.py writes it; `cores` in older files
    return FrontendCosts(**{k: max(0.0, fit.get(k, 0.0)) for k in ("request_s", "image_s", "tile_s", "text_token_s",
                                                                     "image_text_token_s", "output_token_s")},
                         source=f"{measured}: vllm serve's API server on {where['cpu']} "
                                f"({where.get('cpus', where.get('cores'))} cores), {family} processor, "
                                f"{document['measured_at']}")


def derive(preset: str | ModelGeometry, host: StageProfiles, *, device: str, peak_tflops: float, hbm_gb_s: float,
           memory_gib: float = 80.0, nvlink_gb_s: float = 450.0, tensor_parallel: int = 1,
           efficiency: Efficiency | None = None, cuda_graphs: bool = True, link_gb_s: float = 25.0,
           link_latency_s: float = 2e-5, api_server: FrontendCosts | None = None,
           scheduler: SchedulerConfig | None = None, **legacy) -> StageProfiles:
    """The derived profile of `preset` (a geometry name or a `ModelGeometry`) on `device`; `host` gives the
    measured host costs of DvD's vision server. `legacy` takes the old keyword arguments `mfu`,
    `hbm_efficiency` and `step_overhead_s` (matrix-multiply efficiency, HBM efficiency, host time per step)."""
    model = geometry(preset) if isinstance(preset, str) else preset
    efficiency = _legacy_efficiency(efficiency or Efficiency(), legacy)
    accelerator = Accelerator(name=device, bf16_tflops=peak_tflops, hbm_gb_s=hbm_gb_s, memory_gib=memory_gib,
                              nvlink_gb_s=nvlink_gb_s, source="as given to dvd plan derive")
    roofline = Roofline(accelerator=accelerator, model=model, tensor_parallel=tensor_parallel,
                        cuda_graphs=cuda_graphs, efficiency=efficiency)
    scheduler = scheduler or scheduler_defaults(accelerator, model, tensor_parallel)
    if "max_num_seqs" in legacy:
        scheduler = scheduler.model_copy(update={"max_num_seqs": legacy["max_num_seqs"]})
    tp = f" x{tensor_parallel} (tensor parallel)" if tensor_parallel > 1 else ""
    return StageProfiles(
        device=device + tp,
        geometry=_profile_geometry(model),
        provenance="derived",
        notes=_notes(roofline, host, link_gb_s, link_latency_s),
        command=f"dvd plan derive --preset {model.name} --host-profile HOST.json --device '{device}' "
                f"--peak-tflops {peak_tflops:g} --hbm-gb-s {hbm_gb_s:g} --tensor-parallel-size {tensor_parallel}",
        vision=_vision_profile(roofline, host),
        language=_language_profile(roofline, scheduler, host),
        transport=TransportProfile(backend="rdma", bandwidth_gb_s=link_gb_s, latency_s=link_latency_s,
                                   source="assumed line rate, not measured"),
        roofline=roofline,
        scheduler=scheduler,
        api_server=api_server,
        gateway=DVD_GATEWAY if api_server is not None else None,
        language_frontend=DVD_LANGUAGE_FRONTEND if api_server is not None else None,
    )


def _legacy_efficiency(efficiency: Efficiency, legacy: dict) -> Efficiency:
    """`efficiency` with the old keyword arguments of `derive` applied."""
    if not legacy:
        return efficiency
    unknown = set(legacy) - {"mfu", "hbm_efficiency", "step_overhead_s", "max_num_seqs"}
    if unknown:
        raise TypeError(f"derive() got unexpected keyword arguments {sorted(unknown)}")
    return efficiency.model_copy(update={
        key: legacy[old] for old, key in (("mfu", "gemm"), ("mfu", "attention"), ("hbm_efficiency", "hbm"),
                                          ("step_overhead_s", "step_host_s")) if old in legacy})


def _tile(model: ModelGeometry) -> int:
    """Encoder sequence length of one 448 px tile (or a 448x448 image at native resolution)."""
    return model.image_sequences(448, 448)[0]


def _profile_geometry(model: ModelGeometry) -> Geometry:
    tokens_per_tile = model.images.tokens_per_tile if isinstance(model.images, TiledImages) else _tile(model) // 4
    return Geometry(name=model.name, vision_hidden_size=model.vision.hidden_size,
                    language_hidden_size=model.language.hidden_size, tokens_per_tile=tokens_per_tile,
                    compressed_tokens_per_tile=getattr(model.images, "compressed_tokens_per_tile", 64))


def _notes(roofline: Roofline, host: StageProfiles, link_gb_s: float, link_latency_s: float) -> str:
    """What the profile is derived from, and that it is not measured."""
    model, efficiency, accelerator = roofline.model, roofline.efficiency, roofline.accelerator
    tensor_parallel = roofline.tensor_parallel
    return (f"DERIVED, NOT MEASURED: roofline from FLOPs and bytes ({vision_flop_per_tile(model) / 1e12:.2f} TFLOP "
            f"per 448 px tile or image, {model.language.active_params() / 1e9:.2f} B language parameters per token"
            f"{', tensor parallel ' + str(tensor_parallel) if tensor_parallel > 1 else ''}), peak "
            f"{accelerator.bf16_tflops:g} TFLOP/s at {efficiency.gemm:g} (matmul) / {efficiency.attention:g} "
            f"(attention), HBM {accelerator.hbm_gb_s:g} GB/s at {efficiency.hbm:g}, host "
            f"{efficiency.step_host_s * 1e3:g} ms per engine step, link {link_gb_s:g} GB/s + "
            f"{link_latency_s * 1e6:g} us; vision server host costs from the '{host.device}' profile. Illustrative "
            f"until replaced by a measured GPU profile.")


def _vision_profile(roofline: Roofline, host: StageProfiles) -> VisionProfile:
    """The vision encoder's throughput by batch size (one device, no tensor parallelism), the host's costs."""
    vision_roofline = roofline.model_copy(update={"tensor_parallel": 1})
    tile = _tile(roofline.model)
    sweep = [VisionPoint(batch_tiles=b, tiles_per_s=round(b / vision_roofline.vision_seconds([tile] * b), 2))
             for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    return VisionProfile(batch_sweep=sweep, preprocess_s_per_tile=host.vision.preprocess_s_per_tile,
                         overhead_s_per_request=host.vision.overhead_s_per_request, max_batch_tiles=64,
                         preprocess_parallelism=16)


def _language_profile(roofline: Roofline, scheduler: SchedulerConfig, host: StageProfiles) -> LanguageProfile:
    """The roofline's prefill and decode step times at a few batch sizes and contexts, for reading."""
    def step(batch: int, context: int, decode: bool) -> float:
        shape = StepShape()
        for _ in range(batch):
            shape.add_chunk(1 if decode else context, context if decode else 0, decode)
        return max(roofline.language_seconds(shape), roofline.efficiency.step_host_s)

    contexts = (512, 2048, 8192, 16384)
    return LanguageProfile(
        prefill=[PrefillPoint(batch=b, context_tokens=c, seconds=round(step(b, c, False), 6))
                 for b in (1, 8) for c in contexts],
        decode=[DecodePoint(batch=b, context_tokens=c, step_seconds=round(step(b, c, True), 6))
                for b in (1, 8, 32, 128, 256) for c in contexts],
        max_num_seqs=scheduler.max_num_seqs, max_batched_tokens=scheduler.max_num_batched_tokens,
        overhead_s_per_request=host.language.overhead_s_per_request)
