"""vLLM general plugin (entry point `vllm.general_plugins`): registers DvD's model architectures.

vLLM loads general plugins in each of its processes, so the classes are known to the engine and its
workers however they were started. New names change nothing for other users of vLLM; the language
server selects them through `hf_overrides`. The classes are registered as objects, not as lazy
"module:Class" strings, because vLLM inspects lazy ones in a fresh interpreter that would import
torchvision before the work-around in `language_server.torch_compat` could run.

In the language server's own engine (`BUSY_POLL_ENV` set, inherited by its processes), it also shortens
how long vLLM's worker busy-polls for the next step, and (`EXIT_FAST_ENV`) lets each process exit without a last
garbage collection; elsewhere both stay vLLM's.
"""

from __future__ import annotations

import atexit
import gc
import os

ARCHITECTURES = {"custom": "DvdInternVLChatModel", "hf": "DvdInternS1ForConditionalGeneration"}
BUSY_POLL_ENV = "DVD_ENGINE_BUSY_POLL_S"
EXIT_FAST_ENV = "DVD_ENGINE_EXIT_FAST"


def register() -> None:
    from vllm import ModelRegistry

    from language_server import vllm_models

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, getattr(vllm_models, name))
    if os.environ.get(BUSY_POLL_ENV):
        shorten_busy_poll(float(os.environ[BUSY_POLL_ENV]))
    if os.environ.get(EXIT_FAST_ENV):
        skip_final_collection()


def skip_final_collection() -> None:
    """Freeze the heap when the process exits, so that the interpreter's last garbage collection skips it: over
    the heap of torch, vLLM and transformers that collection took 2-3 s per process on two busy cores, and vLLM's
    shutdown gives its engine process 5 s before it kills it (its worker's collection comes first); a language
    server then took 6-12 s to stop on SIGTERM, 1.5 s with this. The memory goes back to the system with the
    process either way. vLLM does the same on ROCm after a clean shutdown. One side effect: nanobind extensions
    (triton's) list their still-living objects as "leaked" on the way out. The language server's own process
    gets it too: `build_engine` sets `EXIT_FAST_ENV` before it calls `register`."""
    atexit.register(gc.freeze)


def shorten_busy_poll(seconds: float) -> None:
    """vLLM's shared-memory queue readers (the worker waiting for the engine's next step) spin, yielding the
    CPU, for 1 s after each read before they sleep on a socket. Behind DvD the engine idles between requests
    while the gateway and the vision server work, and that spin would take a core from the vision server;
    after `seconds` without a step the reader sleeps and the next step wakes it (a socket ping)."""
    from vllm.distributed.device_communicators import shm_broadcast

    init = shm_broadcast.SpinCondition.__init__
    if getattr(init, "dvd_busy_poll_s", None) is not None:
        return

    def __init__(self, is_reader, context, notify_address, busy_loop_s: float = seconds):
        init(self, is_reader, context, notify_address, busy_loop_s)

    __init__.dvd_busy_poll_s = seconds
    shm_broadcast.SpinCondition.__init__ = __init__
