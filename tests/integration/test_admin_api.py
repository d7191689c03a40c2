"""The admin API on a tiny model: upload, validate, list, load/pin/evict, delete, vLLM's load/unload, auth."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import AdminConfig, HttpConfig
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, edit_adapter, make_adapter, make_model, make_tokenizer
from tests.helpers.uploads import files_of, folder_members, snapshot, tar_gz, version_of, zip_bytes

TOKEN = "admin-token-for-tests-0123456789"
MAX_UPLOAD = 2 << 20
PROMPT = "the quick brown fox"


def _edit(src, dst, tensors=None, config=None):
    shutil.copytree(src, dst)
    return edit_adapter(dst, tensors, config)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Adapters made with PEFT outside the store, good and bad."""
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=5)
    src = tmp_path_factory.mktemp("made")
    good = make_adapter(base, AdapterSpec("good", 8, 16, ("q_proj", "v_proj", "down_proj")), src, seed=1)
    other = make_adapter(base, AdapterSpec("other", 4, 8, ("k_proj", "up_proj")), src, seed=2)
    good2 = make_adapter(base, AdapterSpec("good2", 8, 16, ("q_proj", "v_proj", "down_proj")), src, seed=3)
    big = make_adapter(base, AdapterSpec("rank-32", 32, 32, ("q_proj",)), src, seed=4)
    # Same family, other sizes, and a matching base_model_name_or_path: refused by shapes.
    wide_model = make_model_with_hidden(len(tok), 96)
    other_size = make_adapter(wide_model, AdapterSpec("other-size", 4, 8, ("q_proj",)), src, seed=5)
    cfg = json.loads((good / "adapter_config.json").read_text())
    _edit(
        other_size,
        src / "other-size-named",
        config=lambda c: c.update(base_model_name_or_path=cfg.get("base_model_name_or_path")),
    )
    bad = {
        "nan": _edit(good, src / "nan", tensors=lambda t: t[next(k for k in t if "lora_B" in k)].fill_(float("nan"))),
        "dora": _edit(good, src / "dora", config=lambda c: c.update(use_dora=True)),
        "modules-to-save": _edit(good, src / "mts", config=lambda c: c.update(modules_to_save=["lm_head"])),
        "lm-head": _edit(
            good,
            src / "lmh",
            tensors=lambda t: t.update(
                {
                    "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64),
                    "base_model.model.lm_head.lora_B.weight": torch.zeros(len(tok), 8),
                }
            ),
        ),
        "embedding": _edit(
            good,
            src / "emb",
            tensors=lambda t: t.update(
                {
                    "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, len(tok)),
                    "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 8),
                }
            ),
        ),
        "ia3": _edit(good, src / "ia3", config=lambda c: c.update(peft_type="IA3")),
        # Same module names and shapes, but trained on another family (as Mistral 7B and Llama 3 8B are).
        "other-family": _edit(good, src / "mistral", config=lambda c: c.update(
            base_model_name_or_path="mistralai/Mistral-7B-Instruct-v0.3")),
        "alien": _edit(
            good,
            src / "alien",
            tensors=lambda t: [
                t.update({k.replace("layers.1.", "layers.7."): t.pop(k)}) for k in list(t) if "layers.1." in k
            ],
        ),
    }
    return tok, base, src, good, other, good2, big, src / "other-size-named", bad


def make_model_with_hidden(vocab, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def world(made, tmp_path_factory):
    tok, base, src, *_ = made
    store = tmp_path_factory.mktemp("store")
    cache = tmp_path_factory.mktemp("cache")
    admin = AdminConfig(max_upload_bytes=MAX_UPLOAD, allowed_lora_dirs=(src,), operation_timeout=20)
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=2048, max_loras=3, admin=admin))
    with TestClient(app) as client:
        yield client, store


def upload(client, name, parts, dry_run=False, headers=None):
    data = {"name": name} if name is not None else {}
    return client.post(
        "/admin/adapters", params={"dry_run": str(dry_run).lower()}, data=data, files=parts, headers=headers or {}
    )


def complete(client, model, **kw):
    return client.post(
        "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **kw}
    )


def expected_text(made, folder):
    tok, base, *_ = made
    ids = greedy(peft_model(base, folder), tok(PROMPT)["input_ids"], 8, eos_token_id=0)
    return tok.decode(ids, skip_special_tokens=True)



