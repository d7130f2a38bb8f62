"""The published GPU anchor, predicted: vLLM's encoder-disaggregation post (vLLM blog, 2025-12-15, "Encoder
Disaggregation for Scalable Multimodal Model Serving").

Setting as published: 4 x A100 80 GB, Qwen3-VL-4B-Instruct, `vllm bench serve --dataset-name random-mm` with
640x640 images (400 tokens each), ~400 or ~2,000 text tokens, 150 output tokens; goodput = the highest
sustainable request rate with P99 TTFT <= 20 s and P99 TPOT <= 100 ms; data parallelism 4 (coupled) against
1 encoder + 3 prefill/decode instances. Where the post is silent the prediction takes vLLM's defaults of that
time and its example's flags (`examples/online_serving/disaggregated_encoder/disagg_1e1pd_example.sh`):

- coupled: one `vllm serve --data-parallel-size 4`, one API server (the default until vLLM's January 2026
  change to one per data-parallel rank), A100 scheduler defaults (2048 tokens, 256 sequences), CUDA graphs,
  no async scheduling (vLLM 0.12's default; every engine here), the four engines stepping together (0.12's
  data parallelism for any model: each step waits for the slowest rank, `planner.engine.Lockstep`);
- decoupled: the example's encoder instance (`--max-num-batched-tokens 4096 --max-num-seqs 128
  --enforce-eager`, encoder only) and prefill/decode instances (`--enforce-eager --max-num-seqs 128`), each
  `vllm serve` with its own API server; the example's proxy in front, one encode request per image (its CPU
  cost taken as DvD's gateway's, a Python relay of the same kind); features through the EC connector's shared
  storage.

Nothing here is fitted to the published figures: the GPU costs are the roofline of `planner.roofline` on the
A100's data sheet, the API server's costs are measured on CPU (`benchmarks/mm_processor.py`) with vLLM 0.12, the
release current at the post (0.12.0, 2025-12-03), whose processor costs several times vLLM 0.32's per image.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from planner.derive import api_server_costs, derive
from planner.engine import SchedulerConfig
from planner.geometry import QWEN3_VL_4B
from planner.hardware import ACCELERATORS
from planner.plan import summarize, sustained_goodput
from planner.profiles import FrontendCosts, StageProfiles, TransportProfile
from planner.simulate import simulate_coupled, simulate_epd
from planner.workload import Workload

TEXT_TEMPLATE_TOKENS = 10  # the chat template's role markers around the random prompt


@dataclass(frozen=True)
class Point:
    text_tokens: int
    images: int
    coupled_rps: float | None  # DP4, as published
    decoupled_rps: float  # 1E3PD, as published


PUBLISHED = [Point(400, 1, 23, 24), Point(400, 4, 6, 12), Point(2000, 1, 8, 18), Point(2000, 2, None, 11),
             Point(2000, 3, 4, 9), Point(2000, 4, 4, 8)]

# vLLM 0.12 schedules synchronously unless `--async-scheduling` is given (`vllm/config/scheduler.py`,
# `async_scheduling: bool = False`): each step pays the host's work and then the GPU's
ASYNC_SCHEDULING = False
# vLLM 0.12 steps a data-parallel `vllm serve`'s engines together even for a dense model (`vllm/v1/engine/core.py`,
# `run_engine_core`: `DPEngineCoreProc` whenever `data_parallel_size > 1`; `planner.engine.Lockstep`)
DP_LOCKSTEP = True
ENCODER_SCHEDULER = SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=128,
                                    max_item_tokens=QWEN3_VL_4B.images.max_tokens(), async_scheduling=ASYNC_SCHEDULING)
SHARED_STORAGE = TransportProfile(
    backend="ec-shared-storage", bandwidth_gb_s=2.0, latency_s=0.001,
    source="assumed: each image's features written to and read back from a local file (ECSharedStorageConnector)")


class Row(BaseModel):
    text_tokens: int
    images: int
    published_coupled: float | None
    published_decoupled: float
    coupled_p99: float
    decoupled_p99: float
    coupled_p90: float
    decoupled_p90: float
    coupled_busy: dict[str, float] = {}
    decoupled_busy: dict[str, float] = {}

    @property
    def coupled_ratio(self) -> float | None:
        return self.coupled_p99 / self.published_coupled if self.published_coupled else None

    @property
    def decoupled_ratio(self) -> float:
        return self.decoupled_p99 / self.published_decoupled

    @property
    def direction_right(self) -> bool | None:
        if self.published_coupled is None:
            return None
        return (self.decoupled_p99 > self.coupled_p99) == (self.published_decoupled > self.published_coupled)


def profile(host: StageProfiles, api_costs: str) -> StageProfiles:
    """Qwen3-VL-4B on an A100 80GB, derived; vLLM's API server as measured on CPU."""
    a100 = ACCELERATORS["a100-80gb"]
    api = api_server_costs(QWEN3_VL_4B, api_costs)
    derived = derive(QWEN3_VL_4B, host, device=a100.name + " (derived)", peak_tflops=a100.bf16_tflops,
                     hbm_gb_s=a100.hbm_gb_s, memory_gib=a100.memory_gib, nvlink_gb_s=a100.nvlink_gb_s,
                     api_server=api)
    scheduler = derived.engine_scheduler().model_copy(update={"async_scheduling": ASYNC_SCHEDULING})
    return derived.model_copy(update={"transport": SHARED_STORAGE, "scheduler": scheduler})


