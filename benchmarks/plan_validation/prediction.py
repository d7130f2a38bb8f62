"""Plan validation's predictions: the planner's simulation of each measured configuration and workload, on the
stage profiles measured just before, and its error against the measurement."""

from __future__ import annotations

import json
import statistics

from benchmarks.plan_validation import IMAGE_TILES, RESULTS
from benchmarks.plan_validation.load import FIGURES
from benchmarks.plan_validation.plot import plot
from benchmarks.plan_validation.servers import cores
from planner.plan import run as predict
from planner.profiles import StageProfiles
from planner.workload import Workload

REPLICATIONS = 10  # simulated runs per configuration (seeds of the service-time spread), averaged


def add_prediction(row: dict, profiles: StageProfiles, requests: int, concurrency: int, max_tokens: int) -> None:
    """The simulation of `row`'s configuration and workload on `profiles` (the mean of REPLICATIONS runs with
    different seeds, as one measured run is one draw), and its error against the measurement."""
    servers, _, images = row["pair"].partition("x")
    vision, language = (int(n) for n in servers.split("+"))
    text_tokens = profiles.language.prefill[0].context_tokens - profiles.geometry.tokens_per_tile - 2
    runs = []
    for seed in range(REPLICATIONS):
        workload = Workload(name="validation", images_per_request=int(images or 1), tiles_per_image=IMAGE_TILES,
                            text_tokens=text_tokens, output_tokens=max_tokens, concurrency=concurrency,
                            requests=requests, ttft_slo_s=10, tpot_slo_s=1, gpus=max(2, vision + language), seed=seed)
        runs.append(predict(profiles, workload, vision, language, cores(vision, language) if vision else None))
    row["predicted"] = {key: round(statistics.mean(getattr(run, key) for run in runs), 4) for key in FIGURES}
    row["predicted"]["bottleneck"] = statistics.mode(run.bottleneck for run in runs)
    row["error_pct"] = {key: round(100 * (row["predicted"][key] - row["measured"][key]) / row["measured"][key], 1)
                        for key in FIGURES}


def repredict(name: str) -> None:
    """Recompute the predictions of a results file from its own profile file (after a change to the model)."""
    path = RESULTS / f"plan_validation_{name}.json"
    result = json.loads(path.read_text())
    profiles = StageProfiles.load(RESULTS.parent.parent / result["profiles"])
    w = result["workload"]
    for row in result["rows"]:
        if "measured" in row:
            add_prediction(row, profiles, w["requests"], w["concurrency"], w["max_tokens"])
            print(json.dumps(row), flush=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot([row for row in result["rows"] if "measured" in row], RESULTS / f"plan_validation_{name}.png")
