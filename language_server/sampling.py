"""A Generate request's sampling in vLLM's terms: its `SamplingParams`, the whitespace-free grammar that
constrains JSON output (a response format or a forced tool call), and vLLM's logprobs as proto messages."""

from __future__ import annotations

import json
import re

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from language_server.output import ToolsRequest
from proto import dvd_pb2

# xgrammar's messages begin with where they were raised: "[06:24:26] /project/cpp/json_schema_converter.cc:4950: ".
XGRAMMAR_LOCATION = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


def compact_json_grammar(schema: str) -> str:
    """The grammar of JSON matching `schema`, written without whitespace.

    vLLM's own JSON mode lets whitespace go between any two tokens unless the whole engine is set
    otherwise, and a weak model can then emit whitespace until max_tokens; so the schema is compiled
    here, per request, with xgrammar (vLLM's default structured-output backend), whitespace off.
    Unbounded strings and integers can still run to max_tokens: a schema bounds them with maxLength and
    minimum/maximum.
    """
    import xgrammar

    try:
        json.loads(schema)
        grammar = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":")))
        # xgrammar's string characters admit raw control characters (tab, U+0000...), which JSON forbids and
        # JSON parsers (vLLM's tool-call parsing among them) refuse: a weak model does emit them.
        return grammar.replace(r'[^\"\\\r\n]', r'[^\"\\\x00-\x1f]')
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    except RuntimeError as exc:  # xgrammar's message names the unsupported part of the schema, after its location
        raise ValueError(f"json_schema cannot be used: {XGRAMMAR_LOCATION.sub('', str(exc))}") from None


def to_vllm_sampling(params: dvd_pb2.SamplingParams, tools: ToolsRequest | None = None,
                     vocab_size: int | None = None) -> SamplingParams:
    """vLLM's sampling parameters; a forced tool choice's JSON schema wins over the request's own."""
    kwargs = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        if params.HasField(name):
            kwargs[name] = getattr(params, name)
    schema = tools.json_schema if tools is not None else None
    if schema or params.json_schema or params.json_object:
        kwargs["structured_outputs"] = StructuredOutputsParams(
            grammar=compact_json_grammar(schema or params.json_schema or '{"type": "object"}'))
    if params.logit_bias:
        too_large = [t for t in params.logit_bias if vocab_size is not None and t >= vocab_size]
        if too_large:
            raise ValueError(f"logit_bias token ids {sorted(too_large)[:5]} are not below the vocabulary size "
                             f"{vocab_size}")
        kwargs["logit_bias"] = dict(params.logit_bias)
    if tools is not None:
        kwargs["skip_special_tokens"] = tools.skip_special_tokens
    return SamplingParams(
        n=params.n or 1,
        max_tokens=params.max_tokens or None,
        stop=list(params.stop) or None,
        logprobs=params.top_logprobs if params.logprobs else None,
        ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        **kwargs,
    )


def token_logprobs(token_ids, logprobs, top_n: int) -> list[dvd_pb2.TokenLogprob]:
    """vLLM's per-token candidates (the top `top_n` plus the sampled token) as proto messages."""
    result = []
    for token_id, candidates in zip(token_ids, logprobs or []):
        chosen = candidates[token_id]
        ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank)[:top_n]
        result.append(
            dvd_pb2.TokenLogprob(
                token_id=token_id,
                token=chosen.decoded_token or "",
                logprob=chosen.logprob,
                top=[dvd_pb2.TopLogprob(token_id=t, token=c.decoded_token or "", logprob=c.logprob) for t, c in ranked],
            )
        )
    return result