def test_upload_then_serve_equals_peft(world, made):
    client, store = world
    good = made[3]
    r = upload(client, "good", files_of(good))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["created"] and info["version"] == version_of(good)
    assert (info["rank"], info["alpha"], info["target_modules"]) == (8, 16.0, ["down_proj", "q_proj", "v_proj"])
    assert info["state"] == "stored" and info["tier"] == "disk" and not info["pinned"]
    assert os.readlink(store / "good") == f".objects/{info['version']}"
    r = complete(client, "good")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected_text(made, good)
    assert r.headers["x-loraplex-adapter"] == f"good@{info['version'][:12]}"
    assert r.headers["x-loraplex-adapter-cache"] == "disk"
    assert complete(client, "good").headers["x-loraplex-adapter-cache"] == "device"
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["good"]["parent"] == "tiny"
    got = client.get("/admin/adapters/good").json()
    assert got["state"] == "device" and got["load_count"] == 1 and got["activations"] == 1
    assert got["last_used"] is not None and got["in_flight"] == 0


@pytest.mark.parametrize("packing", ["tar.gz-top", "tar.gz-folder", "zip-top", "zip-folder"])
def test_archives_are_accepted(world, made, packing):
    client, _ = world
    other = made[4]
    kind, where = packing.split("-")
    members = folder_members(other, "" if where == "top" else "my-adapter/")
    members["README.md"] = b"# an adapter"
    blob = tar_gz(members) if kind == "tar.gz" else zip_bytes(members)
    r = upload(client, f"arch-{packing}", [("files", (f"adapter.{kind}", blob))])
    assert r.status_code == 201, r.text
    assert r.json()["version"] == version_of(other)
    assert complete(client, f"arch-{packing}").json()["choices"][0]["text"] == expected_text(made, other)


def _bad_cases(made):
    _, _, _, good, _, _, big, other_size, bad = made
    good_files = folder_members(good)
    cfg, weights = good_files["adapter_config.json"], good_files["adapter_model.safetensors"]
    return {
        "no name": (None, files_of(good), 400, "name"),
        "bad name": ("../etc", files_of(good), 400, "invalid adapter name"),
        "dotted name": (".hidden", files_of(good), 400, "invalid adapter name"),
        "no files": ("x", [("files", ("README.md", b"hello"))], 400, "adapter_config.json is missing"),
        "not multipart": ("x", [], 415, "multipart"),
        "weights missing": (
            "x",
            [("files", ("adapter_config.json", cfg))],
            400,
            "adapter_model.safetensors is missing",
        ),
        "pickle": (
            "x",
            [("files", ("adapter_config.json", cfg)), ("files", ("adapter_model.bin", b"\x80\x04evil"))],
            400,
            "pickle",
        ),
        "config not json": (
            "x",
            [("files", ("adapter_config.json", b"{nope")), ("files", ("adapter_model.safetensors", weights))],
            400,
            "not valid JSON",
        ),
        "unexpected file": ("x", [*files_of(good), ("files", ("run.sh", b"rm -rf /"))], 400, "unexpected file"),
        "rank over limit": ("x", files_of(big), 400, "exceeds the server's --max-lora-rank 16"),
        "other model size": ("x", files_of(other_size), 400, "shape mismatch"),
        "nan": ("x", files_of(bad["nan"]), 400, "NaN or Inf"),
        "dora": ("x", files_of(bad["dora"]), 400, "DoRA"),
        "modules_to_save": ("x", files_of(bad["modules-to-save"]), 400, "modules_to_save"),
        "lm_head": ("x", files_of(bad["lm-head"]), 400, "lm_head"),
        "embedding": ("x", files_of(bad["embedding"]), 400, "embedding LoRA"),
        "ia3": ("x", files_of(bad["ia3"]), 400, "peft_type"),
        "module the base lacks": ("x", files_of(bad["alien"]), 400, "does not exist in the base model"),
        "another family": ("x", files_of(bad["other-family"]), 400,
                           "trained on 'mistralai/Mistral-7B-Instruct-v0.3' (mistral), but this server's base "
                           "model is a llama"),
        "traversal": (
            "x",
            [("files", ("a.tar.gz", tar_gz({"../adapter_config.json": cfg, "adapter_model.safetensors": weights})))],
            400,
            "outside the archive",
        ),
        "symlink": ("x", [("files", ("a.tar.gz", tar_gz(good_files, links={"x": "/etc/passwd"})))], 400, "link"),
        "two adapters": (
            "x",
            [("files", ("a.zip", zip_bytes({**good_files, **folder_members(good, "b/")})))],
            400,
            "more than one adapter",
        ),
        "corrupt archive": ("x", [("files", ("a.tar.gz", b"not gzip at all"))], 400, "not a readable .tar.gz"),
        "body too large": ("x", [*files_of(good), ("files", ("README.md", b"\0" * (2 * MAX_UPLOAD)))], 413, "limit"),
        "file too large": (
            "x",
            [
                ("files", ("adapter_config.json", cfg)),
                ("files", ("adapter_model.safetensors", weights + b"\0" * MAX_UPLOAD)),
            ],
            413,
            "limit",
        ),
        "zip bomb": (
            "x",
            [("files", ("a.zip", zip_bytes({**good_files, "pad.bin": b"\0" * (MAX_UPLOAD + 10)})))],
            413,
            "limit",
        ),
    }


