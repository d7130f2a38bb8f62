"""A Generate request's sampling in vLLM's terms: every field carried over, the JSON grammar without whitespace,
logit bias checked against the vocabulary, and vLLM's logprobs as proto messages."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from vllm.logprobs import Logprob
from vllm.sampling_params import RequestOutputKind
from xgrammar.testing import _is_grammar_accept_string as accepts

from language_server.sampling import compact_json_grammar, to_vllm_sampling, token_logprobs
from proto import dvd_pb2

SCHEMA = json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                     "required": ["city"], "additionalProperties": False})


def tools(schema: str | None = None, skip_special_tokens: bool = False):
    """What `to_vllm_sampling` reads of a `ToolsRequest`."""
    return SimpleNamespace(json_schema=schema, skip_special_tokens=skip_special_tokens)


def test_every_field_given_is_carried_over():
    params = dvd_pb2.SamplingParams(
        temperature=0.5, top_p=0.75, top_k=7, min_p=0.125, seed=3, presence_penalty=0.25, frequency_penalty=-0.5,
        repetition_penalty=1.5, n=2, max_tokens=5, stop=["x", "yz"], logprobs=True, top_logprobs=3, ignore_eos=True)
    sampling = to_vllm_sampling(params)
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p, sampling.seed) == (
        0.5, 0.75, 7, 0.125, 3)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.25, -0.5, 1.5)
    assert (sampling.n, sampling.max_tokens, sampling.stop, sampling.logprobs) == (2, 5, ["x", "yz"], 3)
    assert sampling.ignore_eos and sampling.output_kind == RequestOutputKind.DELTA
    assert sampling.structured_outputs is None and sampling.logit_bias is None


def test_fields_left_out_get_vllms_defaults():
    sampling = to_vllm_sampling(dvd_pb2.SamplingParams())
    defaults = to_vllm_sampling(dvd_pb2.SamplingParams(max_tokens=1))  # any request without the optional fields
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p, sampling.seed) == (
        1.0, 1.0, 0, 0.0, None) == (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p,
                                    defaults.seed)
    assert (sampling.n, sampling.max_tokens, sampling.stop, sampling.logprobs) == (1, None, [], None)
    assert not sampling.ignore_eos and sampling.skip_special_tokens


def test_logprobs_without_the_flag_are_not_asked_for():
    assert to_vllm_sampling(dvd_pb2.SamplingParams(top_logprobs=5)).logprobs is None
    assert to_vllm_sampling(dvd_pb2.SamplingParams(logprobs=True)).logprobs == 0  # the chosen token's only


def test_logit_bias_is_kept_for_ids_below_the_vocabulary_size_and_refused_above():
    params = dvd_pb2.SamplingParams(logit_bias={49: 5.0, 0: -100.0})
    assert to_vllm_sampling(params, vocab_size=50).logit_bias == {49: 5.0, 0: -100.0}
    assert to_vllm_sampling(params).logit_bias == {49: 5.0, 0: -100.0}  # no vocabulary to check against
    with pytest.raises(ValueError, match=r"^logit_bias token ids \[50, 70\] are not below the vocabulary size 50$"):
        to_vllm_sampling(dvd_pb2.SamplingParams(logit_bias={70: 1.0, 50: 1.0, 3: 1.0}), vocab_size=50)
    many = {token: 1.0 for token in range(60, 66)}  # the message names the first five
    with pytest.raises(ValueError, match=r"^logit_bias token ids \[60, 61, 62, 63, 64\] are not below"):
        to_vllm_sampling(dvd_pb2.SamplingParams(logit_bias=many), vocab_size=50)


def test_a_json_schema_constrains_the_output_without_whitespace():
    grammar = to_vllm_sampling(dvd_pb2.SamplingParams(json_schema=SCHEMA)).structured_outputs.grammar
    assert grammar == compact_json_grammar(SCHEMA)
    assert accepts(grammar, '{"city":"Oslo"}')
    assert not accepts(grammar, '{"city": "Oslo"}') and not accepts(grammar, '{ "city":"Oslo"}')
    assert not accepts(grammar, '{"city":"Oslo","days":1}') and not accepts(grammar, '{"city":"Trondheim"}')


def test_a_json_string_admits_no_raw_control_character():
    """Neither a bounded string (maxLength: xgrammar's own character class lets them in; ours does not) nor a
    free one; JSON parsers, vLLM's tool-call parsing among them, refuse raw control characters."""
    bounded = compact_json_grammar(SCHEMA)
    assert accepts(bounded, '{"city":"a b"}')
    assert not accepts(bounded, '{"city":"a\tb"}') and not accepts(bounded, '{"city":"a\x00b"}')
    free = compact_json_grammar(json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}))
    assert accepts(free, '{"city":"a\\tb"}')  # escaped, as JSON wants
    assert not accepts(free, '{"city":"a\tb"}') and not accepts(free, '{"city":"a\x00b"}')


