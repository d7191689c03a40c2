"""GGUF files of each family (written as llama.cpp lays them out, projections as Q8_0 codes) served with
``--model file.gguf``: converted once, tensor by tensor, into our safetensors cache, the projections are served as
the file's codes (Phi-3's fused attn_qkv and ffn_up included), and the logits equal transformers'
own reading of the GGUF; over HTTP with an adapter, the GGUF's tokenizer and chat template included."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config import CacheConfig, Config, LoraConfig, ModelConfig
from server.engine.builder import build_serving
from server.model.runner import SeqStep
from tests.helpers.gguf_file import write_gguf
from tests.helpers.reference import greedy, last_logits, peft_model
from tests.helpers.server_process import running_server
from tests.helpers.tiny import CORPUS, AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model

# Qwen3's GGUF metadata carries no head_dim, so transformers' reader takes the config default (128): tiny
# Qwen3 files use it. llama.cpp writes Gemma without an output matrix (tied embeddings).
FAMILIES = {
    "llama": {},  # llama.cpp's q/k row order, undone by transformers' processor in our conversion
    "qwen3": dict(head_dim=128),
    "gemma2": dict(tie_word_embeddings=True),
    "gemma3": dict(tie_word_embeddings=True),
    "phi3": {},
}


def _gguf(tmp_path, arch):
    _, model, tok = save_tiny_model(tmp_path / "hf", seed=3, arch=arch, **FAMILIES[arch])
    path = write_gguf(model, tok, tmp_path / f"tiny-{arch}.gguf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    return path, reference, tok


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_a_gguf_of_each_family_serves_transformers_reading_of_it(tmp_path, arch):
    path, reference, tok = _gguf(tmp_path, arch)
    config = Config(model=ModelConfig(model=str(path), cache_dir=tmp_path / "cache"),
                    lora=LoraConfig(adapters_dir=tmp_path / "store", max_lora_rank=8, max_loras=2),
                    cache=CacheConfig(kv_cache_tokens=1024))
    serving = build_serving(config)
    try:
        model = serving.engine.runner.model
        assert model.shape.model_type == reference.config.model_type
        # Every layer projection as the file's codes (Phi-3's fused ones included); the f32 output matrix dense.
        kinds = {type(getattr(layer, w)).__name__ for layer in model.layers for w in ("w_qkv", "w_o", "w_gate_up",
                                                                                       "w_down")}
        assert kinds == {"QuantizedMatrix"} and model.weights_summary().startswith("Q8_0 codes"), kinds
        ids = tok(CORPUS[1])["input_ids"]  # 31 tokens: past Gemma's window
        logits = serving.engine.runner.execute([SeqStep(ids, 0, [0, 1], (), True)])[0]
        torch.testing.assert_close(logits, last_logits(reference, ids), rtol=1e-4, atol=1e-4, msg=arch)
    finally:
        serving.stop()


def test_a_qwen3_gguf_over_http_with_an_adapter_and_its_chat_template(tmp_path):
    path, reference, tok = _gguf(tmp_path, "qwen3")
    store = tmp_path / "store"
    make_adapter(reference, AdapterSpec("qv", 8, 16, ("q_proj", "v_proj", "down_proj")), store, seed=4)
    messages = [{"role": "user", "content": "hello world"}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = {a: greedy(peft_model(reference, store / a if a else None), list(prompt_ids), 8, eos_token_id=0)
                for a in (None, "qv")}
    assert expected[None] != expected["qv"] and min(map(len, expected.values())) >= 4  # the adapter matters
    args = ["--model", str(path), "--adapters-dir", str(store), "--max-lora-rank", "8",
            "--cache-dir", str(tmp_path / "cache")]
    with running_server(args, tmp_path / "server.log") as url:
        for adapter, want in expected.items():
            body = {"model": adapter or path.stem, "messages": messages, "max_tokens": 8, "temperature": 0}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)
            assert r.json()["usage"]["prompt_tokens"] == len(prompt_ids)
