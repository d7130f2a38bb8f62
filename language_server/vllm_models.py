"""vLLM's InternVL model classes, fit for features of varying length per image.

vLLM validates image embeddings against a fixed `[images, tokens, hidden]` schema, so two images
of different tile counts in one engine step (one request, or two batched requests) raise inside the
engine process and kill it. DvD always sends `[tokens_i, hidden]` per image with tokens_i varying,
so these subclasses accept a list of such tensors; the language service has checked every tensor's
shape, dtype and hidden size before it reaches the engine.
"""

from __future__ import annotations

from vllm.model_executor.models.interns1 import InternS1ForConditionalGeneration, InternS1ImageEmbeddingInputs
from vllm.model_executor.models.internvl import InternVLChatModel, InternVLImageEmbeddingInputs
from vllm.model_executor.models.utils import AutoWeightsLoader

from checkpoint.formats import VIR_PREFIXES


class DvdInternVLChatModel(InternVLChatModel):
    """Custom (GitHub) format checkpoints, Flash ones included."""

    def load_weights(self, weights):
        # Flash checkpoints' ViR weights are the vision server's, never the language model's.
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=list(VIR_PREFIXES))
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)

    def _parse_and_validate_image_input(self, **kwargs):
        embeds = kwargs.get("image_embeds")
        if embeds is None:
            return super()._parse_and_validate_image_input(**kwargs)
        return InternVLImageEmbeddingInputs(type="image_embeds", data=embeds, validate=False)


class DvdInternS1ForConditionalGeneration(InternS1ForConditionalGeneration):
    """HF format checkpoints (`InternVLForConditionalGeneration`)."""

    def _parse_and_validate_image_input(self, **kwargs):
        embeds = kwargs.get("image_embeds")
        if embeds is None:
            return super()._parse_and_validate_image_input(**kwargs)
        return InternS1ImageEmbeddingInputs(type="image_embeds", data=embeds, validate=False)
