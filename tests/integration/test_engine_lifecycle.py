"""Engine behaviour around the edges: abort on disconnect, stop strings, seeds, bf16."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.adapters.selection import Selection
from server.engine.client import EngineClient
from server.engine.request import ErrorKind, FinishReason, Request, SamplingParams
from server.lora import cpu_kernel
from server.model import cpu_attention
from tests.helpers import engine as eng
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=7)
    store = tmp_path_factory.mktemp("store")
    make_adapter(base, AdapterSpec("a", 4, 8, ("q_proj", "down_proj")), store, seed=3)
    serving = eng.build(base, tok, store, tmp_path_factory.mktemp("cache"), kv_tokens=2048)
    serving.engine.start()
    yield serving, tok
    serving.stop()


def _idle(serving) -> bool:
    sched = serving.engine.scheduler
    return not sched.running and not sched.waiting and sched.blocks.used_blocks == 0


def _wait_idle(serving, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not _idle(serving):
        assert time.monotonic() < deadline, "resources not released"
        time.sleep(0.01)


def test_closing_the_stream_aborts_and_frees_everything(world):
    serving, tok = world
    client = EngineClient(serving.engine)
    stored = serving.store.get("a")

    async def consume_two():
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        request = Request("abort-me", tok("hello world")["input_ids"], params, selection=Selection.of(stored))
        gen = client.generate(request)
        seen = [await anext(gen), await anext(gen)]
        await gen.aclose()  # what a client disconnect does
        return seen

    seen = asyncio.run(consume_two())
    assert not any(o.finished for o in seen)
    _wait_idle(serving)
    assert not serving.engine.scheduler.busy_slots()


def test_stop_string_ends_the_request_and_is_not_returned(world):
    serving, tok = world
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full = eng.submit(serving, "full", tok("the quick")["input_ids"], None, params)
    assert full.done.wait(30)
    text = full.text
    assert len(text) > 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = eng.submit(serving, "cut", tok("the quick")["input_ids"], None,
                     SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,)))
    assert cut.done.wait(30)
    assert cut.last.finish_reason is FinishReason.STOP
    assert cut.text == text[: text.index(stop)]


def test_seeded_sampling_repeats_and_max_tokens_ends_with_length(world):
    serving, tok = world
    ids = tok("numbers 0 1")["input_ids"]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    a = eng.submit(serving, "s1", ids, "a", params)
    b = eng.submit(serving, "s2", ids, "a", params)
    assert a.done.wait(30) and b.done.wait(30)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10
    assert a.last.finish_reason is FinishReason.LENGTH
    _wait_idle(serving)


def test_bfloat16_serving_runs_mixed_batches(tmp_path):
    tok = make_tokenizer()
    base = make_model("qwen2", len(tok), seed=2)
    make_adapter(base, AdapterSpec("b", 8, 16, ("v_proj", "up_proj")), tmp_path, seed=4)
    from server.config import CacheConfig, Config, LoraConfig, ModelConfig
    from server.engine.builder import build_serving
    from server.model.loading import LoadedModel

    config = Config(model=ModelConfig(dtype="bfloat16", cache_dir=tmp_path / "c"),
                    lora=LoraConfig(adapters_dir=tmp_path, max_lora_rank=8, max_loras=2),
                    cache=CacheConfig(kv_cache_tokens=1024))
    serving = build_serving(config, LoadedModel(base, tok, "tiny", tmp_path))
    serving.engine.start()
    try:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        sinks = [eng.submit(serving, f"q{i}", tok("hello world")["input_ids"], name, params)
                 for i, name in enumerate(["b", None, "b"])]
        for s in sinks:
            assert s.done.wait(30) and s.last.error is None and len(s.token_ids) == 6
        assert sinks[0].token_ids == sinks[2].token_ids
    finally:
        serving.stop()


def test_bf16_adapters_under_fp32_serving(tmp_path):
    """--lora-dtype bfloat16: the adapter slots hold bf16, activations stay fp32; logits stay close to PEFT."""
    from server.config import CacheConfig, Config, LoraConfig, ModelConfig
    from server.engine.builder import build_serving
    from server.model.loading import LoadedModel
    from server.model.runner import SeqStep, one_adapter
    from tests.helpers.reference import last_logits, peft_model

    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=8)
    path = make_adapter(base, AdapterSpec("m", 8, 16, ("q_proj", "up_proj", "down_proj")), tmp_path, seed=6)

    def config(backend):
        return Config(model=ModelConfig(cache_dir=tmp_path / "c"),
                      lora=LoraConfig(adapters_dir=tmp_path, max_lora_rank=8, max_loras=2, backend=backend,
                                      dtype="bfloat16"),
                      cache=CacheConfig(kv_cache_tokens=1024))

    with pytest.raises(ValueError, match="--lora-backend cpu"):
        build_serving(config("torch"), LoadedModel(base, tok, "tiny", tmp_path))
    serving = build_serving(config("cpu"), LoadedModel(base, tok, "tiny", tmp_path))
    assert serving.engine.runner.slots.modules["model.layers.0.mlp.up_proj"].a.dtype == torch.bfloat16
    cache = serving.engine.scheduler.residency
    stored = serving.store.get("m")
    deadline = time.monotonic() + 30
    while (got := cache.acquire(stored, {})).slot < 0:
        assert got.error is None and time.monotonic() < deadline
        time.sleep(0.01)
    ids = tok("hello world, this is")["input_ids"]
    logits = serving.engine.runner.execute([SeqStep(ids, 0, [0, 1], one_adapter(got.slot), True)])[0]
    ref = last_logits(peft_model(base, path), ids)
    base_logits = last_logits(base, ids)
    # bf16 rounding of the adapter weights moves the logits a little; the adapter's effect is far larger.
    assert (logits - ref).abs().max() < 0.05 * (ref - base_logits).abs().max()


def test_a_failing_step_fails_its_batch_and_the_engine_keeps_serving(world, monkeypatch):
    serving, tok = world
    runner = serving.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(seqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return real(seqs)

    monkeypatch.setattr(runner, "execute", flaky)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    failed = eng.submit(serving, "boom", tok("hello")["input_ids"], None, params)
    assert failed.done.wait(30)
    assert failed.last.error_kind is ErrorKind.INTERNAL and failed.last.finish_reason is FinishReason.ERROR
    ok = eng.submit(serving, "after", tok("hello")["input_ids"], "a", params)
    assert ok.done.wait(30) and ok.last.error is None and len(ok.token_ids) == 4
    _wait_idle(serving)


def test_requests_the_stopped_engine_never_runs_finish_unavailable(tmp_path):
    """Stopping aborts what runs or waits, and refuses what comes later at once: each gets one finished output
    with ErrorKind.UNAVAILABLE (503 over HTTP, not 400) and its ``on_finish`` runs (so admission and leases are
    given back). Before, a request submitted after the stop sat in a queue nobody read: it never finished."""
    cpu_kernel.available()  # from the shared kernel cache: a fresh cache dir would build them again (seconds)
    cpu_attention.available()
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=7)
    serving = eng.build(base, tok, tmp_path / "store", tmp_path / "cache", kv_tokens=2048, max_num_seqs=1)
    serving.engine.start()
    client = EngineClient(serving.engine)
    ids = tok("hello world")["input_ids"]
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    finished: list[str] = []

    def generate(request_id: str):
        return client.generate(Request(request_id, ids, params), on_finish=lambda: finished.append(request_id))

    async def drain(outputs) -> list:
        return [o async for o in outputs]

    async def run():
        running, waiting = generate("running"), generate("waiting")  # one sequence at a time: the second waits
        first = await anext(running)
        await asyncio.to_thread(serving.engine.stop)
        stopped = {"running": [first, *await drain(running)], "waiting": await drain(waiting)}
        late = generate("late")
        stopped["late"] = await asyncio.wait_for(drain(late), 10)
        return stopped

    try:
        outputs = asyncio.run(run())
    finally:
        serving.stop()
    assert not outputs["running"][0].finished and len(outputs["late"]) == 1
    for request_id, outs in outputs.items():
        last = outs[-1]
        assert last.finished and [o.finished for o in outs].count(True) == 1, request_id
        assert last.error_kind is ErrorKind.UNAVAILABLE and "shutting down" in last.error, (request_id, last)
        assert last.finish_reason is FinishReason.ABORT, request_id
    late = outputs["late"][0]
    assert late.completion_tokens == 0 and late.prompt_tokens == len(ids) and late.token_ids == ()
    assert sorted(finished) == ["late", "running", "waiting"]
    assert _idle(serving)
