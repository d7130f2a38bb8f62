"""Comparison of two result documents of the same sweep: a Markdown table and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

COLUMNS = (("req/s", "request_throughput", "{:.2f}"), ("out tok/s", "output_throughput", "{:.1f}"),
           ("TTFT mean", "mean_ttft_ms", "{:.0f}"), ("TTFT p50", "p50_ttft_ms", "{:.0f}"),
           ("TTFT p99", "p99_ttft_ms", "{:.0f}"), ("TPOT mean", "mean_tpot_ms", "{:.1f}"),
           ("TPOT p99", "p99_tpot_ms", "{:.1f}"), ("ITL mean", "mean_itl_ms", "{:.1f}"),
           ("E2EL mean", "mean_e2el_ms", "{:.0f}"), ("E2EL p99", "p99_e2el_ms", "{:.0f}"))


def load_axis(documents: dict[str, dict]) -> tuple[str, list]:
    """What varies across the sweep's points: the concurrency cap if it does, else the request rate."""
    points = next(iter(documents.values()))["points"]
    if len({p["max_concurrency"] for p in points}) > 1 or points[0]["max_concurrency"]:
        return "max_concurrency", [p["max_concurrency"] for p in points]
    return "request_rate", [p["request_rate"] for p in points]


def check_same_sweep(documents: dict[str, dict]) -> None:
    """Refuse to compare runs of different workloads or load points."""
    (name_a, a), (name_b, b) = documents.items()
    for key in ("workload",):
        if a[key] != b[key]:
            raise ValueError(f"{name_a} and {name_b} ran different workloads: {a[key]} vs {b[key]}")
    loads = [[(p["request_rate"], p["max_concurrency"]) for p in d["points"]] for d in (a, b)]
    if loads[0] != loads[1]:
        raise ValueError(f"{name_a} and {name_b} ran different load points: {loads[0]} vs {loads[1]}")


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


def markdown(documents: dict[str, dict], plots: list[Path]) -> str:
    """The comparison table (one row per system and load point) with the runs' provenance."""
    axis, loads = load_axis(documents)
    (name_a, a), (name_b, b) = documents.items()
    lines = [f"# {name_a} vs {name_b}", "",
             f"Workload: `{a['workload']}`  ", f"Settings: `{a['settings']}`  ",
             *[f"Placement of {placement_line(name, d)}  " for name, d in documents.items()], "",
             f"| system | {axis} | ok / failed | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for i, load in enumerate(loads):
        for name, document in documents.items():
            p = document["points"][i]
            cells = [_fmt(template, p.get(key)) for _, key, template in COLUMNS]
            lines.append(f"| {name} | {load} | {p['completed']} / {p['failed']} | " + " | ".join(cells) + " |")
    lines += ["", "Latencies in ms; throughputs over each point's wall time (`vllm bench serve` definitions).", "",
              f"| {axis} | {name_a} / {name_b} output throughput | {name_a} / {name_b} mean TTFT |", "|---|---|---|"]
    for i, load in enumerate(loads):
        pa, pb = a["points"][i], b["points"][i]
        ratio = pa["output_throughput"] / pb["output_throughput"] if pb["output_throughput"] else None
        ttft = pa["mean_ttft_ms"] / pb["mean_ttft_ms"] if pb["mean_ttft_ms"] else None
        lines.append(f"| {load} | {_fmt('{:.2f}x', ratio)} | {_fmt('{:.2f}x', ttft)} |")
    stages = [(i, p["stages_ms"]) for i, p in enumerate(a["points"]) if p.get("stages_ms")]
    if stages:
        names = list(stages[0][1])
        lines += ["", f"{name_a} per-stage means (ms, from the servers' Prometheus histograms):", "",
                  f"| {axis} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {loads[i]} | " + " | ".join(_fmt("{:.1f}", s[n]) for n in names) + " |" for i, s in stages]
    lines += [""]
    for name, document in documents.items():
        lines += [f"{name}: `{document['command']}` at {document['started']}, {document['target']['base_url']}, "
                  f"load average {document['load_avg_before']} -> {document.get('load_avg_after')}, "
                  f"machine {document['machine']}, versions {document['versions']}  "]
    lines += [""] + [f"![{plot.stem}]({plot.name})" for plot in plots]
    return "\n".join(lines) + "\n"


def _x(loads: list) -> list[float]:
    return [float("inf") if v == "inf" else float(v) for v in loads]


def plot(documents: dict[str, dict], out_prefix: Path) -> list[Path]:
    """Throughput vs load, and TTFT / TPOT percentiles vs load, one PNG each."""
    axis, loads = load_axis(documents)
    x = _x(loads)
    label = "max concurrency" if axis == "max_concurrency" else "request rate (req/s)"
    written = []

    def save(figure, suffix: str) -> None:
        path = out_prefix.with_name(f"{out_prefix.name}_{suffix}.png")
        figure.tight_layout()
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, document in documents.items():
        left.plot(x, [p["output_throughput"] for p in document["points"]], marker="o", label=name)
        right.plot(x, [p["request_throughput"] for p in document["points"]], marker="o", label=name)
    left.set(xlabel=label, ylabel="output tokens/s", title="Output throughput")
    right.set(xlabel=label, ylabel="requests/s", title="Request throughput")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    save(figure, "throughput")

    for metric, title in (("ttft", "Time to first token"), ("tpot", "Time per output token")):
        figure, ax = plt.subplots(figsize=(6, 4))
        for (name, document), colour in zip(documents.items(), ("tab:blue", "tab:orange")):
            for percentile, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                values = [p.get(f"{percentile}_{metric}_ms") for p in document["points"]]
                if None not in values:
                    ax.plot(x, values, style, marker="o", color=colour, label=f"{name} {percentile}")
        ax.set(xlabel=label, ylabel="ms", title=f"{title} (percentiles)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(figure, metric)
    return written


def write_comparison(documents: dict[str, dict], out_prefix: Path) -> Path:
    """Plots and `<out_prefix>.md`; returns the Markdown path."""
    check_same_sweep(documents)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(documents, out_prefix)
    path = out_prefix.with_suffix(".md")
    path.write_text(markdown(documents, plots))
    return path
