"""The default model in the other precisions the server offers, on the engine in-process.

* ``--dtype bfloat16``: greedy outputs equal transformers + PEFT run in bf16, base and with an adapter;
* ``--quantization auto`` (the GGUF's own Q4_1/Q8_0 codes): logits close to serving the dequantized
  fp32 model (``--quantization none``), with an adapter, prefill and decode: the same top token, and
  on average within a tenth of the logits' spread (measured: 0.015 prefill, 0.05 decode). Steps of
  up to 4 tokens, the lm_head of every step among them, take integer dot products on 8-bit
  activations, as llama.cpp computes; the kernel's own tests hold both paths to their references;
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
    for quantization in ("none", "auto"):
        config = Config(
            model=ModelConfig(cache_dir=tmp_path, quantization=quantization),
            lora=LoraConfig(adapters_dir=store, max_lora_rank=16, max_loras=2),
            cache=CacheConfig(kv_cache_tokens=2048),
        )
        loaded = LoadedModel(default_model[0], tokenizer, "m", default_model_dir, gguf=default_gguf_path())
        serving = build_serving(config, loaded)
        runner = serving.engine.runner
        manifest, binding = inspect(store / "all7", serving.spec, 16)
        runner.slots.write(0, load_weights(store / "all7", manifest, binding))
        tables = [list(range(0, 8)), list(range(8, 16))]
        prefill = runner.execute([SeqStep(ids, 0, tables[0], -1, True), SeqStep(ids, 0, tables[1], 0, True)])
        decode = runner.execute([SeqStep([ids[-1]], n, tables[0], -1, True),
                                 SeqStep([ids[-1]], n, tables[1], 0, True)])
        logits[quantization] = (prefill, decode, runner.model.weights_summary())
        serving.stop()
    assert logits["none"][2] == "float32" and "Q4_1" in logits["auto"][2]
    for step in (0, 1):  # prefill, decode
        exact, integer = logits["none"][step], logits["auto"][step]
        assert torch.equal(exact.argmax(-1), integer.argmax(-1))
        distance = (integer - exact).abs() / exact.std(-1, keepdim=True)  # in units of the logits' spread
        assert 0 < distance.mean() < 0.1 and distance.max() < 0.5, distance  # not the fp32 path, and close to it


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
