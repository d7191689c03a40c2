"""The greedy-token agreement check of llama-server against transformers + PEFT, on canned answers."""

from __future__ import annotations

from loadtests.llama_cpp import agreement
from loadtests.llama_cpp.agreement import compare, leading_agreement


def test_leading_agreement_counts_the_shared_prefix():
    assert leading_agreement([1, 2, 3], [1, 2, 3]) == 3
    assert leading_agreement([1, 2, 3], [1, 9, 3]) == 1
    assert leading_agreement([1, 2], [1, 2, 3]) == 2
    assert leading_agreement([], [1]) == 0


def test_each_prompt_and_kind_is_compared_with_the_adapter_named_by_id(monkeypatch):
    ref = {"prompt_ids": [[5, 6], [7]], "base": [[1, 2, 3], [4, 4]], "adapter": [[1, 2, 9], [4, 4]]}
    answers = {(5, 6, None): [1, 2, 3], (5, 6, 3): [1, 2, 8], (7, None): [4, 4], (7, 3): [4, 4]}
    calls = []

    def generate(url, ids, lora, n):
        calls.append((ids, lora, n))
        on = [entry["id"] for entry in lora if entry["scale"] == 1.0]
        assert len(lora) == 2 and len(on) <= 1  # every loaded adapter is named, at most one applied
        return answers[(*ids, on[0] if on else None)]

    monkeypatch.setattr(agreement, "llama_generate", generate)
    monkeypatch.setattr(agreement, "llama_tokenize", lambda url, text: {"a": [5, 6], "b": [0, 7]}[text])
    got = compare("http://127.0.0.1:1", ref, {"other": 0, "mine": 3}, "mine", prompts=("a", "b"), new_tokens=3)
    assert [(r["prompt"], r["kind"], r["leading_agreement"], r["equal"]) for r in got["prompts"]] == [
        ("a", "base", 3, True),
        ("a", "adapter", 2, False),
        ("b", "base", 2, True),
        ("b", "adapter", 2, True),
    ]
    assert [r["same_prompt_tokens"] for r in got["prompts"]] == [True, True, False, False]
    assert got["all_equal"] is False and got["same_prompt_tokens"] is False
    assert got["adapter_changes_reference"] == 1
    assert {c[2] for c in calls} == {3}