CASES = [
    "no name",
    "bad name",
    "dotted name",
    "no files",
    "weights missing",
    "pickle",
    "config not json",
    "unexpected file",
    "rank over limit",
    "other model size",
    "nan",
    "dora",
    "modules_to_save",
    "lm_head",
    "embedding",
    "ia3",
    "module the base lacks",
    "traversal",
    "symlink",
    "two adapters",
    "corrupt archive",
    "body too large",
    "file too large",
    "zip bomb",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_uploads_are_refused_and_change_nothing(world, made, case, dry_run):
    client, store = world
    if not (store / "keep").exists():
        assert upload(client, "keep", files_of(made[3])).status_code == 201
    name, parts, status, message = _bad_cases(made)[case]
    before = snapshot(store)
    r = upload(client, name, parts, dry_run=dry_run)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message.lower() in error["message"].lower(), error
    assert snapshot(store) == before
    assert complete(client, "keep").status_code == 200


def test_non_multipart_upload_is_415(world):
    client, store = world
    before = snapshot(store)
    r = client.post("/admin/adapters", json={"name": "x"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]["message"]
    assert snapshot(store) == before


def test_dry_run_validates_without_storing(world, made):
    client, store = world
    before = snapshot(store)
    r = upload(client, "dry", files_of(made[4]), dry_run=True)
    assert r.status_code == 200, r.text
    assert r.json()["dry_run"] and r.json()["version"] == version_of(made[4]) and r.json()["rank"] == 4
    assert snapshot(store) == before
    assert client.get("/admin/adapters/dry").status_code == 404


def test_reupload_makes_a_new_version_and_identical_content_changes_nothing(world, made):
    client, _ = world
    _, _, _, good, _, good2, *_ = made
    assert upload(client, "versioned", files_of(good)).status_code == 201
    assert complete(client, "versioned").json()["choices"][0]["text"] == expected_text(made, good)
    same = upload(client, "versioned", files_of(good))
    assert same.status_code == 200 and not same.json()["created"]
    r = upload(client, "versioned", files_of(good2))
    assert r.status_code == 201 and r.json()["version"] == version_of(good2)
    after = complete(client, "versioned")
    assert after.headers["x-loraplex-adapter"] == f"versioned@{version_of(good2)[:12]}"
    assert after.json()["choices"][0]["text"] == expected_text(made, good2)


def test_list_shows_every_adapter_and_the_tiers(world, made):
    client, _ = world
    upload(client, "listed", files_of(made[4]))
    body = client.get("/admin/adapters").json()
    names = [a["name"] for a in body["data"]]
    assert names == sorted(names) and "listed" in names
    assert body["slots_total"] == 3 and 0 <= body["slots_in_use"] <= 3
    assert body["host_bytes"] <= body["host_bytes_limit"]
    entry = next(a for a in body["data"] if a["name"] == "listed")
    assert entry["tier"] == "disk" and entry["modules"] == 4 and entry["bytes"] > 0
    assert client.get("/admin/adapters/nope").status_code == 404


def test_load_pin_unpin_evict(world, made):
    client, _ = world
    upload(client, "pinme", files_of(made[4]))
    r = client.post("/admin/adapters/pinme/load", json={"pin": True})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "device" and r.json()["pinned"]
    # Traffic over other adapters cannot push a pinned adapter out of its slot.
    for i in range(4):
        upload(client, f"churn-{i}", files_of(made[3] if i % 2 else made[5]))
        assert complete(client, f"churn-{i}").status_code == 200
    assert client.get("/admin/adapters/pinme").json()["tier"] == "device"
    # With 3 slots, a second pin is allowed, a third would leave no slot for the rest.
    assert client.post("/admin/adapters/churn-0/load", json={"pin": True}).status_code == 200
    r = client.post("/admin/adapters/churn-1/load", json={"pin": True})
    assert r.status_code == 409 and "pinned" in r.json()["error"]["message"]
    assert client.post("/admin/adapters/churn-0/unpin").json()["pinned"] is False
    r = client.post("/admin/adapters/pinme/evict")
    assert r.status_code == 200 and r.json()["tier"] == "disk" and not r.json()["pinned"]
    assert complete(client, "pinme").headers["x-loraplex-adapter-cache"] == "disk"
    r = client.post("/admin/adapters/pinme/load")
    assert r.json()["state"] == "device" and not r.json()["pinned"]
    assert complete(client, "pinme").headers["x-loraplex-adapter-cache"] == "device"
    assert client.post("/admin/adapters/nope/load").status_code == 404
    r = client.post("/admin/adapters/pinme/load", json={"pin": "yes please"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("pin: must be a valid boolean"), r.text


def test_delete_removes_it_everywhere(world, made):
    client, store = world
    r = upload(client, "doomed", files_of(made[4]))
    version = r.json()["version"]
    assert complete(client, "doomed").status_code == 200
    r = client.delete("/admin/adapters/doomed")
    assert r.status_code == 200 and r.json()["deleted"]
    assert client.get("/admin/adapters/doomed").status_code == 404
    assert complete(client, "doomed").status_code == 404
    assert "doomed" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert not (store / "doomed").exists()
    referenced = {os.readlink(p).split("/")[-1] for p in store.iterdir() if p.is_symlink()}
    assert version in referenced or not (store / ".objects" / version).exists()
    assert client.delete("/admin/adapters/doomed").status_code == 404


def test_vllm_load_and_unload(world, made, tmp_path):
    client, store = world
    src, other = made[2], made[4]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "via-vllm", "lora_path": str(other)})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'via-vllm' added successfully."
    assert client.get("/admin/adapters/via-vllm").json()["tier"] == "device"
    assert complete(client, "via-vllm").json()["choices"][0]["text"] == expected_text(made, other)
    again = client.post("/v1/load_lora_adapter", json={"lora_name": "via-vllm", "lora_path": str(other)})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    outside = tmp_path / "outside"
    shutil.copytree(other, outside)
    before = snapshot(store)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(outside)})
    assert r.status_code == 403
    (src / "escape").symlink_to(outside)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(src / "escape")})
    assert r.status_code == 403
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(src / "dora")})
    assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"]
    assert snapshot(store) == before
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "via-vllm"})
    assert r.status_code == 200 and "removed" in r.text
    assert complete(client, "via-vllm").status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "via-vllm"}).status_code == 404


