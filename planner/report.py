"""A plan as a Markdown table and PNG plots (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

from planner.plan import Plan, Summary


def _rate(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _row(s: Summary, best: bool) -> str:
    busy = ", ".join(f"{pool} {share:.2f}" for pool, share in s.busy_share.items()) or "-"
    name = f"**{s.label}**" if best else s.label
    return (f"| {name} | {_rate(s.sustained_p90_rps)} | {_rate(s.sustained_p99_rps)} | {s.goodput_rps:.2f} | "
            f"{100 * s.slo_attainment:.0f}% | {s.ttft_p50_s * 1e3:.0f} / {s.ttft_p99_s * 1e3:.0f} | "
            f"{s.tpot_p50_s * 1e3:.1f} / {s.tpot_p99_s * 1e3:.1f} | {s.bottleneck} | {busy} |")


def markdown(plan: Plan) -> str:
    w = plan.workload
    arrival = f"Poisson {w.arrival_rate:g} req/s" if w.arrival_rate else f"closed loop, {w.concurrency} clients"
    images = f"images of {w.image_px[0]}x{w.image_px[1]} px" if w.image_px else f"tiles/image {w.tiles_per_image}"
    lines = [
        f"Plan for {w.gpus} GPUs of `{plan.device}`, model geometry `{plan.geometry}` "
        f"({plan.provenance} profiles; coupled costs {plan.coupled_costs}).",
        f"Workload `{w.name}`: images/request {w.images_per_request}, {images}, "
        f"text tokens {w.text_tokens}, output tokens {w.output_tokens}, ViR compressed share "
        f"{w.vir_compressed_share:g}; {arrival}, {w.requests} requests; SLOs TTFT <= {w.ttft_slo_s:g} s, "
        f"TPOT <= {w.tpot_slo_s * 1e3:g} ms.",
        "",
        "| split | sustained goodput p90 req/s | sustained goodput p99 req/s | goodput req/s at the workload's rate "
        "| SLO met | TTFT p50 / p99 ms | TPOT p50 / p99 ms | bottleneck | busy share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(s, s is plan.best) for s in plan.dvd]
    lines.append(_row(plan.coupled, False))
    if plan.best is not None:
        if plan.coupled.sustained_p90_rps is not None:
            said = ", ".join(f"{g:.2f}x at p{p}" for p, g in ((p, plan.gain_at(p)) for p in (90, 99)) if g)
            said = said and f"; {said} coupled serving's sustained goodput on the same {w.gpus} GPUs"
        else:
            said = plan.gain and f"; {plan.gain:.2f}x coupled serving's goodput at the workload's rate"
        lines += ["", f"Best split: **{plan.best.label}** (bottleneck: {plan.best.bottleneck}){said or ''}."]
    lines += ["", "sustained goodput: the highest Poisson arrival rate whose run keeps its queue from growing (the "
              "last third's median TTFT under 1.5x the first third's) and meets both SLOs at that percentile "
              "(`planner/sustained.py`). goodput: throughput x the share of requests meeting both SLOs at the "
              "workload's own rate. busy share: the share of the run each pool's devices or processes worked; "
              "measured at the sustained rate when searched, and the bottleneck named from them (a front end or the "
              "vision pool once busy 90% of the time, else the language engines)."]
    return "\n".join(lines) + "\n"


def plots(plan: Plan, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [s.label for s in plan.dvd]
    x = list(range(len(labels)))
    searched = plan.coupled.sustained_p90_rps is not None
    metric = "sustained_p90_rps" if searched else "goodput_rps"
    title = "sustained goodput, SLOs at p90 (req/s)" if searched else "goodput (req/s)"

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(x, [getattr(s, metric) or 0.0 for s in plan.dvd], color="tab:blue", label="DvD")
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
