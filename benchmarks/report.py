"""Comparison of two result documents of the same runs: sustained goodput (the headline, when searched) and the
load points, as Markdown tables and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from benchmarks.toolkit.metrics import percentile_name

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

COLUMNS = (("req/s", "request_throughput", "{:.2f}"), ("goodput", "request_goodput", "{:.2f}"),
           ("out tok/s", "output_throughput", "{:.1f}"),
           ("TTFT mean", "mean_ttft_ms", "{:.0f}"), ("TTFT p50", "p50_ttft_ms", "{:.0f}"),
           ("TTFT p99", "p99_ttft_ms", "{:.0f}"), ("TPOT mean", "mean_tpot_ms", "{:.1f}"),
           ("TPOT p99", "p99_tpot_ms", "{:.1f}"), ("ITL mean", "mean_itl_ms", "{:.1f}"),
           ("E2EL mean", "mean_e2el_ms", "{:.0f}"), ("E2EL p99", "p99_e2el_ms", "{:.0f}"))


def sweep(document: dict) -> list[dict]:
    """A document's load points proper (not the sustained-goodput search's runs)."""
    return [p for p in document["points"] if "search" not in p]


def load_axis(documents: dict[str, dict]) -> tuple[str, list]:
    """What varies across the sweep's points: the concurrency cap if it does, else the request rate."""
    points = sweep(next(iter(documents.values())))
    if len({p["max_concurrency"] for p in points}) > 1 or (points and points[0]["max_concurrency"]):
        return "max_concurrency", [p["max_concurrency"] for p in points]
    return "request_rate", [p["request_rate"] for p in points]


SEARCH_TERMS = ("ttft_slo_s", "tpot_slo_s", "least_requests", "least_seconds", "percentiles", "criterion")


def check_same_sweep(documents: dict[str, dict]) -> None:
    """Refuse to compare runs of different workloads, load points or sustained-goodput criteria."""
    (name_a, a), (name_b, b) = documents.items()
    for key in ("workload",):
        if a[key] != b[key]:
            raise ValueError(f"{name_a} and {name_b} ran different workloads: {a[key]} vs {b[key]}")
    loads = [[(p["request_rate"], p["max_concurrency"]) for p in sweep(d)] for d in (a, b)]
    if loads[0] != loads[1]:
        raise ValueError(f"{name_a} and {name_b} ran different load points: {loads[0]} vs {loads[1]}")
    if "sustained_goodput" in a and "sustained_goodput" in b:
        terms = [{k: d["sustained_goodput"]["settings"][k] for k in SEARCH_TERMS} for d in (a, b)]
        if terms[0] != terms[1]:
            raise ValueError(f"{name_a} and {name_b} searched sustained goodput under different terms: "
                             f"{terms[0]} vs {terms[1]}")


def _fmt(template: str, value) -> str:
    return "-" if value is None else template.format(value)


def _cores(cores: list[int]) -> str:
    return ",".join(map(str, cores)) if cores else "-"


def placement_line(name: str, document: dict) -> str:
    """How a system was run: placement mode, dtypes, replicas, and the cores each process was seen on."""
    placement = document.get("placement")
    if not placement:
        return f"{name}: placement not recorded"
    if placement["mode"] == "external":
        return f"{name}: running server(s) at {', '.join(placement['urls'])}, placement unknown"
    threads = placement.get("threads", {})
    processes = ", ".join(f"{server} on cores {_cores(cores)}"
                          + (f" ({threads[server]} thread{'s' * (threads[server] != 1)})" if server in threads else "")
                          for server, cores in placement.get("cores", {}).items())
    dtypes = f"dtype {placement['dtype']}" + (f", features {placement['feature_dtype']}"
                                              if "feature_dtype" in placement else "")
    replicas = placement.get("replicas", 1)
    balancing = f" ({placement['balancing']})" if replicas > 1 and "balancing" in placement else ""
    if "requests_sent" in document.get("target", {}):
        balancing += f", requests sent to each {document['target']['requests_sent']}"
    return f"{name}: placement `{placement['mode']}`, {dtypes}, {replicas} replica{'s' * (replicas != 1)}" \
           f"{balancing}; {processes}"


