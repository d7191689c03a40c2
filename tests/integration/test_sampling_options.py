"""Penalties, lengths, logit_bias, stop_token_ids, log-probs, n and best_of against transformers + PEFT.

Each option is checked against what transformers' own logits processors and
``generate`` give on the same weights and adapter (presence and frequency
penalties, which transformers does not have, against OpenAI's published
formula as a transformers ``LogitsProcessor``). The requests of each test run
together in one engine, so every batch mixes requests with and without the
options, base and adapter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LogitsProcessor, LogitsProcessorList

from server.api.app import create_app
from server.engine.request import SamplingParams
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import tiny_base_with_adapter

pytestmark = pytest.mark.usefixtures("c_kernels")

PROMPT = "the quick brown fox jumps over the lazy dog and then some more words follow here"
MAX_NEW = 14
VOCAB = 320  # the tiny tokenizer's
SELECTIONS = [None, "good"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    tok, base, folder = tiny_base_with_adapter(store)
    refs = {None: base, "good": peft_model(base, folder)}
    serving = eng.build(base, tok, store, tmp_path_factory.mktemp("cache"), kv_tokens=4096,
                        max_num_batched_tokens=16)  # prompts span several chunks
    serving.engine.start()
    yield tok, refs, serving
    serving.stop()


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's documented formula: ``mu[j] - c[j] * frequency - (c[j] > 0) * presence``, ``c[j]`` counting token
    ``j`` in the output so far (not the prompt)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.bincount(input_ids[0, self.prompt_len :], minlength=scores.shape[-1])[: scores.shape[-1]]
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@torch.inference_mode()
def reference(model, ids: list[int], eos: list[int], **kwargs) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, **kwargs)
    return out[0, len(ids) :].tolist()


def _cases(ids: list[int], plain: list[int]) -> dict[str, tuple[dict, dict]]:
    """name -> (our SamplingParams fields, transformers' generate arguments). ``plain``: the greedy output.
    (``allowed_token_ids`` is transformers' ``suppress_tokens`` of every other token.)"""
    n = len(ids)
    third = plain[2]
    allowed = (plain[3], 7, 11, 40, 0)
    return {
        "plain": ({}, {}),
        "repetition": ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
        "repetition-below-1": ({"repetition_penalty": 0.6}, {"repetition_penalty": 0.6}),
        "presence-frequency": ({"presence_penalty": 1.5, "frequency_penalty": 0.8},
                               {"logits_processor": LogitsProcessorList([OpenAIPenalties(n, 1.5, 0.8)])}),
        "negative-frequency": ({"frequency_penalty": -1.2},
                               {"logits_processor": LogitsProcessorList([OpenAIPenalties(n, 0.0, -1.2)])}),
        "logit-bias": ({"logit_bias": ((plain[1], -100.0), (7, 6.0), (plain[4], 2.5))},
                       {"sequence_bias": {(plain[1],): -100.0, (7,): 6.0, (plain[4],): 2.5}}),
        "stop-token": ({"stop_token_ids": (third,)}, {"eos": [0, third]}),
        "allowed-tokens": ({"allowed_token_ids": allowed},
                           {"suppress_tokens": [t for t in range(VOCAB) if t not in allowed]}),
        "min-tokens": ({"stop_token_ids": (third,), "min_tokens": 9}, {"eos": [0, third], "min_new_tokens": 9}),
        "all-at-once": (
            {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4,
             "logit_bias": ((plain[0], -3.0),), "min_tokens": 4, "stop_token_ids": (plain[5],)},
            {"repetition_penalty": 1.3, "sequence_bias": {(plain[0],): -3.0}, "eos": [0, plain[5]],
             "min_new_tokens": 4, "logits_processor": LogitsProcessorList([OpenAIPenalties(n, 0.5, 0.4)])},
        ),
    }


def test_penalties_bias_and_lengths_equal_transformers_processors_in_one_mixed_batch(world):
    tok, refs, serving = world
    ids = tok(PROMPT)["input_ids"]
    sinks, want = {}, {}
    for selection in SELECTIONS:
        plain = reference(refs[selection], ids, [0])
        assert len(plain) >= 6, plain
        for name, (ours, theirs) in _cases(ids, plain).items():
            theirs = dict(theirs)
            eos = theirs.pop("eos", [0])
            want[(selection, name)] = reference(refs[selection], ids, eos, **theirs)
            params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, **ours)
            sinks[(selection, name)] = eng.submit(serving, f"{selection}-{name}", ids, selection, params)
    for key, sink in sinks.items():
        assert sink.done.wait(60), key
        assert sink.error is None, (key, sink.error)
        assert sink.token_ids == want[key], key
        assert sink.last.finish_reason.value == ("stop" if len(want[key]) < MAX_NEW else "length"), key
    for selection in SELECTIONS:  # the options changed the answers: equality above is not the plain answer again
        plain = want[(selection, "plain")]
        changed = [name for (s, name), tokens in want.items() if s == selection and tokens != plain]
        assert len(changed) >= 8, (selection, changed)
        assert len(want[(selection, "stop-token")]) == 3 and len(want[(selection, "min-tokens")]) > 9


def test_min_tokens_holds_back_stop_strings_and_a_stop_string_may_be_kept(world):
    tok, refs, serving = world
    ids = tok(PROMPT)["input_ids"]
    plain = reference(refs["good"], ids, [0])
    text = tok.decode(plain, skip_special_tokens=True)
    early = text[1:3]  # a stop string the answer reaches within its first few tokens
    stopped = eng.submit(serving, "s1", ids, "good", SamplingParams(max_tokens=MAX_NEW, temperature=0, stop=(early,)))
    held = eng.submit(serving, "s2", ids, "good",
                      SamplingParams(max_tokens=MAX_NEW, temperature=0, stop=(early,), min_tokens=MAX_NEW))
    kept = eng.submit(serving, "s3", ids, "good",
                      SamplingParams(max_tokens=MAX_NEW, temperature=0, stop=(early,), include_stop_str=True))
    assert stopped.done.wait(60) and held.done.wait(60) and kept.done.wait(60)
    assert stopped.text == text[:1] and stopped.last.finish_reason.value == "stop"
    assert kept.text == text[:3] and kept.token_ids == stopped.token_ids
    assert len(stopped.token_ids) < MAX_NEW // 2
    assert held.token_ids == plain[:MAX_NEW] and held.last.finish_reason.value == "length"
    assert held.text.startswith(text[:3])


@torch.inference_mode()
def log_softmax_rows(model, tokens: list[int]) -> torch.Tensor:
    """transformers' log-softmax after every position of ``tokens`` (fp32)."""
    return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("selection", SELECTIONS, ids=["base", "adapter"])
def test_logprobs_and_prompt_logprobs_equal_transformers_log_softmax(world, selection):
    tok, refs, serving = world
    ids = tok(PROMPT)["input_ids"]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=5, prompt_logprobs=3,
                            presence_penalty=1.0)  # a filter: the log-probs stay the model's
    runs = [eng.submit(serving, f"lp-{selection}-{i}", ids, selection, params) for i in range(2)]
    for sink in runs:
        assert sink.done.wait(60) and sink.error is None
    out = runs[0].token_ids
    truth = log_softmax_rows(refs[selection], ids + out)
    for sink in runs:  # the second found the prompt's blocks cached, and still has every prompt position
        assert sink.token_ids == out
        got = [lp for o in sink.outputs for lp in o.logprobs]
        assert [g.token_id for g in got] == [t for t in out if t != 0]
        for i, g in enumerate(got):
            row = truth[len(ids) - 1 + i]
            assert math.isclose(g.logprob, float(row[g.token_id]), abs_tol=1e-4), (i, g.logprob)
            assert [t for t, _ in g.top] == row.topk(5).indices.tolist()
            assert max(abs(v - float(row[t])) for t, v in g.top) < 1e-4
        prompt = sink.outputs[0].prompt_logprobs
        assert prompt is not None and [p.token_id for p in prompt] == ids[1:]
        for pos, p in enumerate(prompt, start=1):
            row = truth[pos - 1]
            assert math.isclose(p.logprob, float(row[ids[pos]]), abs_tol=1e-4), pos
            assert p.rank == int((row > row[ids[pos]]).sum()) + 1
            assert [t for t, _ in p.top] == row.topk(3).indices.tolist()
    assert runs[1].last.cached_tokens == 0  # prompt log-probs need every prompt token computed


