"""vLLM general plugin (entry point `vllm.general_plugins`): registers DvD's model architectures.

vLLM loads general plugins in each of its processes, so the classes are known to the engine and its
workers however they were started. New names change nothing for other users of vLLM; the language
server selects them through `hf_overrides`. The classes are registered as objects, not as lazy
"module:Class" strings, because vLLM inspects lazy ones in a fresh interpreter that would import
torchvision before the work-around in `language_server.torch_compat` could run.
"""

from __future__ import annotations

ARCHITECTURES = {"custom": "DvdInternVLChatModel", "hf": "DvdInternS1ForConditionalGeneration"}


def register() -> None:
    from vllm import ModelRegistry

    from language_server import vllm_models

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, getattr(vllm_models, name))