@pytest.fixture(scope="module")
def guarded(made, tmp_path_factory):
    """One app with an admin token, one bound beyond loopback without one."""
    tok, base, *_ = made
    apps = []
    for admin, http in ((AdminConfig(token=TOKEN), HttpConfig()), (AdminConfig(), HttpConfig(host="0.0.0.0"))):
        store, cache = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("cache")
        apps.append(
            create_app(
                lambda s=store, c=cache, a=admin, h=http: eng.build(base, tok, s, c, kv_tokens=1024, admin=a, http=h)
            )
        )
    with TestClient(apps[0]) as with_token, TestClient(apps[1]) as open_bind:
        yield with_token, open_bind


def test_admin_token_is_required_when_set(guarded, made):
    client, _ = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        r = client.get("/admin/adapters", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error"]["code"] == "invalid_admin_token"
    assert upload(client, "a", files_of(made[3])).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert upload(client, "a", files_of(made[3]), headers=auth).status_code == 201
    assert client.get("/admin/adapters", headers=auth).status_code == 200
    assert complete(client, "a").status_code == 200  # inference needs no admin token
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(made[2])}, headers=auth)
    assert r.status_code == 403 and "--allowed-lora-dirs" in r.json()["error"]["message"]


def test_admin_is_disabled_beyond_loopback_without_a_token(guarded, made):
    _, client = guarded
    r = client.get("/admin/adapters")
    assert r.status_code == 403 and "LORAPLEX_ADMIN_TOKEN" in r.json()["error"]["message"]
    assert upload(client, "a", files_of(made[3])).status_code == 403
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"}).status_code == 403
    assert client.get("/v1/models").status_code == 200


@pytest.fixture(scope="module")
def cramped(made, tmp_path_factory):
    """Two slots and a short adapter wait bound."""
    tok, base, *_ = made
    store, cache = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("cache")
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=4096, max_loras=2, adapter_wait_timeout=0.1))
    with TestClient(app) as client:
        yield client


def test_every_slot_held_means_503_with_retry_after(cramped, made):
    client = cramped
    for name, folder in (("pinned", made[3]), ("long", made[4]), ("late", made[5])):
        assert upload(client, name, files_of(folder)).status_code == 201
    assert client.post("/admin/adapters/pinned/load", json={"pin": True}).status_code == 200
    long_running = threading.Thread(
        target=complete, args=(client, "long"), kwargs={"max_tokens": 500, "ignore_eos": True}
    )
    long_running.start()
    for _ in range(100):  # until "long" holds the second slot
        if client.get("/admin/adapters").json()["slots_in_use"] == 2:
            break
        time.sleep(0.02)
    r = complete(client, "late")
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5" and "no free device slot" in r.json()["error"]["message"]
    assert complete(client, "pinned").status_code == 200  # adapters already on a slot still serve
    assert long_running.is_alive()  # the 503 came from the wait bound, not from "long" finishing
    long_running.join(60)
    assert complete(client, "late").status_code == 200