def test_n_choices_share_the_prompt_and_best_of_keeps_the_likeliest(world, tmp_path):
    tok, refs, serving = world
    store = serving.config.lora.adapters_dir
    app = create_app(lambda: eng.build(refs[None], tok, store, tmp_path, kv_tokens=4096))
    with TestClient(app) as client:
        body = {"model": "good", "prompt": PROMPT + " again", "max_tokens": 8, "temperature": 0, "n": 3}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        ids = tok(body["prompt"])["input_ids"]
        want = tok.decode(reference(refs["good"], ids, [0])[:8], skip_special_tokens=True)
        assert [c["index"] for c in choices] == [0, 1, 2] and {c["text"] for c in choices} == {want}
        usage = r.json()["usage"]
        full_blocks = (len(ids) - 1) // 16 * 16
        assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == 24  # the prompt counted once
        assert usage["prompt_tokens_details"]["cached_tokens"] == full_blocks > 0  # the copies found its blocks
        hits = client.get("/metrics").text
        assert f"loraplex_prefix_cache_hits_tokens_total {2 * full_blocks}.0" in hits  # both copies did

        sampled = {"model": "good", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 42}
        r = client.post("/v1/completions", json={**sampled, "n": 4, "logprobs": 0})
        assert r.status_code == 200, r.text
        candidates = r.json()["choices"]
        assert len({c["text"] for c in candidates}) > 1  # seeds 42, 43, ... draw differently
        sums = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
        best = client.post("/v1/completions", json={**sampled, "best_of": 4, "n": 2})
        assert best.status_code == 200, best.text
        order = sorted(range(4), key=lambda i: sums[i], reverse=True)
        assert [c["text"] for c in best.json()["choices"]] == [candidates[i]["text"] for i in order[:2]]
        assert best.json()["usage"]["completion_tokens"] == r.json()["usage"]["completion_tokens"]


