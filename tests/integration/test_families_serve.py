"""Families beyond Llama 2's shape served from a model folder by the server's app, configured from its command
line (the lean loader reads the folder's safetensors): greedy outputs equal transformers + PEFT, base and with an
adapter (Qwen3's q/k norms, Llama 3.1's rope scaling, Phi-3's fused qkv_proj / gate_up_proj targets, Gemma 2/3's
1 + w norms, soft-caps and sliding windows, OLMo 2's post-norms); an adapter naming modules the family does not
have is refused."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.cli import build_parser, config_from_args
from server.engine.builder import build_serving_in_fresh_thread
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model
from tests.helpers.uploads import files_of

PROMPT = "the quick brown fox"
N = 24  # past the window of the windowed families (8)
SEEDS = {"qwen3": 3, "llama3": 3, "phi3": 4, "gemma2": 3, "gemma3": 3, "olmo2": 3}  # references run N tokens
SPEC = AdapterSpec("all7", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@contextmanager
def serving(args: list[str]) -> Iterator[TestClient]:
    """The app ``loraplex serve ARGS`` runs, in this process (the machine's kernel cache, no second start-up)."""
    config = config_from_args(build_parser({}).parse_args(["serve", *args]))
    with TestClient(create_app(lambda: build_serving_in_fresh_thread(config))) as client:
        yield client


@pytest.mark.parametrize("arch", list(SEEDS))
def test_family_served_from_a_folder_equals_peft(tmp_path, arch):
    model_dir, base, tok = save_tiny_model(tmp_path / arch, seed=SEEDS[arch], arch=arch)
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
    with serving(args) as client:
        for adapter, want in expected.items():
            body = {"model": adapter or arch, "prompt": PROMPT, "max_tokens": N, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want, (arch, adapter)


def test_an_adapter_for_split_projections_is_refused_by_a_fused_family(tmp_path):
    """A q_proj/v_proj adapter (made on a Llama of the same sizes) uploaded to a Phi-3 server: 400 naming it."""
    model_dir, _, _ = save_tiny_model(tmp_path / "phi3", seed=3, arch="phi3")
    _, llama, _ = save_tiny_model(tmp_path / "llama", seed=3)
    folder = make_adapter(llama, AdapterSpec("qv", 4, 8, ("q_proj", "v_proj")), tmp_path / "src", seed=5)
    with serving(["--model", str(model_dir), "--adapters-dir", str(tmp_path / "store")]) as client:
        r = client.post("/admin/adapters", data={"name": "qv"}, files=files_of(folder))
        assert r.status_code == 400, r.text
        assert "q_proj" in r.json()["error"]["message"], r.text
        assert client.get("/admin/adapters").json()["data"] == []
