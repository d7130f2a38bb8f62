"""Lets `torchvision` import beside a CPU-only torch whose ABI its C extension does not match.

PyPI's torchvision wheel is a CUDA build; next to the CPU torch its C extension fails to load and
`import torchvision` then dies registering fake kernels for the missing `torchvision::nms` and
`torchvision::qnms` ops (its other fake kernels are skipped when the extension is absent). vLLM's
and transformers' InternVL code only need torchvision's pure-Python transforms, so defining those
two op schemas is enough. Nothing is done when the extension loads.

Importing this module applies the fix. `language_server` imports it first thing, so vLLM's engine
processes get it too: spawned children re-import the parent's main module, forked ones inherit it.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

# Ops that torchvision's `_meta_registrations` registers fake kernels for unconditionally.
_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_library: torch.library.Library | None = None


def _extension_loads() -> bool:
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


def apply() -> None:
    """Define torchvision's op schemas when its C extension cannot load; idempotent."""
    global _library
    if _library is not None or _extension_loads():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _OP_SCHEMAS:
        _library.define(schema)
    log.info("torchvision C extension unavailable; defined its op schemas so its Python parts import")


apply()
