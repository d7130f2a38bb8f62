"""InternVL3.5 on H100 and H200: DvD's best split against coupled vLLM on the same 8 GPUs, with and without ViR,
and the techniques peers use beyond plain decoupling, ranked by their predicted gain.

Every figure is derived (`planner.derive`): the roofline on the data sheet, vLLM's API server and DvD's front
ends as measured on CPU. The workload is image-heavy chat: two 1920x1080 images (9 tiles each), 128 text
tokens, 128/256/512 output tokens (50/30/20%); SLOs TTFT 2 s and TPOT 50 ms for 8B, 4 s and 100 ms for 38B
(tensor parallelism 2 for its language engines, coupled and DvD alike). ViR: half of every image's tiles sent
as 64 tokens (InternVL3.5-Flash's router at its 0.5 quantile).

Techniques (`planner.simulate.simulate_dvd` options), on the best plain-DvD split:
- spread: each image of a request to the least busy vision server (SGLang; vLLM's proxy, one encode job per item);
- stream: prefill starts as each image's features arrive, up to the first still missing (RServe);
- elastic: the vision:language split follows a bursty load (ModServe, ElasticMM): two phases (image bursts of
  three 1080p images and 128 output tokens; chat with one 448 px image, 512 text and 512 output tokens), each
  served by its own best split, against the one split best for both (an upper bound: GPUs change roles at once;
  the splits compared are each phase's three best by a closed-loop screen).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from planner.derive import api_server_costs, derive
from planner.geometry import geometry
from planner.hardware import ACCELERATORS
from planner.plan import Plan, make_plan, run, screen, sustained
from planner.profiles import StageProfiles
from planner.workload import Workload

CASES = [("8b", "h100-sxm", 1), ("8b", "h200", 1), ("38b", "h100-sxm", 2), ("38b", "h200", 2)]
GPUS = 8
SEARCH = {"precision": 0.05, "min_run_s": 30.0}
SEARCH_TOP = 3  # splits searched, of those a closed-loop screen ranks first


def profile(preset: str, accelerator: str, tensor_parallel: int, host: StageProfiles,
            api_costs: Path) -> StageProfiles:
    sheet, model = ACCELERATORS[accelerator], geometry(preset)
    return derive(model, host, device=sheet.name + " (derived)", peak_tflops=sheet.bf16_tflops,
                  hbm_gb_s=sheet.hbm_gb_s, memory_gib=sheet.memory_gib, nvlink_gb_s=sheet.nvlink_gb_s,
                  tensor_parallel=tensor_parallel, api_server=api_server_costs(model, api_costs))


def workload(preset: str, vir: bool, **changes) -> Workload:
    large = preset == "38b"
    base = dict(name=f"internvl3.5-{preset}{'-flash' if vir else ''}-2x1080p", images_per_request=2,
                image_px=(1920, 1080), text_tokens=128, output_tokens={128: 0.5, 256: 0.3, 512: 0.2},
                vir_compressed_share=0.5 if vir else 0.0, arrival_rate=1.0, requests=400,
                ttft_slo_s=4.0 if large else 2.0, tpot_slo_s=0.1 if large else 0.05, gpus=GPUS)
    return Workload(**(base | changes))


class Verdict(BaseModel):
    preset: str
    accelerator: str
    tensor_parallel: int
    vir: bool
    plan: Plan


def verdict(preset: str, accelerator: str, tensor_parallel: int, vir: bool, host: StageProfiles,
            api_costs: Path) -> Verdict:
    profiles = profile(preset, accelerator, tensor_parallel, host, api_costs)
    plan = make_plan(profiles, workload(preset, vir), search=True, search_options=SEARCH, search_top=SEARCH_TOP)
    return Verdict(preset=preset, accelerator=accelerator, tensor_parallel=tensor_parallel, vir=vir, plan=plan)


class Technique(BaseModel):
    name: str
    split: str
    sustained_p99_rps: float
    baseline_p99_rps: float
    ttft_p99_s: float | None = None  # at 70% of the baseline's sustained goodput
    baseline_ttft_p99_s: float | None = None

    @property
    def gain(self) -> float:
        return self.sustained_p99_rps / self.baseline_p99_rps if self.baseline_p99_rps else 0.0


def techniques(preset: str, accelerator: str, tensor_parallel: int, host: StageProfiles, api_costs: Path,
               best: tuple[int, int]) -> list[Technique]:
    """The three techniques on `best` (vision GPUs, language GPUs), each against plain DvD on the same split."""
    profiles = profile(preset, accelerator, tensor_parallel, host, api_costs)
    load = workload(preset, vir=False)
    v, lang = best
    base = sustained(profiles, load, v, lang, **SEARCH)
    probe = load.model_copy(update={"arrival_rate": 0.7 * base[99.0], "requests": 600})
    base_ttft = run(profiles, probe, v, lang).ttft_p99_s
    rows = []
    for name, option in (("spread images over vision GPUs", {"spread_images": True}),
                         ("prefill as features arrive", {"prefill_as_features_arrive": True})):
        rates = sustained(profiles, load, v, lang, techniques=option, **SEARCH)
        ttft = run(profiles, probe, v, lang, **option).ttft_p99_s
        rows.append(Technique(name=name, split=f"{v}V:{lang}L", sustained_p99_rps=rates[99.0],
                              baseline_p99_rps=base[99.0], ttft_p99_s=ttft, baseline_ttft_p99_s=base_ttft))
    rows.append(elastic(profiles, preset, tensor_parallel))
    return sorted(rows, key=lambda t: (-t.gain, (t.ttft_p99_s or 1.0) / (t.baseline_ttft_p99_s or 1.0)))


def elastic(profiles: StageProfiles, preset: str, tensor_parallel: int) -> Technique:
    """Two equally long phases at one arrival rate: a static split must sustain the rate in both
    (max over splits of the smaller phase capacity), an elastic one uses each phase's best split."""
    phases = [workload(preset, False, name="image burst", images_per_request=3, output_tokens=128),
              workload(preset, False, name="chat", images_per_request=1, image_px=(448, 448), text_tokens=512,
                       output_tokens=512)]
    every = [(v, GPUS - v) for v in range(1, GPUS) if (GPUS - v) % tensor_parallel == 0]
    splits = sorted(set().union(*(screen(profiles, phase, every, SEARCH_TOP) for phase in phases)))
    capacity = {(s, i): sustained(profiles, phase, *s, percentiles=(99.0,), **SEARCH)[99.0]
                for s in splits for i, phase in enumerate(phases)}
    static_split = max(splits, key=lambda s: min(capacity[(s, i)] for i in range(len(phases))))
    static = min(capacity[(static_split, i)] for i in range(len(phases)))
    elastic_rate = min(max(capacity[(s, i)] for s in splits) for i in range(len(phases)))
    return Technique(name="vision:language ratio following bursts", split=f"{static_split[0]}V:{static_split[1]}L "
                     "static", sustained_p99_rps=elastic_rate, baseline_p99_rps=static)
