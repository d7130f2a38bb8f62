"""GPU time of one engine step, or one vision batch, from what it computes: a roofline per part.

A language-model step forwards prefill chunks and decode tokens together (vLLM's one forward per step).
Its matrix multiplies cost `max(FLOPs / (peak x gemm), weight bytes / (HBM x hbm))` (a small batch streams the
weights, a large one is compute-bound), its attention `max(FLOPs / (peak x attention), KV bytes / (HBM x hbm))`;
under tensor parallelism both split over the devices and every layer adds two all-reduces of the step's
activations over NVLink (vLLM's row-parallel `o_proj` and `down_proj`, `vllm/model_executor/layers/linear.py`).
Without CUDA graphs every kernel also pays its launch. A vision batch is the same for the ViT's sequences,
attention full within each image.

The efficiencies are stated once (`Efficiency`) with their source, never fitted to the results they predict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from planner.geometry import ModelGeometry
from planner.hardware import Accelerator


class Efficiency(BaseModel):
    """Shares of the data sheet's peaks that real kernels reach, and fixed costs per step."""

    gemm: float = Field(0.7, gt=0, le=1)
    attention: float = Field(0.5, gt=0, le=1)
    hbm: float = Field(0.8, gt=0, le=1)
    kernel_launch_s: float = Field(5e-6, ge=0)  # one CUDA kernel launched without a graph
    allreduce_latency_s: float = Field(1e-5, ge=0)  # one small all-reduce over NVLink
    step_host_s: float = Field(0.002, ge=0)  # the engine's host work per step (schedule, inputs, outputs)
    source: str = (
        "gemm 0.7 and attention 0.5 of peak: FlashAttention-2 (Dao 2023, arXiv 2307.08691) reports 50-73% of A100 "
        "peak for attention and 72% model FLOPs utilisation end to end; hbm 0.8: typical achieved share of HBM "
        "bandwidth in streaming kernels (assumed); 5 us per kernel launch (NVIDIA, CUDA Graphs); 10 us per small "
        "NVLink all-reduce (assumed); 2 ms host work per engine step, hidden behind the GPU under vLLM's async "
        "scheduling (assumed)")


# Kernels one layer launches in eager mode (norms, projections, rotary, attention, activation, residuals).
KERNELS_PER_LANGUAGE_LAYER = 14
KERNELS_PER_VISION_LAYER = 12


@dataclass
class StepShape:
    """What one engine step forwards, as the cost model needs it."""

    tokens: int = 0  # prefill-chunk tokens plus one per decode
    sequences: int = 0  # requests in the step: one row of logits each
    attention_pairs: float = 0.0  # query x key pairs over all sequences (causal)
    kv_tokens: int = 0  # KV entries the step's attention reads
    prefill_chunks: list[int] = field(default_factory=list)  # for measured (table) costs
    decodes: int = 0
    decode_context: int = 0  # summed over the decodes

    def add_chunk(self, new: int, before: int, decode: bool) -> None:
        """A prefill chunk of `new` tokens after `before` computed ones, or a decode (one token)."""
        self.tokens += new
        self.sequences += 1
        self.attention_pairs += new * before + new * (new + 1) / 2
        self.kv_tokens += before + new
        if decode:
            self.decodes += 1
            self.decode_context += before + 1
        else:
            self.prefill_chunks.append(new)


