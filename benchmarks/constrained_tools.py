"""Forced tool calls (`tool_choice` "required" or a named function) from DvD and from coupled `vllm serve
--enable-auto-tool-choice --tool-call-parser hermes` of the same checkpoint: how many come back as a call
whose arguments match the tool's schema, and how each completion finished.

With a weak model, vLLM's own grammar for these choices lets whitespace go between JSON tokens, and the
model may write whitespace until `max_tokens`; DvD compiles the grammar without whitespace:

    python -m benchmarks.constrained_tools --model checkpoints/tiny --seeds 10 \
        --out benchmarks/results/constrained_tools_cpu_tiny.json
"""

from __future__ import annotations

import json

import openai
import typer

from benchmarks.toolkit.chat import served_model
from benchmarks.toolkit.documents import command_line, write
from benchmarks.toolkit.machine import load_average, machine
from benchmarks.toolkit.options import CheckpointOption, OutOption
from benchmarks.toolkit.servers import coupled_command
from launcher import Servers, Stack, free_port, http_ready

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CHOICES = {"required": "required", "named": {"type": "function", "function": {"name": "get_weather"}}}


def valid(arguments: str) -> bool:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return False
    return (isinstance(value, dict) and set(value) == {"city", "days"} and isinstance(value["city"], str)
            and len(value["city"]) <= 12 and isinstance(value["days"], int) and 1 <= value["days"] <= 14)


def trial(client: openai.OpenAI, model: str, choice, seed: int, max_tokens: int) -> dict:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Paris for two days?"}], tools=[TOOL],
        tool_choice=choice, parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=max_tokens)
    calls = reply.choices[0].message.tool_calls or []
    return {"finish_reason": reply.choices[0].finish_reason, "calls": len(calls),
            "schema_valid": len(calls) == 1 and valid(calls[0].function.arguments),
            "completion_tokens": reply.usage.completion_tokens}


def main(model: CheckpointOption = "checkpoints/tiny", seeds: int = 10, max_tokens: int = 200,
         out: OutOption = None) -> None:
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port())
    coupled_port = free_port()
    commands = stack.commands()
    commands["coupled"] = coupled_command(model, coupled_port) + ["--enable-auto-tool-choice",
                                                                  "--tool-call-parser", "hermes"]
    urls = {"DvD": stack.gateway_url, "coupled": f"http://127.0.0.1:{coupled_port}"}
    ready = [http_ready(url) for url in urls.values()]
    results: dict = {}
    with Servers(commands, env={"VLLM_CPU_KVCACHE_SPACE": "1"}).running(lambda: all(r() for r in ready)):
        for system, url in urls.items():
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            served = served_model(client)
            for name, choice in CHOICES.items():
                trials = [trial(client, served, choice, seed, max_tokens) for seed in range(seeds)]
                results.setdefault(system, {})[name] = {
                    "schema_valid_calls": sum(t["schema_valid"] for t in trials), "trials": len(trials),
                    "finish_reasons": sorted({t["finish_reason"] for t in trials}), "each": trials}
    document = {"command": command_line(), "machine": machine() | {"load_1m": load_average()[0]},
                "tool": TOOL, "max_tokens": max_tokens, "temperature": 1.0, "results": results}
    summary = {system: {name: f"{r['schema_valid_calls']}/{r['trials']} valid, finish {r['finish_reasons']}"
                        for name, r in by_choice.items()} for system, by_choice in results.items()}
    print(json.dumps(summary, indent=2))
    if out:
        write(document, out)


if __name__ == "__main__":
    typer.run(main)
