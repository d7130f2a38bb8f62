"""benchmarks/gpu_check: its CPU dry run (the CUDA parts need a lent GPU; benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_equivalence_dry_run_feeds_uint8_tiles_like_the_reference_and_measures_the_bf16_gap(tmp_path):
    """On the CPU the "device" is the CPU itself, so this pins down the check's own plumbing, not a device: the
    server's path (uint8 tiles, normalised by the model's loader) gives the float reference's features bit for
    bit, and the bf16 engine's gap to them is measured (non-zero) and within its tolerance. The CUDA comparison
    runs on a lent GPU (benchmarks/gpu_check.sh)."""
    done = run("equivalence", "--device", "cpu", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads((tmp_path / "equivalence.json").read_text())
    assert result["pass"] and result["normalize_bit_equal_on_device"]
    tiny = result["geometries"]["tiny"]
    assert tiny["fp32_device_vs_cpu_relative_l2"] == 0.0  # the same arithmetic on the same CPU: bit-equal
    assert 0 < tiny["bf16_vs_fp32_relative_l2"] < result["tolerances"]["bf16_vs_fp32_relative_l2"]


def test_pipeline_dry_run_writes_a_summary_and_a_trace(tmp_path):
    done = run("pipeline", "--device", "cpu", "--out", str(tmp_path), "--preset", "tiny", "--clients", "2",
               "--images-per-client", "2", "--tiles-per-image", "2", "--max-batch-tiles", "4")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((tmp_path / "pipeline.json").read_text())
    assert summary["tiles"] == 2 * 2 * 3 and summary["batches"] >= 3  # 2 tiles + thumbnail per image
    assert (tmp_path / summary["chrome_trace"]).stat().st_size > 0


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