def sustained_section(documents: dict[str, dict]) -> list[str]:
    """The headline: each system's sustained goodput at p90 and p99 and their ratio, then the search's runs."""
    found = {name: document.get("sustained_goodput") for name, document in documents.items()}
    searched = [f for f in found.values() if f]
    if not searched:
        return ["Sustained goodput: not searched (`--search-goodput`); the load points follow.", ""]
    (name_a, a), (name_b, b) = found.items()
    settings = searched[0]["settings"]
    criterion = settings["criterion"]
    lines = [f"## Sustained goodput: {name_a} / {name_b}", "",
             f"The highest Poisson rate whose run holds TTFT <= {settings['ttft_slo_s'] * 1e3:g} ms and TPOT <= "
             f"{settings['tpot_slo_s'] * 1e3:g} ms at the percentile, with every request finished and no growing "
             f"queue (the last third's median TTFT at most {criterion['ttft_growth']:g}x the first third's, or "
             f"at most {criterion['growth_floor_of_ttft_slo']:.0%} of the TTFT SLO above it). Each rate's run: "
             f"{settings['run_length']} fresh requests; the search starts at {settings['start']:g} req/s, steps "
             f"x{settings['step']:g}, then bisects to {settings['precision']:.0%}.", "",
             f"| percentile | {name_a} req/s | {name_b} req/s | {name_a} / {name_b} |", "|---|---|---|---|"]
    for percentile in settings["percentiles"]:
        key = f"{percentile_name(percentile)}_rps"
        ours, theirs = (f.get(key) if f else None for f in (a, b))
        ratio = ours / theirs if ours is not None and theirs else None
        lines.append(f"| {percentile_name(percentile)} | {_fmt('{:.3g}', ours)} | {_fmt('{:.3g}', theirs)} | "
                     f"**{_fmt('{:.2f}x', ratio)}** |")
    lines += ["", "The search's runs, in the order run (TTFT growth: last third's median TTFT over the first's; "
              "goodput: that run's requests/s meeting both SLOs):", "",
              "| system | rate | requests ok / failed | p90 | p99 | TTFT p90 / p99 ms | TPOT p90 / p99 ms "
              "| TTFT growth | goodput |", "|---|---|---|---|---|---|---|---|---|"]
    for name, document in documents.items():
        for p in document["points"]:
            if "search" not in p:
                continue
            verdicts = p["search"]["verdicts"]
            cells = ["pass" if verdicts[k]["passed"] else f"fail ({verdicts[k]['reason']})" for k in ("p90", "p99")]
            lines.append(f"| {name} | {p['request_rate']:.3g} | {p['completed']} / {p['failed']} | {cells[0]} | "
                         f"{cells[1]} | {p['p90_ttft_ms']:.0f} / {p['p99_ttft_ms']:.0f} | {p['p90_tpot_ms']:.1f} / "
                         f"{p['p99_tpot_ms']:.1f} | {_fmt('{:.2f}', verdicts['p90']['ttft_growth'])} | "
                         f"{_fmt('{:.2f}', p.get('request_goodput'))} |")
    return lines + [""]


