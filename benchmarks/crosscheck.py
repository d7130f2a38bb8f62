"""`vllm bench serve` and `dvd bench` on the same kind of workload against the same server, taking turns.

Evidence that the server speaks the API `vllm bench serve --backend openai-chat` expects and that both tools
measure the same thing: the rounds alternate the tools so slow drifts of the machine hit both alike, and each
run gets its own JSONL file (same sizes and lengths, other random pixels and words) so that no run is served
from what the server cached during the one before. Both warm up as vLLM does: the first request, repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.toolkit import servers
from benchmarks.toolkit.chat import served_model_at
from benchmarks.toolkit.documents import write as write_document
from benchmarks.toolkit.loadgen import LoadPoint
from benchmarks.toolkit.machine import load_average
from benchmarks.toolkit.options import RequestOptions
from benchmarks.toolkit.sweep import RunOptions, bench
from benchmarks.toolkit.workload import RequestBatches, read_jsonl, write_jsonl

COMPARED = ("completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")


def vllm_bench_command(base_url: str, model: str, tokenizer: str, jsonl: Path, num_requests: int, output_len: int,
                       point: LoadPoint, seed: int, warmup: int, result_dir: Path, result_file: str) -> list[str]:
    command = [*servers.VLLM_COMMAND, "bench", "serve", "--backend", "openai-chat",
               "--base-url", base_url, "--endpoint", "/v1/chat/completions", "--model", model,
               "--tokenizer", tokenizer, "--trust-remote-code", "--dataset-name", "custom_image",
               "--dataset-path", str(jsonl), "--disable-shuffle", "--num-prompts", str(num_requests),
               "--custom-output-len", str(output_len), "--ignore-eos", "--seed", str(seed),
               "--num-warmups", str(warmup), "--request-rate", str(point.request_rate),
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
               "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file,
               "--disable-tqdm"]
    return command + (["--max-concurrency", str(point.max_concurrency)] if point.max_concurrency else [])


async def crosscheck(base_url: str, model: str, tokenizer: str, rounds: list[tuple[Path, Path]], output_len: int,
                     point: LoadPoint, seed: int, warmup: int, described: dict) -> dict:
    """Each round runs vllm bench on its first JSONL file, then dvd bench on its second; returns every run's
    numbers and the ratios of the two tools' medians."""
    options = RunOptions(points=[point], seed=seed, progress=False)
    runs: dict[str, list[dict]] = {"vllm bench serve": [], "dvd bench": []}
    commands = {}
    with tempfile.TemporaryDirectory(prefix="dvd-crosscheck-") as tmp:
        for i, (theirs_jsonl, ours_jsonl) in enumerate(rounds):
            requests = read_jsonl(ours_jsonl, output_len)
            command = vllm_bench_command(base_url, model, tokenizer, theirs_jsonl, len(requests), output_len, point,
                                         seed, warmup, Path(tmp), f"round{i}.json")
            commands["vllm bench serve"] = command
            finished = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
            if finished.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed (exit {finished.returncode}):\n{finished.stdout[-3000:]}"
                                   f"\n{finished.stderr[-3000:]}")
            theirs = json.loads((Path(tmp) / f"round{i}.json").read_text())
            runs["vllm bench serve"].append({key: theirs.get(key) for key in COMPARED})
            workload = RequestBatches([requests[0]] * warmup, [requests], {"source": f"jsonl:{ours_jsonl}"})
            ours = await bench(base_url, workload, options, model=model)
            runs["dvd bench"].append({key: ours["points"][0].get(key) for key in COMPARED})
            commands["dvd bench"] = ours["command"]
    medians = {tool: {key: statistics.median(r[key] for r in results) for key in COMPARED}
               for tool, results in runs.items()}
    ratios = {key: medians["dvd bench"][key] / medians["vllm bench serve"][key]
              for key in COMPARED if medians["vllm bench serve"][key]}
    return {"target": {"base_url": base_url, "model": model}, "workload": described, "output_len": output_len,
            "load": {"request_rate": point.request_rate if point.request_rate != float("inf") else "inf",
                     "max_concurrency": point.max_concurrency},
            "rounds": len(rounds), "load_avg": load_average(),
            "vllm_bench_command": shlex.join(commands["vllm bench serve"]), "runs": runs,
            "medians": medians, "dvd_over_vllm": ratios}


def markdown(document: dict) -> str:
    """Medians of both tools side by side, and their ratio."""
    medians = document["medians"]
    lines = [f"# dvd bench vs vllm bench serve, same workload, same server ({document['rounds']} rounds each)", "",
             f"Target `{document['target']}`, load `{document['load']}`, workload `{document['workload']}`.", "",
             "| metric | vllm bench serve | dvd bench | dvd / vllm |", "|---|---|---|---|"]
    for key in COMPARED:
        ratio = document["dvd_over_vllm"].get(key)
        lines.append(f"| {key} | {medians['vllm bench serve'][key]:.2f} | {medians['dvd bench'][key]:.2f} | "
                     + ("-" if ratio is None else f"{ratio:.3f}") + " |")
    return "\n".join(lines + ["", f"`{document['vllm_bench_command']}`", ""])


def round_files(folder: Path, rounds: int, jsonl: Path | None, requests: RequestOptions):
    """Each round's two JSONL files (vLLM's, then ours) and the workload's description: the given file at every
    run, or a fresh file per run (seed + run index), so that no run meets requests the server has cached."""
    if jsonl:
        return [(jsonl, jsonl)] * rounds, {"source": f"jsonl:{jsonl}"}
    paths = [folder / f"run{i}.jsonl" for i in range(2 * rounds)]  # vllm, dvd, vllm, dvd, ...
    for i, path in enumerate(paths):
        made, described = requests.make(requests.num_requests, seed=requests.seed + i)
        write_jsonl(made, path)
    return list(zip(paths[::2], paths[1::2])), described | {"num_requests": requests.num_requests,
                                                            "seed": f"{requests.seed} + run index"}


def started_and_checked(model: Path | None, base_url: str | None, tokenizer: str, jsonl: Path | None,
                        requests: RequestOptions, rounds: int, point: LoadPoint, warmup: int) -> dict:
    """`crosscheck` against the server at `base_url`, or against a DvD stack of `model` started here."""
    servers.stop_on_sigterm()
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvd-crosscheck-")))
        files, described = round_files(folder, rounds, jsonl, requests)
        if model:
            print(f"starting DvD ({model}); logs in {folder}", flush=True)
            base_url = stack.enter_context(servers.dvd(str(model), folder)).base_url
        return asyncio.run(crosscheck(base_url, served_model_at(base_url), tokenizer, files, requests.output_len,
                                      point, requests.seed, warmup, described))


def write(document: dict, out: Path) -> None:
    """The document as JSON at `out`, its Markdown table beside it."""
    write_document(document, out)
    out.with_suffix(".md").write_text(markdown(document))
