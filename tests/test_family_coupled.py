"""InternVL3.5-20B-A4B's family (GPT-OSS language model) served by DvD and by coupled `vllm serve` of the same
custom-format checkpoint: the same prompts (token counts, with images) and the same greedy answers, each server
rendering the checkpoint's own chat template. Four servers (DvD's three and vLLM's), one module, as
tests/test_tools_e2e.py does for the dense family."""

from __future__ import annotations

import openai
import pytest

from benchmarks.toolkit.servers import VLLM_COMMAND
from checkpoint.generate import write_checkpoint
from conftest import data_url, make_image
from launcher import Servers, Stack, free_port, http_ready

pytestmark = pytest.mark.slow

PARSERS = {"DVD_LANGUAGE_TOOL_CALL_PARSER": "openai", "DVD_LANGUAGE_REASONING_PARSER": "openai_gptoss"}
IMAGES = [data_url(make_image(448, 448, 41)), data_url(make_image(896, 448, 42))]


def user(text: str, images: int) -> dict:
    return {"role": "user", "content": [*[{"type": "image_url", "image_url": {"url": u}} for u in IMAGES[:images]],
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = str(write_checkpoint(tmp_path_factory.mktemp("gpt-oss") / "custom", "tiny-gpt-oss", "custom"))
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), dtype="float32", feature_dtype="float32")
    coupled_port = free_port()
    commands = stack.commands()
    commands["coupled"] = [*VLLM_COMMAND, "serve", model,
                           "--port", str(coupled_port), "--trust-remote-code", "--max-model-len", "8192",
                           "--dtype", "float32", "--gpu-memory-utilization", "0.2", "--max-num-seqs", "4",
                           "--enforce-eager"]
    coupled_url = f"http://127.0.0.1:{coupled_port}"
    ready = [stack.ready(), http_ready(coupled_url)]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **PARSERS}
    with Servers(commands, log_dir=tmp_path_factory.mktemp("gpt-oss-logs"), env=env).running(
            lambda: all(check() for check in ready)):
        dvd = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=600)
        coupled = openai.OpenAI(base_url=f"{coupled_url}/v1", api_key="unused", max_retries=0, timeout=600)
        yield dvd, coupled, dvd.models.list().data[0].id, coupled.models.list().data[0].id


@pytest.mark.parametrize("images", [0, 1, 2])
def test_prompt_and_greedy_answer_equal_coupled_serving(servers, images):
    dvd, coupled, dvd_model, coupled_model = servers
    for messages in ([user("Describe this.", images)],
                     [{"role": "system", "content": "Be brief."}, user("What is it?", images),
                      {"role": "assistant", "content": "A picture."}, user("And the colours?", 0)]):
        kwargs = dict(messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        ours = dvd.chat.completions.create(model=dvd_model, **kwargs)
        theirs = coupled.chat.completions.create(model=coupled_model, **kwargs)
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens > 20 + 256 * images
        assert ours.choices[0].message.content == theirs.choices[0].message.content
