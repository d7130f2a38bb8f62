"""Accelerators by their data sheets: what the roofline needs (dense bf16 peak, HBM bandwidth and size, NVLink).

Every figure is NVIDIA's published one, named with its source; none is a measurement or a fit. What a real
kernel reaches of these peaks is a separate, stated efficiency (`planner.roofline.Efficiency`).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class Accelerator(BaseModel):
    name: str
    bf16_tflops: float = Field(gt=0)  # dense (no 2:4 sparsity)
    hbm_gb_s: float = Field(gt=0)
    memory_gib: float = Field(gt=0)
    nvlink_gb_s: float = Field(0.0, ge=0)  # per GPU, one direction (half the data sheet's bidirectional total)
    source: str = ""


ACCELERATORS: dict[str, Accelerator] = {
    "a100-80gb": Accelerator(
        name="NVIDIA A100 80GB SXM", bf16_tflops=312, hbm_gb_s=2039, memory_gib=80, nvlink_gb_s=300,
        source="NVIDIA A100 Tensor Core GPU data sheet: BF16 312 TFLOPS dense, 2,039 GB/s HBM2e (80GB SXM), "
               "NVLink 600 GB/s bidirectional"),
    "h100-sxm": Accelerator(
        name="NVIDIA H100 SXM", bf16_tflops=989, hbm_gb_s=3350, memory_gib=80, nvlink_gb_s=450,
        source="NVIDIA H100 Tensor Core GPU data sheet: BF16 1,979 TFLOPS with sparsity (989 dense), 3.35 TB/s "
               "HBM3, NVLink 900 GB/s bidirectional"),
    "h200": Accelerator(
        name="NVIDIA H200 SXM", bf16_tflops=989, hbm_gb_s=4800, memory_gib=141, nvlink_gb_s=450,
        source="NVIDIA H200 Tensor Core GPU data sheet: BF16 1,979 TFLOPS with sparsity (989 dense), 4.8 TB/s "
               "HBM3e, 141 GB, NVLink 900 GB/s bidirectional"),
}


def accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name]
    except KeyError:
        raise ValueError(f"unknown accelerator {name!r}; choose one of {sorted(ACCELERATORS)} "
                         "or give --peak-tflops and --hbm-gb-s") from None
