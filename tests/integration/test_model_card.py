"""``GET /v1/models/{id}``: one model card, exactly as ``/v1/models`` lists it, with API keys honoured."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.api.app import create_app
from server.config import AuthConfig
from tests.helpers import engine as eng
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer

KEY_ALL = "sk-cards-all-0001"
KEY_TEAM = "sk-cards-team-001"  # team-* adapters only
ALL = {"authorization": f"Bearer {KEY_ALL}"}
TEAM = {"authorization": f"Bearer {KEY_TEAM}"}
BASE = "org/tiny-base"  # a served name with a slash, as Hugging Face ids have


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=5)
    store = tmp_path_factory.mktemp("store")
    good = make_adapter(base, AdapterSpec("good", 4, 8, ("q_proj", "v_proj")), store, seed=1)
    make_adapter(base, AdapterSpec("team-a", 4, 8, ("q_proj",)), store, seed=2)
    bad = store / "bad-shape"  # stored, but its A matrix does not fit the base model
    shutil.copytree(good, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :10].contiguous()
    save_file(tensors, bad / "adapter_model.safetensors")

    def build():
        serving = eng.build(base, tok, store, tmp_path_factory.mktemp("cache"), kv_tokens=1024,
                            auth=AuthConfig(api_keys={KEY_ALL: (), KEY_TEAM: ("team-*",)}))
        serving.model_name = BASE  # as --served-model-name sets it
        return serving

    with TestClient(create_app(build)) as client:
        assert client.app.state.loraplex.registry.report.done.wait(60)  # cards then say what the check found
        yield client


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"], error
    return error


def test_every_listed_model_has_the_same_card_on_its_own(client):
    listed = client.get("/v1/models", headers=ALL).json()["data"]
    assert [c["id"] for c in listed][:1] == [BASE]
    assert {"good", "team-a"} <= {c["id"] for c in listed}
    for card in listed:
        r = client.get(f"/v1/models/{card['id']}", headers=ALL)
        assert r.status_code == 200, r.text
        assert r.json() == card
    assert client.get(f"/v1/models/{BASE}", headers=ALL).json()["parent"] is None
    good = client.get("/v1/models/good", headers=ALL).json()
    assert good == {"id": "good", "object": "model", "created": good["created"], "owned_by": "loraplex",
                    "root": BASE, "parent": BASE}
    assert client.get(f"/v1/models/{BASE}:good", headers=ALL).json() == good  # base:adapter names it too


def test_an_unknown_id_is_404_with_openai_error_body(client):
    for model_id in ("no-such-adapter", "..", "a/b/c", f"{BASE}:missing"):
        error = _error(client.get(f"/v1/models/{model_id}", headers=ALL), 404)
        assert error["type"] == "not_found_error"
    error = _error(client.get("/v1/models/no-such-adapter", headers=ALL), 404)
    assert error["code"] == "adapter_not_found" and "'no-such-adapter'" in error["message"]
    r = client.get("/v1/models/", headers=ALL, follow_redirects=False)  # the listing, as before
    assert r.status_code == 307 and r.headers["location"].endswith("/v1/models")


def test_an_adapter_found_invalid_is_listed_and_carded_as_such(client):
    r = client.post("/v1/completions", headers=ALL, json={"model": "bad-shape", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 400, r.text  # now known invalid
    card = client.get("/v1/models/bad-shape", headers=ALL).json()
    assert card["status"] == "invalid" and "shape" in card["error"] and card["error"] in r.json()["error"]["message"]
    listed = {c["id"]: c for c in client.get("/v1/models", headers=ALL).json()["data"]}
    assert listed["bad-shape"] == card
    assert "status" not in listed["good"] and "error" not in listed["good"]


def test_api_keys_are_honoured_as_by_the_listing(client):
    assert _error(client.get("/v1/models/good"), 401)["code"] == "invalid_api_key"
    assert _error(client.get("/v1/models/good", headers={"x-api-key": "sk-wrong-000000"}), 401)
    listed = {c["id"] for c in client.get("/v1/models", headers=TEAM).json()["data"]}
    assert listed == {BASE, "team-a"}
    assert client.get("/v1/models/team-a", headers=TEAM).status_code == 200
    assert client.get(f"/v1/models/{BASE}", headers=TEAM).status_code == 200
    for outside in ("good", "no-such-adapter"):  # 403 whether or not it exists, as generation answers
        assert _error(client.get(f"/v1/models/{outside}", headers=TEAM), 403)["code"] == "adapter_not_allowed"
