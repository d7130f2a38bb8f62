"""A plan as a Markdown table and PNG plots (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

from planner.plan import Plan, Summary


def _row(s: Summary, best: bool) -> str:
    rate = f"{s.max_slo_rate_rps:.2f}" if s.max_slo_rate_rps is not None else "-"
    loads = ", ".join(f"{pool} {load:.2f}" for pool, load in s.loads.items()) or "-"
    name = f"**{s.label}**" if best else s.label
    return (f"| {name} | {s.throughput_rps:.2f} | {s.goodput_rps:.2f} | {100 * s.slo_attainment:.0f}% | "
            f"{s.ttft_p50_s * 1e3:.0f} / {s.ttft_p90_s * 1e3:.0f} | {s.tpot_p50_s * 1e3:.1f} / {s.tpot_p90_s * 1e3:.1f}"
            f" | {rate} | {s.bottleneck} | {loads} |")


def markdown(plan: Plan) -> str:
    w = plan.workload
    arrival = f"Poisson {w.arrival_rate:g} req/s" if w.arrival_rate else f"closed loop, {w.concurrency} clients"
    lines = [
        f"Plan for {w.gpus} GPUs of `{plan.device}`, model geometry `{plan.geometry}` "
        f"({plan.provenance} profiles; coupled costs {plan.coupled_costs}).",
        f"Workload `{w.name}`: images/request {w.images_per_request}, tiles/image {w.tiles_per_image}, "
        f"text tokens {w.text_tokens}, output tokens {w.output_tokens}, ViR compressed share "
        f"{w.vir_compressed_share:g}; {arrival}, {w.requests} requests; SLOs TTFT <= {w.ttft_slo_s:g} s, "
        f"TPOT <= {w.tpot_slo_s * 1e3:g} ms.",
        "",
        "| split | throughput req/s | goodput req/s | SLO met | TTFT p50 / p90 ms | TPOT p50 / p90 ms "
        "| max SLO rate req/s | bottleneck | pool load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(s, s is plan.best) for s in plan.dvd]
    lines.append(_row(plan.coupled, False))
    if plan.best is not None:
        gain = plan.gain
        lines += ["", f"Best split: **{plan.best.label}** (bottleneck: {plan.best.bottleneck})"
                  + (f"; {gain:.2f}x coupled serving on the same {w.gpus} GPUs" if gain else "") + "."]
    lines += ["", "max SLO rate: the highest Poisson arrival rate at which 90% of requests meet both SLOs. "
              "pool load: demand over best-case capacity (full batches) at the achieved throughput; the "
              "highest one is the bottleneck."]
    return "\n".join(lines) + "\n"


def plots(plan: Plan, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [s.label for s in plan.dvd]
    x = list(range(len(labels)))
    searched = plan.coupled.max_slo_rate_rps is not None
    metric = "max_slo_rate_rps" if searched else "goodput_rps"
    title = "max arrival rate meeting SLOs (req/s)" if searched else "goodput (req/s)"

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(x, [getattr(s, metric) for s in plan.dvd], color="tab:blue", label="DvD")
    ax.axhline(getattr(plan.coupled, metric), color="tab:red", linestyle="--", label=plan.coupled.label)
    ax.set_xticks(x, labels)
    ax.set_xlabel("vision : language GPUs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    capacity = out_dir / "plan_capacity.png"
    fig.savefig(capacity, dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (p50, p90, name) in zip(axes, (("ttft_p50_s", "ttft_p90_s", "TTFT"), ("tpot_p50_s", "tpot_p90_s", "TPOT"))):
        ax.plot(x, [getattr(s, p50) * 1e3 for s in plan.dvd], "o-", label="DvD p50")
        ax.plot(x, [getattr(s, p90) * 1e3 for s in plan.dvd], "s-", label="DvD p90")
        ax.axhline(getattr(plan.coupled, p90) * 1e3, color="tab:red", linestyle="--", label=f"{plan.coupled.label} p90")
        slo = plan.workload.ttft_slo_s if name == "TTFT" else plan.workload.tpot_slo_s
        ax.axhline(slo * 1e3, color="grey", linestyle=":", label="SLO")
        ax.set_xticks(x, labels)
        ax.set_title(f"{name} (ms) at the workload's arrival")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    latency = out_dir / "plan_latency.png"
    fig.savefig(latency, dpi=80)
    plt.close(fig)
    return [capacity, latency]
