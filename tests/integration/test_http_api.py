"""The HTTP surface on a tiny model: completions, streaming, models, errors, bad input in flight."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.api.app import create_app
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=5)
    store = tmp_path_factory.mktemp("store")
    good = make_adapter(base, AdapterSpec("good", 8, 16, ("q_proj", "v_proj", "down_proj")), store, seed=1)
    # A stored adapter with a wrong shape: refused with a message, never served as the base model.
    bad = store / "bad-shape"
    shutil.copytree(good, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :10].contiguous()
    save_file(tensors, bad / "adapter_model.safetensors")
    # More adapters that must be refused at load, each with a message naming its problem.
    make_adapter(base, AdapterSpec("rank-32", 32, 32, ("q_proj",)), store, seed=2)  # the server allows 16
    pickled = store / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"not even read")
    alien = store / "alien-module"
    shutil.copytree(good, alien)
    tensors = load_file(alien / "adapter_model.safetensors")
    tensors = {k.replace("layers.1.", "layers.9."): v for k, v in tensors.items()}
    save_file(tensors, alien / "adapter_model.safetensors")
    cache = tmp_path_factory.mktemp("cache")
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=2048))
    with TestClient(app) as client:
        yield client, tok, base, good


def _complete(client, **body):
    return client.post("/v1/completions", json={"max_tokens": 8, "temperature": 0, **body})


def test_health_ready_and_models(world):
    client, *_ = world
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["parent"] is None
    names = ["alien-module", "bad-shape", "good", "pickled", "rank-32"]
    assert [m["id"] for m in models[1:]] == names and {m["parent"] for m in models[1:]} == {"tiny"}


def test_completion_with_adapter_equals_peft(world):
    client, tok, base, good = world
    prompt = "the quick brown fox"
    expected = greedy(peft_model(base, good), tok(prompt)["input_ids"], 8, eos_token_id=0)
    r = _complete(client, model="good", prompt=prompt)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
    assert body["usage"]["completion_tokens"] == len(expected)
    assert r.headers["x-loraplex-adapter"].startswith("good@")
    assert r.headers["x-loraplex-adapter-cache"] in ("disk", "host", "device")
    # base:adapter names the same adapter; the base model's name and "" mean no adapter.
    assert _complete(client, model="tiny:good", prompt=prompt).json()["choices"][0] == body["choices"][0]
    base_text = _complete(client, model="tiny", prompt=prompt).json()["choices"][0]["text"]
    assert _complete(client, model="", prompt=prompt).json()["choices"][0]["text"] == base_text
    assert base_text != body["choices"][0]["text"]
    assert "x-loraplex-adapter" not in _complete(client, model="", prompt=prompt).headers


def test_streaming_equals_non_streaming(world):
    client, *_ = world
    full = _complete(client, model="good", prompt="hello world").json()
    chunks = []
    with client.stream(
        "POST", "/v1/completions",
        json={"model": "good", "prompt": "hello world", "max_tokens": 8, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == full["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == full["choices"][0]["finish_reason"]
    assert events[-1]["usage"] == full["usage"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "no-such-adapter", "prompt": "x"}, 404, "does not exist"),
        ({"model": "../../etc/passwd", "prompt": "x"}, 404, "does not exist"),
        ({"model": "bad-shape", "prompt": "x"}, 400, "shape mismatch"),
        ({"model": "rank-32", "prompt": "x"}, 400, "rank 32 at model.layers.0.self_attn.q_proj exceeds"),
        ({"model": "pickled", "prompt": "x"}, 400, "pickle"),
        ({"model": "alien-module", "prompt": "x"}, 400, "model.layers.9.mlp.down_proj' does not exist"),
        ({"model": "good", "prompt": ""}, 400, "prompt is empty"),
        ({"model": "good", "prompt": []}, 400, "prompt is empty"),
        ({"model": "good", "prompt": "hello " * 3000}, 400, "context limit is 512"),
        ({"model": "good", "prompt": "x", "max_tokens": 5000}, 400, "exceeds the context limit"),
        ({"model": "good", "prompt": [1, 99999]}, 400, "token ids"),
        ({"model": "good", "prompt": "x", "seed": 2**70}, 400, "seed must be between"),
        ({"model": "good", "prompt": "x", "stop": ["a"] * 17}, 400, "at most 16 stop strings"),
        ({"model": "good", "prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
        ({"model": "good", "prompt": "x", "temperature": "hot"}, 422, "temperature"),
        ({"model": "good"}, 422, "prompt"),
        ({"model": "good", "prompt": "x", "n": 2}, 422, "n"),
    ],
)
def test_bad_input_gets_a_clear_error(world, body, status, fragment):
    client, *_ = world
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_do_not_disturb_requests_in_flight(world):
    client, *_ = world
    prompt = "a multi adapter lora server"
    expected = _complete(client, model="good", prompt=prompt, max_tokens=24, ignore_eos=True).json()
    results: dict[int, dict] = {}

    def good(i):
        results[i] = _complete(client, model="good", prompt=prompt, max_tokens=24, ignore_eos=True).json()

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for body in ({"model": "bad-shape", "prompt": "x"}, {"model": "good", "prompt": ""},
                 {"model": "nope", "prompt": "x"}, {"model": "good", "prompt": "hello " * 3000}):
        assert client.post("/v1/completions", json=body).status_code >= 400
    for t in threads:
        t.join(60)
    assert [results[i]["choices"] for i in range(3)] == [expected["choices"]] * 3
