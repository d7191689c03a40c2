"""1,000 adapters registered, traffic skewed over all of them, host memory under its bound throughout."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from adapters_store.local import LocalAdapterStore
from server.api.app import create_app
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer

N_ADAPTERS = 1000
N_REQUESTS = 320
PROMPT = "one two three"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=21)
    src = tmp_path_factory.mktemp("made")
    # One adapter made by PEFT is the template; the others are PEFT-format copies with their own random weights.
    template = make_adapter(base, AdapterSpec("template", 8, 16, ("q_proj", "v_proj", "down_proj")), src, seed=0)
    tensors = load_file(template / "adapter_model.safetensors")
    config = json.loads((template / "adapter_config.json").read_text())
    store_dir = tmp_path_factory.mktemp("store")
    store = LocalAdapterStore(store_dir)
    store.recover()
    gen = torch.Generator().manual_seed(1)
    for i in range(N_ADAPTERS):
        with store.staging() as staged:
            save_file(
                {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in tensors.items()},
                staged / "adapter_model.safetensors",
            )
            (staged / "adapter_config.json").write_text(json.dumps(config))
            store.put(f"a{i:04d}", staged)
    one = (template / "adapter_model.safetensors").stat().st_size
    host_limit = 40 * one
    cache = tmp_path_factory.mktemp("cache")
    app = create_app(
        lambda: eng.build(base, tok, store_dir, cache, kv_tokens=8192, max_loras=8, host_cache_bytes=host_limit)
    )
    with TestClient(app) as client:
        yield client, tok, base, store, host_limit, tmp_path_factory.mktemp("peft")


def test_traffic_over_a_thousand_adapters_stays_within_the_host_bound(world):
    client, tok, base, store, host_limit, scratch = world
    assert len(client.get("/v1/models").json()["data"]) == N_ADAPTERS + 1
    rng = np.random.default_rng(5)
    picks = [int(N_ADAPTERS * x) for x in rng.power(0.3, N_REQUESTS)]  # S-LoRA's skewed popularity
    cache = client.app.state.loraplex.serving.residency
    results: dict[int, tuple[int, str, str]] = {}
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cache.host_bytes)
            time.sleep(0.002)

    def worker(k: int) -> None:
        for j in range(k, N_REQUESTS, 8):
            name = f"a{picks[j]:04d}"
            r = client.post(
                "/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
            )
            results[j] = (r.status_code, name, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    watcher.join()
    statuses = [s for s, _, _ in results.values()]
    assert len(results) == N_REQUESTS and statuses == [200] * N_REQUESTS, [r for r in results.values() if r[0] != 200][
        :3
    ]
    distinct = {name for _, name, _ in results.values()}
    assert len(distinct) > 100  # far more adapters than the 8 slots and the 40 host entries
    assert peak[0] <= host_limit
    listing = client.get("/admin/adapters").json()
    assert len(listing["data"]) == N_ADAPTERS and listing["host_bytes"] <= host_limit
    loads = sum(a["load_count"] for a in listing["data"])
    assert loads >= len(distinct)  # every adapter used came from disk at least once
    # Spot-check outputs against PEFT on the same files.
    ids = tok(PROMPT)["input_ids"]
    for name in sorted(distinct)[:: max(1, len(distinct) // 4)]:
        folder = scratch / name
        shutil.copytree(store.get(name).path, folder)
        expected = tok.decode(greedy(peft_model(base, folder), ids, 4, eos_token_id=0), skip_special_tokens=True)
        got = next(text for _, n, text in results.values() if n == name)
        assert got == expected, name
