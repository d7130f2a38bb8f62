"""torch_compat hides a companion library that cannot load, and leaves one that loads alone."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from language_server import torch_compat


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Two importable packages: `broken_ext` fails like a CUDA build beside the CPU torch, `sound_ext` loads."""
    (tmp_path / "broken_ext").mkdir()
    (tmp_path / "broken_ext" / "__init__.py").write_text(
        "from broken_ext import _lib\n")
    (tmp_path / "broken_ext" / "_lib.py").write_text(
        "raise OSError('Could not load this library: _broken_ext.so')\n")
    (tmp_path / "sound_ext").mkdir()
    (tmp_path / "sound_ext" / "__init__.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("broken_ext", "sound_ext")]:
        del sys.modules[name]


def test_a_library_that_cannot_load_looks_not_installed(packages):
    assert importlib.util.find_spec("broken_ext") is not None
    torch_compat._hide_if_broken("broken_ext")
    assert importlib.util.find_spec("broken_ext") is None  # how transformers and vLLM test for it
    assert "broken_ext._lib" not in sys.modules
    with pytest.raises(ImportError):
        importlib.import_module("broken_ext")


def test_a_library_that_loads_is_left_alone(packages):
    torch_compat._hide_if_broken("sound_ext")
    assert importlib.import_module("sound_ext").LOADED
    assert importlib.util.find_spec("sound_ext") is not None


def test_an_absent_library_stays_absent(packages):
    torch_compat._hide_if_broken("no_such_ext")
    assert "no_such_ext" not in sys.modules


def test_after_the_repairs_each_companion_library_imports_or_looks_absent():
    """The property transformers and vLLM rely on: a library that looks installed imports."""
    torch_compat.apply()  # idempotent: applied at import already
    for name in ("torchvision", *torch_compat.UNUSED_LIBRARIES):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