def test_logprobs_in_openai_shapes_echo_and_streaming(world, tmp_path):
    tok, refs, serving = world
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    store = serving.config.lora.adapters_dir
    app = create_app(lambda: eng.build(refs[None], tok, store, tmp_path, kv_tokens=4096))
    with TestClient(app) as client:
        ids = tok(PROMPT)["input_ids"]
        body = {"model": "good", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "logprobs": 2, "echo": True}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith(PROMPT) and len(lp["tokens"]) == len(ids) + 6
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert "".join(lp["tokens"]) == choice["text"]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
        out = greedy(refs["good"], ids, 6, None)
        truth = log_softmax_rows(refs["good"], ids + out)
        for pos in range(1, len(ids) + 6):
            token = (ids + out)[pos]
            assert math.isclose(lp["token_logprobs"][pos], float(truth[pos - 1, token]), abs_tol=1e-4), pos
            assert len(lp["top_logprobs"][pos]) in (2, 3)  # the top 2, and the chosen token when not among them

        chat = {"model": "good", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
                "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
        answer = client.post("/v1/chat/completions", json=chat).json()["choices"][0]
        content = answer["logprobs"]["content"]
        assert len(content) == 6 and all(len(e["top_logprobs"]) == 3 for e in content)
        joined = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", errors="replace")
        assert joined == answer["message"]["content"]
        assert all(e["top_logprobs"][0]["logprob"] >= e["logprob"] for e in content)
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = [e for ch in chunks for e in (ch["choices"][0]["logprobs"] or {"content": []})["content"]]
        assert streamed == content
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        tokens = [t for ch in chunks for t in (ch["choices"][0]["logprobs"] or {"tokens": []})["tokens"]]
        assert tokens == lp["tokens"] and "".join(ch["choices"][0]["text"] for ch in chunks) == choice["text"]
        prompt_lp = client.post("/v1/completions", json={**body, "echo": False, "logprobs": None,
                                                         "prompt_logprobs": 1}).json()["choices"][0]
        assert prompt_lp["prompt_logprobs"][0] is None and len(prompt_lp["prompt_logprobs"]) == len(ids)
        second = prompt_lp["prompt_logprobs"][1][str(ids[1])]
        assert math.isclose(second["logprob"], float(truth[0, ids[1]]), abs_tol=1e-4)
