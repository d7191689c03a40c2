"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's bodies) on a tiny model with API keys and adapters.

The ids must be the ones generation uses: a prompt's count equals the
completion's ``usage.prompt_tokens``, messages' count the chat completion's.
``model`` is checked as generation checks it (404, 403, 401).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import AuthConfig
from tests.helpers import engine as eng
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer
from tests.helpers.tiny_server import CHAT_TEMPLATE

KEY_ALL = "sk-tokenize-all-01"
KEY_TEAM = "sk-tokenize-team-01"  # may use team-* adapters only
ALL = {"authorization": f"Bearer {KEY_ALL}"}
TEAM = {"x-api-key": KEY_TEAM}
PROMPT = "the quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = make_model("llama", len(tok), seed=5)
    store = tmp_path_factory.mktemp("store")
    for name, seed in (("good", 1), ("team-a", 2)):
        make_adapter(base, AdapterSpec(name, 4, 8, ("q_proj", "v_proj")), store, seed=seed)
    auth = AuthConfig(api_keys={KEY_ALL: (), KEY_TEAM: ("team-*",)})
    app = create_app(lambda: eng.build(base, tok, store, tmp_path_factory.mktemp("cache"), kv_tokens=1024,
                                       auth=auth))
    with TestClient(app) as client:
        yield client, tok


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"], error
    return error


@pytest.mark.parametrize("model", ["", None, "tiny", "good", "tiny:good"])
def test_a_prompt_tokenizes_as_the_completion_counts_it(world, model):
    client, tok = world
    r = client.post("/tokenize", headers=ALL, json={"model": model, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok(PROMPT)["input_ids"]
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == client.app.state.loraplex.serving.max_model_len == 512  # the positions
    assert body["token_strs"] is None
    done = client.post("/v1/completions", headers=ALL,
                       json={"model": model or "", "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["prompt_tokens"] == body["count"]


def test_return_token_strs_gives_each_token_its_string(world):
    client, tok = world
    body = client.post("/tokenize", headers=ALL, json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    assert "".join(body["token_strs"]).replace("Ġ", " ") == PROMPT


def test_messages_tokenize_as_the_chat_completion_counts_them(world):
    client, tok = world
    r = client.post("/tokenize", headers=ALL, json={"model": "good", "messages": MESSAGES})
    assert r.status_code == 200, r.text
    body = r.json()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    done = client.post("/v1/chat/completions", headers=ALL,
                       json={"model": "good", "messages": MESSAGES, "max_tokens": 1, "temperature": 0})
    assert done.json()["usage"]["prompt_tokens"] == body["count"]
    neutral = {"add_special_tokens": False, "chat_template_kwargs": {}, "tools": []}  # vLLM's, at their defaults
    assert client.post("/tokenize", headers=ALL, json={"model": "good", "messages": MESSAGES, **neutral}).json() == body
    without = client.post("/tokenize", headers=ALL, json={"messages": MESSAGES, "add_generation_prompt": False})
    opening = tok("<|assistant|>", add_special_tokens=False)["input_ids"]
    assert without.json()["tokens"] + opening == body["tokens"]


def test_detokenize_gives_back_the_text(world):
    client, tok = world
    ids = tok(PROMPT)["input_ids"]
    for model in ("", "good", None):
        r = client.post("/detokenize", headers=ALL, json={"model": model, "tokens": ids})
        assert r.status_code == 200, r.text
        assert r.json() == {"prompt": PROMPT}
    assert client.post("/detokenize", headers=ALL, json={"tokens": []}).json() == {"prompt": ""}
    eos = tok.convert_tokens_to_ids("<eos>")
    assert client.post("/detokenize", headers=ALL, json={"tokens": [*ids, eos]}).json() == {"prompt": PROMPT + "<eos>"}


@pytest.mark.parametrize(
    ("tokens", "shown"),
    [([5, -1, 7], "-1"), ([320], "320"), ([1, 10**20, -3], f"{10**20}, -3"),
     (list(range(-12, 0)), "-12, -11, -10, -9, -8, -7, -6, -5, -4, -3 and 2 more")],
)
def test_detokenize_refuses_ids_outside_the_vocabulary_naming_them(world, tokens, shown):
    client, _ = world
    error = _error(client.post("/detokenize", headers=ALL, json={"tokens": tokens}), 400)
    assert error["message"] == f"tokens: ids outside the vocabulary [0, 320): {shown}"
    assert error["param"] == "tokens" and error["code"] == "invalid_tokens"


@pytest.mark.parametrize(("path", "body"), [("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1, 2]})])
def test_model_is_checked_as_generation_checks_it(world, path, body):
    client, _ = world
    error = _error(client.post(path, headers=ALL, json={**body, "model": "no-such-adapter"}), 404)
    assert error["code"] == "adapter_not_found" and "no-such-adapter" in error["message"]
    error = _error(client.post(path, headers=TEAM, json={**body, "model": "good"}), 403)
    assert error["code"] == "adapter_not_allowed"
    assert client.post(path, headers=TEAM, json={**body, "model": "team-a"}).status_code == 200
    assert client.post(path, headers=TEAM, json=body).status_code == 200  # the base model: open to every key
    for headers in ({}, {"authorization": "Bearer sk-wrong-key-000"}):
        assert _error(client.post(path, headers=headers, json=body), 401)["code"] == "invalid_api_key"
        # A malformed body without a valid key is 401 too: the key is checked first, as on /v1 routes.
        r = client.post(path, headers={**headers, "content-type": "application/json"}, content=b"{not json")
        assert _error(r, 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/tokenize", {"model": "good"}, "prompt is required"),
        ("/tokenize", {"prompt": PROMPT, "foo": 1}, "Unrecognized request argument supplied: foo"),
        ("/tokenize", {"messages": MESSAGES, "prompt": PROMPT}, "Unrecognized request argument supplied: prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True},
         "add_special_tokens is not supported by this server; leave it out or set it to false"),
        ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ x }}"}, "chat_template is not supported"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", [PROMPT], "JSON object"),
        ("/detokenize", {"tokens": "1 2 3"}, "tokens"),
        ("/detokenize", {"tokens": [1, 2], "skip_special_tokens": True}, "skip_special_tokens"),
        ("/detokenize", {}, "tokens is required"),
    ],
)
def test_bad_bodies_get_a_400_naming_the_problem(world, path, body, fragment):
    client, _ = world
    error = _error(client.post(path, headers=ALL, json=body), 400)
    assert fragment in error["message"], error
