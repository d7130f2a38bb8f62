"""Plan validation's figure: predicted against measured throughput and TTFT, one bar pair per configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.plan_validation.load import FIGURES


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["config"] for row in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, FIGURES, ("throughput (req/s)", "TTFT p50 (s)", "TTFT p90 (s)")):
        means = np.array([row["measured"][key] for row in rows])
        runs = [[run[key] for run in row.get("measured_runs", [row["measured"]])] for row in rows]
        spread = [means - [min(r) for r in runs], [max(r) for r in runs] - means]  # the runs' range
        ax.bar(x - 0.2, means, 0.4, yerr=spread, capsize=3, label="measured (mean, range of runs)")
        ax.bar(x + 0.2, [row["predicted"][key] for row in rows], 0.4, label="predicted")
        ax.set_xticks(x, labels, fontsize=8, rotation=20)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("Planner: predicted vs measured (CPU, tiny checkpoint)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
