"""The HTTP surface on a tiny model: completions, streaming, models, errors, bad input in flight."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.api.app import create_app
from server.config import AuthConfig, LimitsConfig
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer
from tests.helpers.tiny_server import CHAT_TEMPLATE

KEY = "sk-test-key-0001"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
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
    assert client.app.state.loraplex.registry.report.done.wait(60)  # the start-up check of the store
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["parent"] is None
    # The other stored adapters were found invalid by that check: listed as such (the admin list too).
    assert [m["id"] for m in models[1:]] == ["alien-module", "bad-shape", "good", "pickled", "rank-32"]
    assert all(m["parent"] == "tiny" for m in models[1:])
    invalid = {"alien-module", "bad-shape", "pickled", "rank-32"}
    assert {m["id"] for m in models if m.get("status") == "invalid"} == invalid
    assert {a["name"] for a in client.get("/admin/adapters").json()["data"] if a["state"] == "invalid"} == invalid


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
        ({"model": "good", "prompt": "x", "max_tokens": -1}, 400, "max_tokens: must be greater than or equal to 1"),
        ({"model": "good", "prompt": "x", "temperature": "hot"}, 400, "temperature: must be a valid number"),
        ({"model": "good"}, 400, "prompt is required"),
        ({"model": "good", "prompt": "x", "n": 17}, 400, "n: must be less than or equal to 16"),
        ({"model": "good", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
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


# --------------------------------------------------------------------------- unsupported OpenAI options

CHAT = {"messages": [{"role": "user", "content": "the quick brown fox"}]}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("use_beam_search", True),
        ("bad_words", ["fox"]),
        ("guided_whitespace_pattern", " +"),
        ("stream_options", {"include_usage": True}),  # without stream
    ],
)
def test_unsupported_options_are_refused_naming_them(world, route, option, value):
    """Not silently ignored: the answer would not be what the caller asked for."""
    client, *_ = world
    body = {"prompt": "hello"} if route == "/v1/completions" else CHAT
    r = client.post(route, json={**body, "max_tokens": 2, option: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == option and option in error["message"], error


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
def test_unsupported_options_at_their_neutral_values_are_accepted(world, route):
    client, *_ = world
    body = {"prompt": "hello"} if route == "/v1/completions" else CHAT
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"}}
    r = client.post(route, json={**body, "max_tokens": 2, "temperature": 0, **neutral})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2
    streamed = client.post(route, json={**body, "max_tokens": 2, "stream": True, "stream_options": {}, **neutral})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]"), streamed.text


# --------------------------------------------------------------------------- API keys and malformed bodies

CONTEXT = 128  # --max-model-len (and KV cache) of the servers below


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with an inference API key and a chat default of 5 new tokens."""
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=5)
    store = tmp_path_factory.mktemp("keyed-store")
    make_adapter(base, AdapterSpec("good", 4, 8, ("q_proj",)), store, seed=1)
    cache = tmp_path_factory.mktemp("keyed-cache")
    auth, limits = AuthConfig(api_keys={KEY: ()}), LimitsConfig(default_max_tokens=5)
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=CONTEXT, max_model_len=CONTEXT, auth=auth,
                                       limits=limits))
    with TestClient(app) as client:
        assert client.app.state.loraplex.serving.max_model_len == CONTEXT
        yield client, tok


BROKEN = b'{"prompt": "x", "max_tokens": 2'


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
@pytest.mark.parametrize(
    "auth",
    [{}, {"authorization": "Bearer sk-wrong-key-0001"}, {"x-api-key": KEY[:-1]}],
    ids=["none", "wrong", "prefix"],
)
def test_a_malformed_body_without_a_valid_key_is_401_not_400(keyed, route, auth):
    """Who may call comes first: a caller without a key learns nothing about how its body was read."""
    client, _ = keyed
    for content in (BROKEN, b'{"prompt": "x", "max_tokens": -1}'):
        r = client.post(route, content=content, headers={"content-type": "application/json", **auth})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
def test_a_body_that_is_not_utf8_without_a_key_is_401(keyed, route):
    """Bytes that are not UTF-8 under a JSON content type fail in FastAPI's body reading with its own 400
    ("There was an error parsing the body"), not a validation error: that too must not outrank the 401."""
    client, _ = keyed
    r = client.post(route, content=b'{"prompt": "\x80"}', headers={"content-type": "application/json"})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    with_key = client.post(route, content=b'{"prompt": "\x80"}',
                           headers={"content-type": "application/json", "x-api-key": KEY})
    assert with_key.status_code == 400, with_key.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
@pytest.mark.parametrize("auth", [{"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}], ids=["bearer", "x-api-key"])
def test_a_malformed_body_with_a_valid_key_is_400_invalid_json(keyed, route, auth):
    client, _ = keyed
    r = client.post(route, content=BROKEN, headers={"content-type": "application/json", **auth})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_json" and error["param"] is None, error
    assert error["message"].startswith("the body is not valid JSON"), error


def test_chat_without_max_tokens_uses_the_default_max_tokens(keyed):
    client, tok = keyed
    headers = {"authorization": f"Bearer {KEY}"}
    r = client.post("/v1/chat/completions", json={**CHAT, "ignore_eos": True, "temperature": 0}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "length"
    # Capped by the context left: a prompt 3 tokens short of the context gets 3.
    messages = _messages_of_length(tok, CONTEXT - 3)
    r = client.post("/v1/chat/completions", json={"messages": messages, "ignore_eos": True}, headers=headers)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (CONTEXT - 3, 3), usage
    # An explicit max_tokens still wins.
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 7, "ignore_eos": True}, headers=headers)
    assert r.json()["usage"]["completion_tokens"] == 7, r.text


def _messages_of_length(tok, n: int) -> list[dict]:
    """One user message whose prompt, through the chat template, is ``n`` tokens."""
    for words in range(1, 400):
        messages = [{"role": "user", "content": "hello " * words}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        length = len(tok(text, add_special_tokens=False)["input_ids"])
        if length == n:
            return messages
        assert length < n, f"no message renders to exactly {n} tokens"
    raise AssertionError(f"no message renders to {n} tokens")


def test_chat_default_max_tokens_0_means_the_rest_of_the_context(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=5)
    limits = LimitsConfig(default_max_tokens=0)
    app = create_app(lambda: eng.build(base, tok, tmp_path / "store", tmp_path / "cache", kv_tokens=CONTEXT,
                                       max_model_len=CONTEXT, limits=limits))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT, usage
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_ready_and_api_routes_say_when_to_retry_while_the_server_has_no_model(tmp_path):
    """503 before the model is loaded (here: its load failed) carries Retry-After, as every 503 does."""
    failures: list[BaseException] = []

    def broken_build():
        raise RuntimeError("no such model")

    app = create_app(broken_build, on_startup_failure=failures.append)
    with TestClient(app) as client:
        for method, path, body in (
            ("GET", "/ready", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"prompt": "hello", "max_tokens": 2}),
            ("POST", "/v1/chat/completions", CHAT),
        ):
            r = client.request(method, path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "not_ready", path
            assert int(r.headers["retry-after"]) > 0, (path, r.headers)
