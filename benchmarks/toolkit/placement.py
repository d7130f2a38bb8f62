"""Where `dvd bench compare` runs each server: floating over every core (`shared`), or each pinned to cores of
its own (`pinned`), the CPU stand-in for one GPU per server.

`pinned` splits this process's cores (`os.sched_getaffinity(0)`) into a language share (the lowest cores) and
a vision share (the highest `vision_cores`, default half). DvD's language server runs on the language share,
its vision server on the vision share, the gateway floats. Coupled serving gets the same devices: one `vllm
serve` replica per share (2 cores: two replicas of one core each), requests balanced across them by the load
generator (`benchmarks.toolkit.loadgen.Balancer`).

`pin` is the one place a server is pinned: `taskset -c` around its command, so every process it starts (vLLM's
engine core and worker included) inherits the cores, and thread counts equal to the core count: torch's
intra-op threads (`OMP_NUM_THREADS`, which the vision server's torch and vLLM's front-end processes read) and
vLLM's CPU worker threads, bound one per core (`VLLM_CPU_OMP_THREADS_BIND`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MODES = ("shared", "pinned")


def cpu_list(cores: Iterable[int]) -> str:
    """`0,2,3`: a core list as `taskset -c` and `VLLM_CPU_OMP_THREADS_BIND` take it."""
    return ",".join(str(c) for c in sorted(cores))


def split_cores(cores: Iterable[int], vision_cores: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(language cores, vision cores): the highest `vision_cores` (default half, rounded down) for vision, the
    rest for language; at least one each."""
    available = tuple(sorted(set(cores)))
    if len(available) < 2:
        raise ValueError(f"pinned placement needs at least 2 cores, this process may use {list(available)}")
    vision = len(available) // 2 if vision_cores is None else vision_cores
    if not 1 <= vision <= len(available) - 1:
        raise ValueError(f"--vision-cores must leave at least one core to each side: 1..{len(available) - 1} "
                         f"of the {len(available)} cores {list(available)}, got {vision}")
    return available[:-vision], available[-vision:]


def pin(command: Sequence[str], cores: Iterable[int], env: dict[str, str] | None = None) -> list[str]:
    """`command` on `cores` only, with as many compute threads as cores (see the module's docstring) and the
    environment variables `env` besides."""
    cores = cpu_list(cores)
    threads = len(cores.split(","))
    settings = [f"{name}={value}" for name, value in (env or {}).items()]
    return ["taskset", "-c", cores, "env", f"OMP_NUM_THREADS={threads}", f"VLLM_CPU_OMP_THREADS_BIND={cores}",
            *settings, *command]


@dataclass(frozen=True)
class Placement:
    """A comparison's placement and dtypes: what `compare` starts where."""

    mode: str = "shared"
    language: tuple[int, ...] = ()  # pinned: the language server's cores (coupled replica 0's)
    vision: tuple[int, ...] = ()  # pinned: the vision server's cores (coupled replica 1's)
    dtype: str = "bfloat16"  # language model (both systems) and vision encoder (both systems)
    feature_dtype: str = "bfloat16"  # DvD's features on the wire

    @classmethod
    def choose(cls, mode: str, vision_cores: int | None = None, dtype: str = "bfloat16",
               cores: Iterable[int] | None = None) -> Placement:
        if mode not in MODES:
            raise ValueError(f"placement must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "shared":
            if vision_cores is not None:
                raise ValueError("--vision-cores needs --placement pinned")
            return cls(mode, dtype=dtype, feature_dtype=dtype)
        language, vision = split_cores(os.sched_getaffinity(0) if cores is None else cores, vision_cores)
        return cls(mode, language, vision, dtype, dtype)

    @property
    def pinned(self) -> bool:
        return self.mode == "pinned"

    def dvd_cores(self) -> dict[str, tuple[int, ...]]:
        """Server name (as `launcher.Stack.commands` names them) -> its cores; absent: it floats."""
        return {"language-server": self.language, "vision-server": self.vision} if self.pinned else {}

    def coupled_cores(self) -> list[tuple[int, ...] | None]:
        """One entry per coupled replica: its cores, or None (floats)."""
        return [self.language, self.vision] if self.pinned else [None]

    def described(self, system: str, cores: dict[str, list[int]]) -> dict:
        """The results document's `placement`: the mode, the dtypes, the replica count and the cores each
        process was seen on (`cores`, from `processes.cores`)."""
        described = {"mode": self.mode, "dtype": self.dtype}
        if system == "DvD":
            described |= {"feature_dtype": self.feature_dtype, "replicas": 1}
        else:
            described |= {"replicas": len(self.coupled_cores()), "balancing": "least outstanding requests"}
        pinned = self.dvd_cores() if system == "DvD" else {
            f"coupled-{i}": c for i, c in enumerate(self.coupled_cores()) if c}
        return described | {"cores": cores, "threads": {name: len(c) for name, c in pinned.items()}}
