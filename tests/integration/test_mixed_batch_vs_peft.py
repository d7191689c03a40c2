"""A mixed batch of many adapters equals transformers + PEFT run one request at a time."""

from __future__ import annotations

import time

import pytest
import torch

from server.engine.request import SamplingParams
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, last_logits, peft_model
from tests.helpers.tiny import MIXED_ADAPTERS, make_adapter, make_model, make_tokenizer

PROMPTS = [
    "the quick brown fox",
    "hello world",
    "a multi adapter lora server batches many",
    "numbers 0 1 2",
    "jumps over the lazy dog and",
    "this is a tiny",
    "punctuation . , ;",
    "the",
    "lora server",
    "one forward pass over many adapters, hello",
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _setup(arch, tokenizer, tmp_path_factory):
    base = make_model(arch, len(tokenizer), seed=1)
    store = tmp_path_factory.mktemp(f"store-{arch}")
    paths = {s.name: make_adapter(base, s, store, seed=10 + i) for i, s in enumerate(MIXED_ADAPTERS)}
    return base, store, paths


FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "llama3", "phi3", "phi4mini", "gemma", "gemma2", "gemma3", "olmo2",
            "granite", "smollm3"]
# The LoRA backends add into the same column views whatever the family: the CPU kernel (the default here) runs on
# every family, the torch one on those whose projections differ (split, with biases, q/k norms after them, fused),
# and the interpreted Triton one (about 9 s a family without a GPU) on split and fused projections.
PROJECTION_KINDS = ["llama", "qwen2", "qwen3", "phi3"]
BACKENDS = {"cpu": FAMILIES, "torch": PROJECTION_KINDS, "triton": ["llama", "phi3"]}


@pytest.fixture(scope="module", params=FAMILIES)
def arch_setup(request, tokenizer, tmp_path_factory):
    base, store, paths = _setup(request.param, tokenizer, tmp_path_factory)
    names = [s.name for s in MIXED_ADAPTERS]
    # 10 requests: 6 adapters + base-only requests, one adapter used twice.
    plan = [names[0], None, names[1], names[2], names[3], None, names[4], names[5], names[0], None]
    expected = []
    for prompt, adapter in zip(PROMPTS, plan, strict=True):
        model = peft_model(base, paths[adapter] if adapter else None)
        ids = tokenizer(prompt)["input_ids"]
        expected.append(greedy(model, ids, MAX_NEW, eos_token_id=0))
    return request.param, base, store, paths, plan, expected


@pytest.mark.parametrize(
    ("arch_setup", "backend"),
    [(arch, backend) for backend, archs in BACKENDS.items() for arch in archs],  # triton: interpreted without a GPU
    indirect=["arch_setup"],
)
def test_concurrent_mixed_batch_matches_peft(arch_setup, tokenizer, tmp_path, backend):
    arch, base, store, _, plan, expected = arch_setup
    serving = eng.build(base, tokenizer, store, tmp_path, backend=backend)
    serving.engine.start()
    try:
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        first = [
            eng.submit(serving, f"r{i}", tokenizer(PROMPTS[i])["input_ids"], plan[i], params) for i in range(6)
        ]
        # The rest arrive while the first ones are mid-generation.
        for sink in first[:2]:
            _wait_for_tokens(sink, 3)
        late = [
            eng.submit(serving, f"r{i}", tokenizer(PROMPTS[i])["input_ids"], plan[i], params)
            for i in range(6, len(PROMPTS))
        ]
        sinks = first + late
        for sink in sinks:
            assert sink.done.wait(60), "request did not finish"
    finally:
        serving.stop()
    adapter_outputs = 0
    for i, sink in enumerate(sinks):
        assert sink.last.error is None, sink.last.error
        assert sink.token_ids == expected[i], f"{arch}/{backend} request {i} (adapter {plan[i]})"
        adapter_outputs += plan[i] is not None
    # The adapters really change the output (otherwise the comparison proves little).
    base_only = {tuple(expected[i]) for i in range(len(plan)) if plan[i] is None}
    assert sum(tuple(expected[i]) not in base_only for i in range(len(plan)) if plan[i]) >= 5
    assert not serving.engine.scheduler.busy_slots()
    assert serving.engine.scheduler.blocks.used_blocks == 0


def test_mixed_prefill_logits_match_peft(arch_setup, tokenizer, tmp_path):
    """One packed forward pass over prompts of different adapters: logits within tolerance of PEFT."""
    from server.model.runner import SeqStep, one_adapter

    arch, base, store, paths, plan, _ = arch_setup
    serving = eng.build(base, tokenizer, store, tmp_path, backend="cpu")
    runner = serving.engine.runner
    cache = serving.engine.scheduler.residency
    seqs, refs, offset = [], [], 0
    for i, adapter in enumerate(plan):
        ids = tokenizer(PROMPTS[i])["input_ids"]
        slot = -1
        if adapter is not None:
            stored = serving.store.get(adapter)
            deadline = time.monotonic() + 30
            while (got := cache.acquire(stored, {})).slot < 0:  # the first call starts the disk load
                assert got.error is None, got.error
                assert time.monotonic() < deadline
                time.sleep(0.01)
            slot = got.slot
        blocks = list(range(offset, offset + 16))  # 16 blocks of 16 tokens, disjoint per sequence
        offset += 16
        seqs.append(SeqStep(ids, 0, blocks, one_adapter(slot), True))
        refs.append(last_logits(peft_model(base, paths[adapter] if adapter else None), ids))
    logits = runner.execute(seqs)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4, msg=f"{arch} request {i}")


def _wait_for_tokens(sink, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(sink.token_ids) < n and not sink.done.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.005)
