"""The start-up report of the store: folders placed by hand are checked in the background (/ready does not wait),
the log counts them and names each invalid one with its reason, /v1/models marks invalid ones, the admin list
shows them with the error, a request naming one gets a 400 with the reason, and a rejected upload is logged."""

from __future__ import annotations

import logging
import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from server.adapters import catalog as catalog_module
from server.api.app import create_app
from server.lora import cpu_kernel
from server.model import cpu_attention
from tests.helpers import engine as eng
from tests.helpers.tiny import (
    edit_adapter,
    tiny_base_with_adapter,
)
from tests.helpers.uploads import files_of, snapshot

PROMPT = "the quick brown fox"
# Each invalid folder and what its line in the log (and its error in the admin list) must say.
INVALID = {
    "bad name": "invalid adapter name",
    "bad-shape": "shape",
    "nan-weights": "contains NaN or Inf",  # only reading the values finds this one
    "pickled": "pickle",
    "tiny": "'tiny' is the base model's served name",
}
IGNORED = {
    "no-config": "a folder without adapter_config.json",
    "nested": "without adapter_config.json; checkpoint-1/ holds one: an adapter's files go at the top of its folder",
    "notes.txt": "a file, not an adapter folder",
}


def _poison(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


def _truncate_an_a(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key][:, :10].contiguous()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cpu_kernel.available()  # the C kernels from the shared cache: a fresh cache dir would rebuild them
    cpu_attention.available()
    tok, base, good = tiny_base_with_adapter(tmp_path_factory.mktemp("src"))
    return tok, base, good, tmp_path_factory.mktemp("model-cache")


def place_store(root, good):
    """A store as an operator fills it by hand: one good adapter, the invalid ones, and things that are not adapters."""
    shutil.copytree(good, root / "good")
    shutil.copytree(good, root / "bad name")
    edit_adapter(shutil.copytree(good, root / "bad-shape"), tensors=_truncate_an_a)
    edit_adapter(shutil.copytree(good, root / "nan-weights"), tensors=_poison)
    shutil.copytree(good, root / "pickled")
    (root / "pickled" / "adapter_model.safetensors").rename(root / "pickled" / "adapter_model.bin")
    shutil.copytree(good, root / "tiny")
    (root / "no-config").mkdir()
    shutil.copy(good / "adapter_model.safetensors", root / "no-config")
    shutil.copytree(good, root / "nested" / "checkpoint-1")
    (root / "notes.txt").write_text("adapters for the demo")
    return root


class SlowChecks:
    """Makes every full check (tensor values read) wait until released, like a store too large to read quickly."""

    def __init__(self, monkeypatch) -> None:
        self.release, self.waiting = threading.Event(), threading.Event()
        real = catalog_module.validate

        def slow(*args, **kw):
            self.waiting.set()
            assert self.release.wait(60)
            return real(*args, **kw)

        monkeypatch.setattr(catalog_module, "validate", slow)


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def app_for(made, store):
    tok, base, _, cache = made
    return create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=1024))


def complete(client, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", json=body)


def test_ready_does_not_wait_for_the_check_which_then_names_each_invalid_adapter(made, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="server.adapters.store_report")
    store = place_store(tmp_path / "store", made[2])
    slow = SlowChecks(monkeypatch)
    with TestClient(app_for(made, store)) as client:
        assert client.get("/ready").status_code == 200
        assert slow.waiting.wait(30)  # the check is under way and held ...
        check = client.get("/admin/adapters").json()["store_check"]
        assert check["state"] == "running" and check["checked"] < check["found"] == 6
        r = complete(client, "good")  # ... and requests are served meanwhile
        assert r.status_code == 200, r.text
        slow.release.set()
        wait_for(lambda: client.get("/admin/adapters").json()["store_check"]["state"] == "done")

        listing = client.get("/admin/adapters").json()
        assert listing["store_check"] == {
            "state": "done", "found": 6, "checked": 6, "invalid": 5, "not_checked": 0, "ignored": 3,
        }
        rows = {a["name"]: a for a in listing["data"]}
        assert set(rows) == {"good", *INVALID}
        assert rows["good"]["state"] != "invalid" and rows["good"]["error"] is None
        for name, says in INVALID.items():
            assert rows[name]["state"] == "invalid" and says in rows[name]["error"], (name, rows[name])
        assert rows["bad name"]["version"] is None  # no request can reach it by that name

        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert list(models)[:2] == ["tiny", "bad name"] and set(models) == {"tiny", "good", *INVALID}
        assert "status" not in models["good"]
        for name, says in INVALID.items():  # listed as such, with why; the name that clashes lists the base once
            if name != "tiny":
                assert models[name]["status"] == "invalid" and says in models[name]["error"], (name, models[name])
        for name in ("nan-weights", "bad-shape", "pickled"):
            r = complete(client, name)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "invalid_adapter" and INVALID[name] in error["message"], (name, error)
            one = client.get(f"/admin/adapters/{name}").json()
            assert one["state"] == "invalid" and one["error"] in error["message"]

    lines = [r.getMessage() for r in caplog.records if r.name == "server.adapters.store_report"]
    assert lines[0] == f"adapter store {store}: 6 adapters found; checking them in the background"
    for name, says in INVALID.items():
        named = [line for line in lines if line.startswith(f"adapter {name!r} is invalid and not served: ")]
        assert len(named) == 1 and says in named[0], (name, named)
    for entry, says in IGNORED.items():
        named = [line for line in lines if line.startswith(f"adapter store {store}: {entry!r} is not an adapter, ")]
        assert len(named) == 1 and says in named[0], (entry, named)
    assert lines[-1].startswith(f"adapter store {store}: 6 adapters checked in ")
    assert lines[-1].endswith(": 1 valid, 5 invalid")


def test_the_check_stops_at_shutdown(made, tmp_path, monkeypatch):
    store = place_store(tmp_path / "store", made[2])
    slow = SlowChecks(monkeypatch)
    with TestClient(app_for(made, store)) as client:
        assert slow.waiting.wait(30)
        report = client.app.state.loraplex.registry.report
    slow.release.set()  # shut down while held: the check ends after the adapter it was reading
    assert report.done.wait(30)
    check = report.check
    assert check.state == "stopped" and check.checked < check.found


def test_a_rejected_upload_is_logged_with_its_reason(made, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="server.api.upload_log")
    store = tmp_path / "store"
    store.mkdir()
    bad = edit_adapter(shutil.copytree(made[2], tmp_path / "nan"), tensors=_poison)
    with TestClient(app_for(made, store)) as client:
        before = snapshot(store)
        r = client.post("/admin/adapters", data={"name": "nan"}, files=files_of(bad))
        assert r.status_code == 400 and "contains NaN or Inf" in r.json()["error"]["message"]
        r = client.post("/admin/adapters", files=files_of(made[2]))
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"
        r = client.post("/admin/adapters", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 415
        assert snapshot(store) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith("upload of adapter 'nan' refused: tensor ")
    assert warnings[0].endswith("contains NaN or Inf")
    assert warnings[1:] == [
        "upload of adapter (no name) refused: the upload needs a 'name' field",
        "upload of adapter (no name) refused: send multipart/form-data: a 'name' field and 'files' parts",
    ]