def workload(point: Point, requests: int = 400) -> Workload:
    return Workload(name=f"anchor_{point.text_tokens}t_{point.images}i", images_per_request=point.images,
                    image_px=(640, 640), images_first=False, text_tokens=point.text_tokens + TEXT_TEMPLATE_TOKENS,
                    output_tokens=150, arrival_rate=1.0, requests=requests, ttft_slo_s=20.0, tpot_slo_s=0.1, gpus=4)


def proxy_costs(profiles: StageProfiles) -> FrontendCosts:
    gateway = profiles.gateway
    return gateway.model_copy(update={"source": "the EPD example's proxy, costed as DvD's gateway (measured)"})


def predict(profiles: StageProfiles, point: Point, **search) -> Row:
    """Sustained goodput (p99 and p90) of both deployments at one published point."""
    load = workload(point)

    def coupled(trial: Workload):
        return simulate_coupled(profiles, trial, replicas=4, api_servers=1, lockstep=DP_LOCKSTEP)

    def decoupled(trial: Workload):
        return simulate_epd(profiles, trial, encoders=1, language_servers=3, proxy=proxy_costs(profiles),
                            encoder_scheduler=ENCODER_SCHEDULER, language_eager=True,
                            language_scheduler=profiles.scheduler.model_copy(update={"max_num_seqs": 128}),
                            encoder_text_tokens=TEXT_TEMPLATE_TOKENS)

    ours = sustained_goodput(decoupled, load, **search)
    theirs = sustained_goodput(coupled, load, **search)

    def busy(simulate, rate: float) -> dict[str, float]:
        """Each pool's busy share at the sustained rate: where the capacity went."""
        trial = load.model_copy(update={"arrival_rate": rate, "requests": max(400, int(rate * 40))})
        shares = summarize(simulate(trial), trial, profiles).busy_share
        return {pool: round(share, 3) for pool, share in shares.items()}

    return Row(text_tokens=point.text_tokens, images=point.images, published_coupled=point.coupled_rps,
               published_decoupled=point.decoupled_rps, coupled_p99=theirs[99.0], decoupled_p99=ours[99.0],
               coupled_p90=theirs[90.0], decoupled_p90=ours[90.0], coupled_busy=busy(coupled, theirs[99.0]),
               decoupled_busy=busy(decoupled, ours[99.0]))


def table(rows: list[Row]) -> str:
    lines = ["| text tokens | images | DP4 published | DP4 predicted (p99) | ratio | within 25% | 1E3PD published "
             "| 1E3PD predicted (p99) | ratio | within 25% | direction right |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = (f"{r.published_coupled:g} | {r.coupled_p99:.1f} | {r.coupled_ratio:.2f} | "
             f"{'yes' if abs(r.coupled_ratio - 1) <= 0.25 else 'no'}") if r.published_coupled else \
            f"- | {r.coupled_p99:.1f} | - | -"
        direction = {True: "yes", False: "no", None: "-"}[r.direction_right]
        lines.append(f"| ~{r.text_tokens} | {r.images} | {c} | {r.published_decoupled:g} | {r.decoupled_p99:.1f} | "
                     f"{r.decoupled_ratio:.2f} | {'yes' if abs(r.decoupled_ratio - 1) <= 0.25 else 'no'} | "
                     f"{direction} |")
    return "\n".join(lines) + "\n"
