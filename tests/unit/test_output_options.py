"""Pieces of the output options on their own: the sampler's filters against transformers' warpers, tool-call
parsing, and the rewrite of length-bounded strings for xgrammar."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from server.api import tool_calls
from server.api.schemas import ChatCompletionRequest
from server.engine.grammar import bounded_strings
from server.engine.request import Request, SamplingParams
from server.engine.sampler import _filter_sorted


@pytest.mark.parametrize(("fields", "warpers"), [
    ({"top_k": 5}, [TopKLogitsWarper(5)]),
    ({"top_p": 0.7}, [TopPLogitsWarper(0.7)]),
    ({"min_p": 0.2}, [MinPLogitsWarper(0.2)]),
    ({"top_k": 8, "top_p": 0.5}, [TopKLogitsWarper(8), TopPLogitsWarper(0.5)]),
], ids=["top-k", "top-p", "min-p", "top-k-then-top-p"])
def test_the_filters_keep_the_tokens_transformers_warpers_keep(fields, warpers):
    torch.manual_seed(0)
    logits = torch.randn(6, 200) * 3
    reqs = [Request(f"r{i}", [1], SamplingParams(**fields)) for i in range(6)]
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    ours = torch.full_like(logits, float("-inf")).scatter(-1, order, _filter_sorted(ordered, reqs))
    theirs = logits.clone()
    for warp in warpers:
        theirs = warp(torch.zeros(6, 1, dtype=torch.long), theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_rows_without_filters_are_left_whole_beside_filtered_rows():
    ordered = torch.sort(torch.randn(2, 50), dim=-1, descending=True).values
    reqs = [Request("a", [1], SamplingParams()), Request("b", [1], SamplingParams(top_p=0.3, min_p=0.1))]
    out = _filter_sorted(ordered.clone(), reqs)
    assert torch.equal(out[0], ordered[0]) and 1 <= int((~torch.isinf(out[1])).sum()) < 50


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **fields})


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def test_auto_calls_are_read_from_tool_call_tags_and_the_rest_is_content():
    body = _chat(tools=[TOOL])
    text = 'Let me check.\n<tool_call>\n{"name": "lookup", "arguments": {"q": "paris"}}\n</tool_call>\n' \
           '<tool_call>{"name": "lookup", "arguments": "{\\"q\\": 2}"}</tool_call><tool_call>not json</tool_call>'
    content, calls = tool_calls.parse(text, "auto", body)
    assert content == "Let me check.\n\n<tool_call>not json</tool_call>"
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"q": "paris"}, {"q": 2}]
    assert tool_calls.parse("no calls here", "auto", body) == ("no calls here", [])
    _, one = tool_calls.parse(text, "auto", _chat(tools=[TOOL], parallel_tool_calls=False))
    assert len(one) == 1


def test_required_calls_are_a_json_list_and_a_cut_answer_stays_text():
    body = _chat(tools=[TOOL], tool_choice="required")
    _, calls = tool_calls.parse('[{"name": "lookup", "parameters": {"q": 1}}]', "required", body)
    assert calls[0]["function"] == {"name": "lookup", "arguments": '{"q": 1}'}
    assert tool_calls.parse('[{"name": "look', "required", body) == ('[{"name": "look', [])
    spec, _ = tool_calls.constraint(_chat(tools=[TOOL], tool_choice="required", parallel_tool_calls=False),
                                    "required")
    assert json.loads(spec.source)["maxItems"] == 1


def test_length_bounded_strings_become_patterns_and_nothing_else_changes():
    schema = {"type": "object", "properties": {
        "type": {"type": "string", "maxLength": 3},  # a property named "type"
        "tags": {"type": "array", "items": {"type": "string", "minLength": 2}},
        "code": {"type": "string", "maxLength": 4, "pattern": "^[A-Z]+$"},
        "odd": {"type": "string", "maxLength": "x"},
    }, "maxLength": 9}
    out = bounded_strings(schema)
    assert out["properties"]["type"] == {"type": "string", "pattern": "^[\\s\\S]{0,3}$"}
    assert out["properties"]["tags"]["items"] == {"type": "string", "pattern": "^[\\s\\S]{2,}$"}
    assert out["properties"]["code"] == schema["properties"]["code"]
    assert out["properties"]["odd"] == schema["properties"]["odd"]
    assert out["maxLength"] == 9


def test_rows_without_options_are_untouched_beside_rows_with_them():
    from server.engine.logits_processing import process

    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    reqs = [
        Request("plain", [1, 2], SamplingParams()),
        Request("pen", [3, 4, 4], SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)),
        Request("plain-2", [5], SamplingParams(temperature=0.5)),
        Request("bias", [6], SamplingParams(logit_bias=((7, 3.0), (7, 1.0)), min_tokens=2, stop_token_ids=(9,))),
    ]
    reqs[1].output_ids = [4, 4, 8]
    out = logits.clone()
    process(out, reqs, frozenset({0}))
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    want = logits[1].clone()
    for t in (3, 4, 8):  # in the prompt or the output: divided (positive) or multiplied (negative) by 2
        want[t] = want[t] / 2 if want[t] > 0 else want[t] * 2
    want[4] -= 1.0 + 0.5 * 2  # presence once, frequency per output occurrence
    want[8] -= 1.0 + 0.5
    assert torch.allclose(out[1], want)
    assert out[3, 7] == logits[3, 7] + 4.0 and out[3, 0] == out[3, 9] == float("-inf")
