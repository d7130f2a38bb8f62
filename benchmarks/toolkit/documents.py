"""Result documents: the command that made one, and the JSON file it goes to."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """The command as typed: `python -m MODULE ARGS`, `python SCRIPT ARGS`, or `dvd ARGS` for the `dvd` CLI."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None:
        module = spec.name.removesuffix(".__main__")
        program = ["dvd"] if module == "dvd.cli" else ["python", "-m", module]
    else:
        program = ["dvd"] if Path(sys.argv[0]).name == "dvd" else ["python", sys.argv[0]]
    return shlex.join([*program, *sys.argv[1:]])


def write(document: dict, path: Path) -> None:
    """The document as indented JSON in `path` (parent folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def print_and_write(document: dict, out: Path | None) -> None:
    """A benchmark's result document as indented JSON on stdout and, given `out`, in that file."""
    print(json.dumps(document, indent=2))
    if out:
        write(document, out)