def sweep_section(documents: dict[str, dict]) -> list[str]:
    """One row per system and load point, the ratios at each point, and DvD's stage means."""
    axis, loads = load_axis(documents)
    if not loads:
        return []
    (name_a, a), (name_b, b) = documents.items()
    lines = ["## Load points", "", f"| system | {axis} | ok / failed | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for i, load in enumerate(loads):
        for name, document in documents.items():
            p = sweep(document)[i]
            cells = [_fmt(template, p.get(key)) for _, key, template in COLUMNS]
            lines.append(f"| {name} | {load} | {p['completed']} / {p['failed']} | " + " | ".join(cells) + " |")
    lines += ["", "Latencies in ms; throughputs over each point's wall time (`vllm bench serve` definitions); goodput "
              "under the settings' SLOs at that one rate.", "",
              f"| {axis} | {name_a} / {name_b} output throughput | {name_a} / {name_b} mean TTFT |", "|---|---|---|"]
    for load, pa, pb in zip(loads, sweep(a), sweep(b)):
        ratio = pa["output_throughput"] / pb["output_throughput"] if pb["output_throughput"] else None
        ttft = pa["mean_ttft_ms"] / pb["mean_ttft_ms"] if pb["mean_ttft_ms"] else None
        lines.append(f"| {load} | {_fmt('{:.2f}x', ratio)} | {_fmt('{:.2f}x', ttft)} |")
    stages = [(i, p["stages_ms"]) for i, p in enumerate(sweep(a)) if p.get("stages_ms")]
    if stages:
        names = list(stages[0][1])
        lines += ["", f"{name_a} per-stage means (ms, from the servers' Prometheus histograms):", "",
                  f"| {axis} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {loads[i]} | " + " | ".join(_fmt("{:.1f}", s[n]) for n in names) + " |" for i, s in stages]
    return lines + [""]


def markdown(documents: dict[str, dict], plots: list[Path]) -> str:
    """The comparison: sustained goodput first (when searched), then the load points, with the runs' provenance."""
    (name_a, a), (name_b, _) = documents.items()
    lines = [f"# {name_a} vs {name_b}", "",
             f"Workload: `{a['workload']}`  ", f"Settings: `{a['settings']}`  ",
             *[f"Placement of {placement_line(name, d)}  " for name, d in documents.items()], ""]
    lines += sustained_section(documents) + sweep_section(documents)
    for name, document in documents.items():
        lines += [f"{name}: `{document['command']}` at {document['started']}, {document['target']['base_url']}, "
                  f"load average {document['load_avg_before']} -> {document.get('load_avg_after')}, "
                  f"machine {document['machine']}, versions {document['versions']}  "]
    lines += [""] + [f"![{plot.stem}]({plot.name})" for plot in plots]
    return "\n".join(lines) + "\n"


def _x(loads: list) -> list[float]:
    return [float("inf") if v == "inf" else float(v) for v in loads]


def _saved(figure, out_prefix: Path, suffix: str) -> Path:
    path = out_prefix.with_name(f"{out_prefix.name}_{suffix}.png")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot(documents: dict[str, dict], out_prefix: Path) -> list[Path]:
    """The search's runs (TTFT and TPOT p90 by rate, passing runs filled), when searched; throughput vs load and
    TTFT / TPOT percentiles vs load, when the sweep had load points; one PNG each."""
    written = [plot_search(documents, out_prefix)] if any("sustained_goodput" in d for d in documents.values()) else []
    axis, loads = load_axis(documents)
    if not loads:
        return written
    x = _x(loads)
    label = "max concurrency" if axis == "max_concurrency" else "request rate (req/s)"
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, document in documents.items():
        left.plot(x, [p["output_throughput"] for p in sweep(document)], marker="o", label=name)
        right.plot(x, [p["request_throughput"] for p in sweep(document)], marker="o", label=name)
    left.set(xlabel=label, ylabel="output tokens/s", title="Output throughput")
    right.set(xlabel=label, ylabel="requests/s", title="Request throughput")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    written.append(_saved(figure, out_prefix, "throughput"))
    for metric, title in (("ttft", "Time to first token"), ("tpot", "Time per output token")):
        figure, ax = plt.subplots(figsize=(6, 4))
        for (name, document), colour in zip(documents.items(), ("tab:blue", "tab:orange")):
            for percentile, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                values = [p.get(f"{percentile}_{metric}_ms") for p in sweep(document)]
                if None not in values:
                    ax.plot(x, values, style, marker="o", color=colour, label=f"{name} {percentile}")
        ax.set(xlabel=label, ylabel="ms", title=f"{title} (percentiles)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_saved(figure, out_prefix, metric))
    return written


def plot_search(documents: dict[str, dict], out_prefix: Path) -> Path:
    """Each search run's p90 TTFT and TPOT by its rate: filled where the run passed at p90; the SLOs dashed and
    each system's sustained goodput at p90 dotted."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (name, document), colour in zip(documents.items(), ("tab:blue", "tab:orange")):
        runs = sorted((p for p in document["points"] if "search" in p), key=lambda p: p["request_rate"])
        found = document.get("sustained_goodput") or {}
        for ax, metric in zip(axes, ("ttft", "tpot")):
            ax.plot([p["request_rate"] for p in runs], [p[f"p90_{metric}_ms"] for p in runs], "-", color=colour,
                    alpha=0.4)
            for p in runs:
                filled = p["search"]["verdicts"]["p90"]["passed"]
                ax.plot(p["request_rate"], p[f"p90_{metric}_ms"], "o", color=colour,
                        markerfacecolor=colour if filled else "none")
            if found.get("p90_rps"):
                ax.axvline(found["p90_rps"], color=colour, linestyle=":", label=f"{name} sustained p90")
            slo = found.get("settings", {}).get(f"{metric}_slo_s")
            if slo:
                ax.axhline(slo * 1e3, color="grey", linestyle="--", linewidth=0.8)
    for ax, title in zip(axes, ("TTFT p90", "TPOT p90")):
        ax.set(xlabel="request rate (req/s)", ylabel="ms", title=f"{title} of each search run (filled: passed)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _saved(figure, out_prefix, "search")


def write_comparison(documents: dict[str, dict], out_prefix: Path) -> Path:
    """Plots and `<out_prefix>.md`; returns the Markdown path."""
    check_same_sweep(documents)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(documents, out_prefix)
    path = out_prefix.with_suffix(".md")
    path.write_text(markdown(documents, plots))
    return path
