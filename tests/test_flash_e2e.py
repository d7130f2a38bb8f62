"""A tiny InternVL3.5-Flash checkpoint end to end: ViR sends some tiles as 64 tokens, the language
server (vLLM, which skips the ViR weights) takes the mixed features, and ViR can be switched off or
re-thresholded per request."""

from __future__ import annotations

import dataclasses

import grpc
import openai
import pytest

from checkpoint.generate import write_checkpoint
from checkpoint.geometry import ModelConfig
from conftest import data_url, encode_to_local_receiver, free_port, make_image
from launcher import Stack

pytestmark = pytest.mark.slow

IMAGE = make_image(900, 300, seed=31)  # 3x1 grid + thumbnail: 4 tiles


@pytest.fixture(scope="module")
def flash_stack(tmp_path_factory):
    config = dataclasses.replace(ModelConfig.from_name("tiny"), flash=True)
    path = write_checkpoint(tmp_path_factory.mktemp("flash") / "tiny-flash", config, "custom")
    stack = Stack(model=str(path), gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port())
    with stack.servers(tmp_path_factory.mktemp("flash-logs")).running(stack.ready()):
        yield stack


def encode(stack: Stack, **vir) -> list[int]:
    """Tile tokens the vision server sends for IMAGE with the given ViR options."""
    reply, received = encode_to_local_receiver(stack.vision_port, IMAGE, **vir)
    assert received[0].tile_tokens == list(reply.images[0].tile_tokens)
    assert received[0].features.shape[0] == sum(received[0].tile_tokens)
    return list(reply.images[0].tile_tokens)


def test_vir_compresses_some_tiles_by_default(flash_stack):
    tokens = encode(flash_stack)
    assert sorted(set(tokens)) == [64, 256] and len(tokens) == 4


def test_vir_can_be_switched_off_or_rethresholded_per_request(flash_stack):
    assert encode(flash_stack, use_vir=False) == [256] * 4
    assert encode(flash_stack, vir_relative_threshold=1.0) == [256] * 4  # nothing is above the maximum
    assert encode(flash_stack, vir_relative_threshold=0.0).count(64) == 3  # all but the lowest p0


def test_vir_thresholds_outside_0_1_are_a_request_error(flash_stack):
    with pytest.raises(grpc.RpcError) as error:
        encode(flash_stack, vir_relative_threshold=2.0)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_chat_completion_with_mixed_64_and_256_token_tiles(flash_stack):
    client = openai.OpenAI(base_url=f"{flash_stack.gateway_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                             {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}]
    reply = client.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=messages,
                                           extra_body={"ignore_eos": True})  # four tokens, whatever they are
    assert reply.usage.prompt_tokens_details.image_tokens == sum(encode(flash_stack))
    assert reply.usage.prompt_tokens_details.image_tokens < 4 * 256
    assert reply.choices[0].message.content
