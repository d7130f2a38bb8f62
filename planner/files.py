"""The planner's input files (profiles, workloads, model geometries): JSON read into pydantic models, with errors
that name the file and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


def load_model(cls: type[ModelT], path: Path, what: str) -> ModelT:
    """A pydantic model read from a JSON file; any problem is a `ProfileError` naming the file and the field."""
    try:
        return cls.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such {what} file") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not JSON ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ProfileError(f"{path}: {problems}") from None
