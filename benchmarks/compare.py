"""`dvd bench compare`: the same runs against DvD and coupled `vllm serve`, one after the other (each system's
sustained-goodput search, then the sweep's load points if given), then both results files, a Markdown table and
plots (`benchmarks/report.py`). Each system is started here (`--model`), already running (its URLs), or read from
an earlier results file."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import write_comparison
from benchmarks.toolkit import servers
from benchmarks.toolkit.options import LoadOptions, WorkloadOptions
from benchmarks.toolkit.placement import Placement
from benchmarks.toolkit.search import GoodputSearch
from benchmarks.toolkit.sweep import RunOptions, bench, print_summary, write_results
from benchmarks.toolkit.workload import RequestBatches


@dataclass(frozen=True)
class Source:
    """Where a system's results come from: a results file, running servers, or (neither) a stack started here."""

    results: Path | None = None
    urls: list[str] | None = None


def started(system: str, model: Path, placement: Placement, log_dir: Path | None,
            stack: contextlib.ExitStack) -> servers.Target:
    """`system` serving `model` on free ports, stopped when `stack` closes; its logs in LOG_DIR/SYSTEM (default: a
    temporary folder), whose ends a start-up failure carries."""
    if log_dir:
        logs = log_dir / system
        logs.mkdir(parents=True, exist_ok=True)
    else:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"dvd-bench-{system}-")))
    start = servers.dvd if system == "DvD" else servers.coupled
    print(f"starting {system} ({model}, placement {placement.mode}); logs in {logs}", flush=True)
    try:
        return stack.enter_context(start(str(model), logs, placement=placement))
    except (RuntimeError, TimeoutError) as exc:
        ends = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs.glob("*.log"))
        raise RuntimeError(f"{system} did not start: {exc}\n{ends}") from None


async def _measured(system: str, target: servers.Target, placement: Placement, batches: RequestBatches,
                    options: RunOptions, api_key: str) -> dict:
    options.metrics_pages = target.metrics_pages
    cores = target.cores()  # read while the servers run, before the sweep
    document = await bench(target.urls, batches, options, api_key=api_key)
    document["placement"] = (placement.described(system, cores) if target.processes
                             else {"mode": "external", "urls": target.urls})
    return document


def measure(system: str, source: Source, model: Path | None, placement: Placement, workload: WorkloadOptions,
            load: LoadOptions, search: GoodputSearch | None, api_key: str, log_dir: Path | None) -> dict:
    """One system's results document: the search and the sweep sent to its running servers, or to a stack
    started here."""
    import asyncio

    options = load.run_options(workload.seed, {}, search)
    batches = workload.batches(len(options.points))
    with contextlib.ExitStack() as stack:
        target = servers.Target(source.urls) if source.urls else started(system, model, placement, log_dir, stack)
        return asyncio.run(_measured(system, target, placement, batches, options, api_key))


def compare_systems(sources: dict[str, Source], model: Path | None, placement: Placement, workload: WorkloadOptions,
                    load: LoadOptions, search: GoodputSearch | None, api_key: str, out_dir: Path, name: str,
                    log_dir: Path | None) -> Path:
    """Both systems' results (bench_NAME.json/.csv for DvD, coupled_NAME.json/.csv), then the comparison; returns
    the Markdown table's path."""
    servers.stop_on_sigterm()
    paths = {"DvD": out_dir / f"bench_{name}.json", "coupled": out_dir / f"coupled_{name}.json"}
    documents = {}
    for system, source in sources.items():
        if source.results:
            documents[system] = json.loads(source.results.read_text())
            continue
        documents[system] = measure(system, source, model, placement, workload, load, search, api_key, log_dir)
        write_results(documents[system], paths[system])
        print(f"{system}:")
        print_summary(documents[system])
    return write_comparison(documents, out_dir / f"bench_{name}_compare")
