"""An adapter may not take a name that a request's `model` reads otherwise: the base model's served name, "", or
``<base>:<other>``. Refused at upload (local and S3 stores) and at vLLM's load_lora_adapter, reported for folders
placed by hand; such an adapter never shadows the base model, and /v1/models never lists a name twice."""

from __future__ import annotations

import logging
import shutil

import pytest
from fastapi.testclient import TestClient

from adapters_store.s3 import S3AdapterStore, parse_url
from server.api.app import create_app
from server.config import AdminConfig
from server.lora import cpu_kernel
from server.model import cpu_attention
from tests.helpers import engine as eng
from tests.helpers.s3_server import running_s3
from tests.helpers.tiny import tiny_base_with_adapter
from tests.helpers.uploads import files_of, snapshot

BASE = "tiny"  # the served name tests.helpers.engine gives the tiny model
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cpu_kernel.available()  # the C kernels from the shared cache: a fresh cache dir would rebuild them
    cpu_attention.available()
    src = tmp_path_factory.mktemp("src")
    tok, base, good = tiny_base_with_adapter(src)
    return tok, base, src, good


@pytest.fixture(scope="module")
def world(made, tmp_path_factory):
    """A local store with a valid adapter placed by hand under the base model's name, beside a good one."""
    tok, base, src, good = made
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(good, store / "good")
    shutil.copytree(good, store / BASE)
    admin = AdminConfig(allowed_lora_dirs=(src,), operation_timeout=20)
    app = create_app(lambda: eng.build(base, tok, store, tmp_path_factory.mktemp("cache"), kv_tokens=1024, admin=admin))
    with TestClient(app) as client:
        assert client.app.state.loraplex.registry.report.done.wait(60)
        yield client, store


def complete(client, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", json=body)


def upload(client, name, folder, dry_run=False):
    params = {"dry_run": str(dry_run).lower()}
    return client.post("/admin/adapters", params=params, data={"name": name}, files=files_of(folder))


def assert_name_conflict(r, name, param):
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("adapter_name_conflict", param, "invalid_request_error")
    return error["message"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_upload_under_the_base_models_name_is_refused_logged_and_changes_nothing(world, made, caplog, dry_run):
    client, store = world
    before = snapshot(store)
    caplog.set_level(logging.WARNING, logger="server.api.upload_log")
    message = assert_name_conflict(upload(client, BASE, made[3], dry_run), BASE, "name")
    assert message == (
        "an adapter cannot be named 'tiny': 'tiny' is the base model's served name: "
        "a request naming it is served by the base model"
    )
    assert snapshot(store) == before
    assert f"upload of adapter 'tiny' refused: {message}" in [r.getMessage() for r in caplog.records]


def test_load_lora_adapter_refuses_the_base_models_name_and_the_empty_name(world, made):
    client, store = world
    before = snapshot(store)
    for name, says in ((BASE, "'tiny' is the base model's served name"), ("", "the empty name")):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(made[3])})
        assert says in assert_name_conflict(r, name, "lora_name")
    assert snapshot(store) == before
    # The same folder under a free name is accepted: the refusals above were about the names alone.
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "via-vllm", "lora_path": str(made[3])})
    assert r.status_code == 200, r.text
    assert client.delete("/admin/adapters/via-vllm").status_code == 200


def test_a_folder_placed_under_the_base_models_name_never_shadows_it(world):
    client, _ = world
    base, named, adapted = complete(client, ""), complete(client, BASE), complete(client, "good")
    assert base.status_code == named.status_code == adapted.status_code == 200
    assert named.json()["choices"][0]["text"] == base.json()["choices"][0]["text"]
    assert "x-loraplex-adapter" not in named.headers
    # The folder holds the same adapter as "good", which does change the answer: served, it would show.
    assert adapted.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
    r = complete(client, f"{BASE}:{BASE}")  # the one spelling that names the adapter: refused, with why
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
    assert "'tiny' is the base model's served name" in r.json()["error"]["message"]


def test_models_lists_each_name_once_and_the_admin_list_shows_the_clash(world):
    client, _ = world
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [BASE, "good"]
    listed = {a["name"]: a for a in client.get("/admin/adapters").json()["data"]}
    assert listed[BASE]["state"] == "invalid" and "base model's served name" in listed[BASE]["error"]
    assert listed["good"]["state"] != "invalid"
    one = client.get(f"/admin/adapters/{BASE}").json()
    assert one["state"] == "invalid" and one["error"] == listed[BASE]["error"]
    r = client.post(f"/admin/adapters/{BASE}/load")
    assert r.status_code == 400 and "base model's served name" in r.json()["error"]["message"]
    check = client.get("/admin/adapters").json()["store_check"]
    assert check["state"] == "done" and (check["found"], check["invalid"]) == (2, 1)


def test_through_an_s3_store_the_same_names_are_refused_and_never_listed_twice(made, tmp_path, monkeypatch):
    tok, base, _, good = made
    with running_s3(tmp_path / "s3") as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        url = "s3://adapters/names"
        # A replica serving the model under another name stored adapters, one under this one's name.
        other = S3AdapterStore(url, tmp_path / "other-replica", s3.client())
        for name in (BASE, "remote"):
            with other.staging() as staged:
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copy(good / f, staged / f)
                other.put(name, staged)
        bucket, prefix = parse_url(url)
        objects = s3.root / bucket / prefix
        s3.client().put_object(Bucket=bucket, Key=f"{prefix}adapters/notes.txt", Body=b"not a manifest")

        def keys():
            return sorted(str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file())

        app = create_app(
            lambda: eng.build(
                base, tok, tmp_path / "cache", tmp_path / "model-cache", kv_tokens=1024,
                store_url=url, s3_endpoint_url=s3.endpoint,
            )
        )
        with TestClient(app) as client:
            assert client.app.state.loraplex.registry.report.done.wait(60)
            check = client.get("/admin/adapters").json()["store_check"]
            # The clash is known from the name alone; "remote" has no copy here: checked on first use.
            assert check == {"state": "done", "found": 2, "checked": 1, "invalid": 1, "not_checked": 1, "ignored": 1}
            before = keys()
            assert_name_conflict(upload(client, BASE, good), BASE, "name")
            assert keys() == before
            assert upload(client, "good", good).status_code == 201  # the S3 path itself works
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "good", "remote"]
            listed = {a["name"]: a for a in client.get("/admin/adapters").json()["data"]}
            assert listed[BASE]["state"] == "invalid" and "base model's served name" in listed[BASE]["error"]
            named, plain = complete(client, BASE), complete(client, "")
            assert named.status_code == 200 and "x-loraplex-adapter" not in named.headers
            assert named.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
