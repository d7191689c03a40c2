"""Sliding-window attention past the window, against transformers + PEFT: prompts longer than the window, prompt
chunks that cross it, and decodes far beyond it, for every layer windowed (Mistral), alternate layers with
soft-capped scores (Gemma 2), and the upper layers only (Qwen2's max_window_layers)."""

from __future__ import annotations

import pytest
import torch

from server.engine.request import SamplingParams
from server.model.runner import SeqStep
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, last_logits, peft_model
from tests.helpers.tiny import CORPUS, AdapterSpec, make_adapter, make_model, make_tokenizer

WINDOW = 8
MODELS = {
    "mistral": {"sliding_window": WINDOW},
    "gemma2": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
}
ADAPTER = AdapterSpec("qv-r8", 8, 16, ("q_proj", "v_proj", "down_proj"))
MAX_NEW = 40  # decode to 3-7 windows past each prompt


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=list(MODELS))
def windowed(request, tokenizer, tmp_path_factory):
    base = make_model(request.param, len(tokenizer), seed=3, **MODELS[request.param])
    store = tmp_path_factory.mktemp(f"window-{request.param}")
    adapter = make_adapter(base, ADAPTER, store, seed=4)
    # Prompts of 5 tokens (inside the window) to several windows long.
    prompts = [tokenizer(text)["input_ids"] for text in (CORPUS[0][:9], CORPUS[1], " ".join(CORPUS[:3]))]
    assert len(prompts[0]) < WINDOW < 3 * WINDOW < len(prompts[2])
    return request.param, base, store, adapter, prompts


def test_decodes_far_past_the_window_match_peft(windowed, tokenizer, tmp_path):
    """Prompts prefilled in 6-token chunks (so chunks straddle the window's edge) beside each other's decodes,
    base and adapter rows in one batch, greedy equal to transformers + PEFT."""
    arch, base, store, adapter, prompts = windowed
    plan = [(ids, name) for ids in prompts for name in (None, ADAPTER.name)]
    expected = [greedy(peft_model(base, adapter if name else None), ids, MAX_NEW, eos_token_id=None)
                for ids, name in plan]
    serving = eng.build(base, tokenizer, store, tmp_path, backend="cpu", max_num_batched_tokens=6)
    serving.engine.start()
    try:
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
        sinks = [eng.submit(serving, f"r{i}", ids, name, params) for i, (ids, name) in enumerate(plan)]
        for sink in sinks:
            assert sink.done.wait(120), "request did not finish"
    finally:
        serving.stop()
    for i, sink in enumerate(sinks):
        assert sink.last.error is None, sink.last.error
        assert sink.token_ids == expected[i], f"{arch} request {i} (prompt {len(plan[i][0])} tokens, {plan[i][1]})"
    assert len({tuple(e) for e in expected}) == len(expected)  # the adapter and the prompts all matter


def test_chunked_prefill_across_the_window_logits_match_peft(windowed, tokenizer, tmp_path):
    """The longest prompt fed in chunks of 5 (cached prefix, then each chunk's queries see part of it): the last
    chunk's logits within 1e-4 of transformers + PEFT over the whole prompt."""
    arch, base, store, _, prompts = windowed
    serving = eng.build(base, tokenizer, store, tmp_path, backend="cpu")
    runner = serving.engine.runner
    ids = prompts[2]
    blocks = list(range(-(-len(ids) // 16)))
    logits = None
    for start in range(0, len(ids), 5):
        logits = runner.execute([SeqStep(ids[start : start + 5], start, blocks, (), True)])
    torch.testing.assert_close(logits[0], last_logits(base, ids), rtol=1e-4, atol=1e-4, msg=arch)
    # Decode 10 tokens one at a time beyond it: each step's logits against the full forward pass.
    seq = list(ids)
    for _ in range(10):
        seq.append(int(logits[0].argmax()))
        blocks = list(range(-(-len(seq) // 16)))
        logits = runner.execute([SeqStep([seq[-1]], len(seq) - 1, blocks, (), True)])
        torch.testing.assert_close(logits[0], last_logits(base, seq), rtol=1e-4, atol=1e-4, msg=f"{arch} {len(seq)}")
    serving.stop()