class Roofline(BaseModel):
    """One engine (a device, or a tensor-parallel group of them) serving one model."""

    accelerator: Accelerator
    model: ModelGeometry
    tensor_parallel: int = Field(1, gt=0)
    cuda_graphs: bool = True  # vLLM's default; `--enforce-eager` turns them off
    efficiency: Efficiency = Efficiency()

    @property
    def _flops(self) -> float:
        return self.accelerator.bf16_tflops * 1e12

    @property
    def _bytes_per_s(self) -> float:
        return self.accelerator.hbm_gb_s * 1e9 * self.efficiency.hbm

    def _allreduce_s(self, layers: int, tokens: int, hidden: int) -> float:
        """Two ring all-reduces per layer of `tokens` x `hidden` bf16 activations."""
        tp = self.tensor_parallel
        if tp == 1:
            return 0.0
        if not self.accelerator.nvlink_gb_s:
            raise ValueError(f"{self.accelerator.name}: tensor parallelism needs an NVLink bandwidth")
        wire = 2 * (tp - 1) / tp * tokens * hidden * 2 / (self.accelerator.nvlink_gb_s * 1e9)
        return 2 * layers * (self.efficiency.allreduce_latency_s + wire)

    def language_seconds(self, step: StepShape) -> float:
        """GPU time of one language-model forward of `step` (no encoder)."""
        if step.tokens == 0:
            return 0.0
        lm, eff, tp = self.model.language, self.efficiency, self.tensor_parallel
        matmul_flops = 2 * (lm.active_params() * step.tokens + lm.head_params * step.sequences) / tp
        mlp_weights = (lm.experts_touched(step.tokens) * lm.expert_params + lm.hidden_size * lm.num_experts
                       if lm.moe else lm.mlp_params)
        weight_bytes = 2 * (lm.num_layers * (lm.attention_params + mlp_weights) + lm.head_params) / tp
        matmul = max(matmul_flops / (self._flops * eff.gemm), weight_bytes / self._bytes_per_s)
        kv_shards = min(tp, lm.num_kv_heads)  # KV heads split over ranks, replicated beyond their count
        attention_flops = 4 * lm.num_layers * lm.num_heads * lm.head_dim * step.attention_pairs / tp
        kv_bytes = lm.kv_bytes_per_token() * step.kv_tokens / kv_shards
        attention = max(attention_flops / (self._flops * eff.attention), kv_bytes / self._bytes_per_s)
        launches = 0.0 if self.cuda_graphs else lm.num_layers * KERNELS_PER_LANGUAGE_LAYER * eff.kernel_launch_s
        return matmul + attention + self._allreduce_s(lm.num_layers, step.tokens, lm.hidden_size) + launches

    def vision_seconds(self, sequences: list[int]) -> float:
        """GPU time of the vision encoder and projector on a batch of image sequences (patch counts), run
        eagerly as vLLM and DvD's vision server run it; under tensor parallelism the ViT's weights are split too
        (vLLM's default `mm_encoder_tp_mode="weights"`)."""
        if not sequences:
            return 0.0
        vision, eff, tp = self.model.vision, self.efficiency, self.tensor_parallel
        out = self.model.language.hidden_size
        matmul_flops = attention_flops = 0.0
        for patches in sequences:
            m, a = vision.flops(patches, out)
            matmul_flops, attention_flops = matmul_flops + m, attention_flops + a
        weight_bytes = self.model.vision_dtype_bytes * self.model.vision_params()
        matmul = max(matmul_flops / tp / (self._flops * eff.gemm), weight_bytes / tp / self._bytes_per_s)
        attention = attention_flops / tp / (self._flops * eff.attention)
        tokens = sum(sequences) + vision.class_tokens * len(sequences)
        launches = vision.num_layers * KERNELS_PER_VISION_LAYER * eff.kernel_launch_s
        return matmul + attention + self._allreduce_s(vision.num_layers, tokens, vision.hidden_size) + launches

    def kv_capacity_tokens(self, memory_utilization: float = 0.92, vision_weights: bool = True,
                           activation_gib: float = 2.0, min_tokens: int = 32768) -> int:
        """Tokens of KV cache one engine holds: `memory_utilization` (vLLM's default 0.92) of each device's memory,
        less its weights (the vision encoder's too when it is loaded) and an activation reserve per device;
        at least `min_tokens`, or it is refused."""
        lm, tp = self.model.language, self.tensor_parallel
        weights = 2 * lm.weight_params() + (self.model.vision_dtype_bytes * self.model.vision_params()
                                            if vision_weights else 0)
        free = tp * (self.accelerator.memory_gib * memory_utilization - activation_gib) * 2 ** 30 - weights
        tokens = int(max(0.0, free) / lm.kv_bytes_per_token())
        if tokens < min_tokens:  # vLLM refuses to start without room for one request of its max length
            raise ValueError(f"{self.model.name} does not fit {tp} x {self.accelerator.name}: "
                             f"{weights / 2 ** 30:.0f} GiB of weights leave KV cache for {tokens} tokens, fewer than "
                             f"one {min_tokens}-token request; raise the tensor parallelism")
        return tokens
