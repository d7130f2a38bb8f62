"""Every server's command line (`python -m dvd.cli ...`), built in this one place.

The launcher sits below the command line and never imports it, so these are the CLI's flags written as strings;
tests/test_command_lines.py parses each line with `dvd.cli`'s own parser, so a renamed flag fails a test, not a
deployment. An argument left at None is left off the line (the server's settings then decide).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def dvd(*args: str) -> list[str]:
    """`dvd ARGS` as this interpreter runs it."""
    return [sys.executable, "-m", "dvd.cli", *args]


def _flags(**values: object) -> list[str]:
    """`--name value` for each value given (underscores become dashes); a bool is `--name` or `--no-name`."""
    line: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            line.append(flag if value else "--no-" + flag[2:])
        else:
            line += [flag, str(value)]
    return line


def _repeated(flag: str, values: Sequence[str]) -> list[str]:
    return [arg for value in values for arg in (flag, value)]


def vision_server(model: str, *, host: str | None = None, port: int | None = None, metrics_port: int | None = None,
                  dtype: str | None = None, feature_dtype: str | None = None) -> list[str]:
    return dvd("vision-server", *_flags(model=model, host=host, port=port, feature_dtype=feature_dtype, dtype=dtype,
                                        metrics_port=metrics_port))


def language_server(model: str, *, host: str | None = None, port: int | None = None, feature_bind: str | None = None,
                    metrics_port: int | None = None, dtype: str | None = None,
                    max_model_len: int | None = None, engine_args: Sequence[str] = ()) -> list[str]:
    """The language server; `engine_args`: more of vLLM's engine arguments, spelled as `vllm serve` spells them."""
    return dvd("language-server", *_flags(model=model, host=host, port=port, dtype=dtype, max_model_len=max_model_len,
                                          feature_bind=feature_bind, metrics_port=metrics_port), *engine_args)


def gateway(vision_servers: Sequence[str], language_servers: Sequence[str], *, host: str | None = None,
            port: int | None = None, served_model_name: str | None = None,
            feature_cache: bool | None = None, config: str | None = None) -> list[str]:
    """The gateway in front of the servers at these gRPC addresses (`host:port`); `config`: a settings file
    (what no flag gives, e.g. the tenants and their keys)."""
    return dvd("gateway", *_flags(host=host, port=port, served_model_name=served_model_name),
               *_repeated("--vision-server", vision_servers), *_repeated("--language-server", language_servers),
               *_flags(feature_cache=feature_cache, config=config))


def up(model: str, *, port: int, vision_port: int, language_port: int, feature_port: int,
       vision_metrics_port: int | None = None, language_metrics_port: int | None = None,
       engine_args: Sequence[str] = ()) -> list[str]:
    """`dvd up`: the three servers of one stack, started by `dvd up` itself (`engine_args` go to the language
    server)."""
    return dvd("up", *_flags(model=model, port=port, vision_port=vision_port, language_port=language_port,
                             feature_port=feature_port, vision_metrics_port=vision_metrics_port,
                             language_metrics_port=language_metrics_port), *engine_args)