def test_properties_are_separated_by_a_bare_comma():
    grammar = compact_json_grammar(json.dumps({"type": "object", "properties": {"a": {"type": "integer"},
                                                                               "b": {"type": "integer"}},
                                               "required": ["a", "b"], "additionalProperties": False}))
    assert accepts(grammar, '{"a":1,"b":2}') and not accepts(grammar, '{"a":1, "b":2}')


def test_json_object_mode_is_any_object():
    grammar = to_vllm_sampling(dvd_pb2.SamplingParams(json_object=True)).structured_outputs.grammar
    assert accepts(grammar, '{"a":{"b":[null]}}') and not accepts(grammar, '{"a": 1}') and not accepts(grammar, "[1]")


def test_a_forced_tool_calls_schema_wins_over_the_requests_and_sets_special_token_handling():
    call = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    sampling = to_vllm_sampling(dvd_pb2.SamplingParams(json_schema=SCHEMA), tools(call, skip_special_tokens=False))
    assert accepts(sampling.structured_outputs.grammar, '{"n":1}')
    assert not accepts(sampling.structured_outputs.grammar, '{"city":"Oslo"}')
    assert not sampling.skip_special_tokens
    unforced = to_vllm_sampling(dvd_pb2.SamplingParams(), tools(None, skip_special_tokens=True))
    assert unforced.structured_outputs is None and unforced.skip_special_tokens


def test_a_bad_schema_is_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match="^json_schema is not valid JSON: Expecting"):
        compact_json_grammar("{not json")
    # xgrammar's message without its source location (time, file and line)
    with pytest.raises(ValueError, match=r"^json_schema cannot be used: Cannot find field nowhere in #/nowhere\n$"):
        compact_json_grammar(json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}))
    # only the location goes: a name with ": " in it stays whole
    with pytest.raises(ValueError, match=r"^json_schema cannot be used: Cannot find field no: where in #/no: where\n$"):
        compact_json_grammar(json.dumps({"type": "object", "properties": {"a": {"$ref": "#/no: where"}}}))


def test_token_logprobs_list_the_chosen_token_and_the_best_candidates_by_rank():
    candidates = {5: Logprob(-0.5, rank=2, decoded_token="b"), 9: Logprob(-0.1, rank=1, decoded_token="a"),
                  2: Logprob(-3.0, rank=3, decoded_token=None)}
    [entry] = token_logprobs([5], [candidates], top_n=2)
    assert (entry.token_id, entry.token, entry.logprob) == (5, "b", -0.5)
    assert [(t.token_id, t.token, t.logprob) for t in entry.top] == [(9, "a", pytest.approx(-0.1)),
                                                                     (5, "b", -0.5)]
    [unnamed] = token_logprobs([2], [candidates], top_n=3)
    assert unnamed.token == "" and [t.token for t in unnamed.top] == ["a", "b", ""]


def test_without_logprobs_there_are_none():
    assert token_logprobs([1, 2], None, top_n=5) == []
