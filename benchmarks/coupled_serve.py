"""The coupled baseline: vLLM's own OpenAI server running the whole InternVL model (fed pixels), on CPU too.

    python benchmarks/coupled_serve.py --model CHECKPOINT_HF --port 8100 --limit-mm-per-prompt '{"image": 4}'

The same as `vllm serve`, started from this file so that the torchvision work-around is imported first
here and in vLLM's spawned engine process (which re-runs this file as its main module).
"""

from language_server import torchvision_compat  # noqa: F401

if __name__ == "__main__":
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
