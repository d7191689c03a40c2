"""Families beyond Llama 2's shape served from a model folder by the real server: greedy outputs equal
transformers + PEFT, base and with an adapter (Qwen3's q/k norms, Llama 3.1's rope scaling)."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.reference import greedy, peft_model
from tests.helpers.server_process import running_server
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model

N = 10
PROMPT = "the quick brown fox"
SPEC = AdapterSpec("all7", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("arch", ["qwen3", "llama3"])
def test_family_served_from_a_folder_equals_peft(tmp_path, arch):
    model_dir, base, tok = save_tiny_model(tmp_path / arch, seed=3, arch=arch)
    store = tmp_path / "store"
    make_adapter(base, SPEC, store, seed=4)
    ids = tok(PROMPT)["input_ids"]
    expected = {}
    for adapter in (None, "all7"):
        out = greedy(peft_model(base, store / adapter if adapter else None), ids, N, eos_token_id=0)
        assert len(out) == N and 0 not in out, "the reference stopped early: pick another prompt"
        expected[adapter] = tok.decode(out, skip_special_tokens=True)
    assert expected[None] != expected["all7"]  # the adapter matters
    args = ["--model", str(model_dir), "--adapters-dir", str(store), "--max-lora-rank", "8"]
    with running_server(args, tmp_path / "server.log") as url:
        for adapter, want in expected.items():
            body = {"model": adapter or arch, "prompt": PROMPT, "max_tokens": N, "temperature": 0}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want, (arch, adapter)
