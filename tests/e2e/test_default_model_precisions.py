"""The default model in the other precisions the server offers, on the engine in-process.

* ``--dtype bfloat16``: greedy outputs equal transformers + PEFT run in bf16, base and with an adapter;
* ``--quantization auto`` (the GGUF's own Q4_1/Q8_0 codes), with an adapter, prefill and decode:
  by default (``--activations exact``) the logits of serving the dequantized fp32 model
  (``--quantization none``), to fp32 rounding; with ``--activations int8``, where steps of up to 2
  tokens (the lm_head of every step among them) take integer dot products on 8-bit activations as
  llama.cpp computes, the same top token and on average within a tenth of the logits' spread
  (measured: 0.015 prefill, 0.05 decode). The kernel's own tests hold both paths to their references;
* ``--quantization int8`` / ``int4``: requests with adapters complete, and greedy outputs stay close
  to fp32's (the quality figures themselves are loadtests/bench/quantization_quality.py's).
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_store.validation import inspect
from server.config import CacheConfig, Config, LoraConfig, ModelConfig
from server.engine.builder import build_serving, build_serving_in_fresh_thread
from server.engine.request import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.lora.weights import load_weights
from server.model.default_model import default_gguf_path
from server.model.loading import LoadedModel
from server.model.quantized import KERNEL_TOKENS
from server.model.runner import SeqStep
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, make_adapter

pytestmark = pytest.mark.e2e

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The opposite of hot is"]
NEW = 12


@pytest.fixture(scope="module")
def store(default_model, tmp_path_factory):
    model, _ = default_model
    folder = tmp_path_factory.mktemp("store")
    make_adapter(model, AdapterSpec("all7", 16, 32, ALL7), folder, seed=11, std=0.05)
    return folder


def _serving(default_model, default_model_dir, store, cache, **model_flags):
    model, tokenizer = default_model
    loaded = LoadedModel(model, tokenizer, "SmolLM2-135M-Instruct", default_model_dir, gguf=default_gguf_path())
    config = Config(
        model=ModelConfig(cache_dir=cache, **model_flags),
        lora=LoraConfig(adapters_dir=store, max_lora_rank=16, max_loras=2),
        cache=CacheConfig(kv_cache_tokens=2048),
        scheduler=SchedulerConfig(max_model_len=2048),
    )
    return build_serving_in_fresh_thread(config, loaded)


def _generate(serving, tokenizer, plan):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    serving.engine.start()
    try:
        sinks = [eng.submit(serving, f"r{i}", tokenizer(p)["input_ids"], a, params) for i, (p, a) in enumerate(plan)]
        for sink in sinks:
            assert sink.done.wait(120) and sink.error is None, sink.error
    finally:
        serving.stop()
    return [s.token_ids for s in sinks]


PLAN = [(p, a) for p in PROMPTS for a in (None, "all7")]


def test_bf16_serving_equals_transformers_and_peft_in_bf16(default_model, default_model_dir, store, tmp_path):
    model, tokenizer = default_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    expected = []
    for prompt, adapter in PLAN:
        ref = peft_model(bf16, store / adapter if adapter else None)
        expected.append(greedy(ref, tokenizer(prompt)["input_ids"], NEW, None))
    serving = _serving(default_model, default_model_dir, store, tmp_path, dtype="bfloat16", quantization="none")
    assert serving.engine.runner.model.weights_summary() == "bfloat16"
    got = _generate(serving, tokenizer, PLAN)
    assert got == expected
    assert sum(expected[i] != expected[i - 1] for i in range(1, len(PLAN), 2)) >= 3  # the adapter matters


def test_gguf_codes_give_the_dequantized_models_logits(default_model, default_model_dir, store, tmp_path):
    _, tokenizer = default_model
    ids = tokenizer(" ".join(PROMPTS * 3))["input_ids"]
    n = len(ids)
    assert 2 * n > KERNEL_TOKENS  # the prefill's projections multiply the dequantized matrices
    logits = {}
    for quantization, activations in (("none", "exact"), ("auto", "exact"), ("auto", "int8")):
        config = Config(
            model=ModelConfig(cache_dir=tmp_path, quantization=quantization, activations=activations),
            lora=LoraConfig(adapters_dir=store, max_lora_rank=16, max_loras=2),
            cache=CacheConfig(kv_cache_tokens=2048),
            scheduler=SchedulerConfig(max_model_len=2048),
        )
        loaded = LoadedModel(default_model[0], tokenizer, "m", default_model_dir, gguf=default_gguf_path())
        serving = build_serving(config, loaded)
        runner = serving.engine.runner
        manifest, binding = inspect(store / "all7", serving.spec, 16)
        runner.slots.write(0, load_weights(store / "all7", manifest, binding))
        tables = [list(range(0, 8)), list(range(8, 16))]
        prefill = runner.execute([SeqStep(ids, 0, tables[0], (), True), SeqStep(ids, 0, tables[1], ((0, 1.0),), True)])
        decode = runner.execute([SeqStep([ids[-1]], n, tables[0], (), True),
                                 SeqStep([ids[-1]], n, tables[1], ((0, 1.0),), True)])
        logits[activations if quantization == "auto" else "none"] = (prefill, decode,
                                                                   runner.model.weights_summary())
        serving.stop()
    assert logits["none"][2] == "float32" and "Q4_1" in logits["exact"][2] and "Q4_1" in logits["int8"][2]
    assert logits["exact"][2].endswith("activations float32") and "activations int8" in logits["int8"][2]
    for step in (0, 1):  # prefill, decode
        dense, exact, integer = logits["none"][step], logits["exact"][step], logits["int8"][step]
        # Exact activations on the codes: the dequantized model's arithmetic on the same values.
        torch.testing.assert_close(exact, dense, rtol=1e-5, atol=1e-4)
        assert torch.equal(dense.argmax(-1), integer.argmax(-1))
        distance = (integer - dense).abs() / dense.std(-1, keepdim=True)  # in units of the logits' spread
        assert distance.mean() < 0.1 and distance.max() < 0.5, distance
    distance = (logits["int8"][1] - logits["none"][1]).abs() / logits["none"][1].std(-1, keepdim=True)
    assert distance.mean() > 0  # the decode step took the integer path


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int8_and_int4_serve_adapters_close_to_fp32(default_model, default_model_dir, store, tmp_path, scheme):
    _, tokenizer = default_model
    reference = _generate(_serving(default_model, default_model_dir, store, tmp_path, quantization="none"),
                          tokenizer, PLAN)
    serving = _serving(default_model, default_model_dir, store, tmp_path, quantization=scheme)
    assert scheme in serving.engine.runner.model.weights_summary()
    got = _generate(serving, tokenizer, PLAN)
    first_tokens_equal = sum(g[:4] == r[:4] for g, r in zip(got, reference, strict=True))
    assert first_tokens_equal >= len(PLAN) - 2, (got, reference)
