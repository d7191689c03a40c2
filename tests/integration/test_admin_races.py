"""Upload, evict, pin, delete and re-upload racing with requests for the same adapter.

Every completed request must equal PEFT on the version it reports in its
header; afterwards no slot, lease, host byte or stored file may be left behind.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from fastapi.testclient import TestClient

from server.adapters.commands import TakeSnapshot
from server.api.app import create_app
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer
from tests.helpers.uploads import files_of, version_of
from tests.helpers.versioned_completion import complete

PROMPT = "a b c d e f"
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=11)
    src = tmp_path_factory.mktemp("made")
    versions = [make_adapter(base, AdapterSpec(f"v{i}", 8, 16, TARGETS), src, seed=20 + i) for i in range(3)]
    others = [make_adapter(base, AdapterSpec(f"o{i}", 4, 8, ("q_proj", "o_proj")), src, seed=30 + i) for i in range(3)]
    ids = tok(PROMPT)["input_ids"]
    expected = {}
    for folder in versions + others:
        text = tok.decode(greedy(peft_model(base, folder), ids, 6, eos_token_id=0), skip_special_tokens=True)
        expected[version_of(folder)[:12]] = text
    store, cache = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("cache")
    one = sum((versions[0] / f).stat().st_size for f in ("adapter_model.safetensors",))
    app = create_app(lambda: eng.build(base, tok, store, cache, kv_tokens=4096, max_loras=2, host_cache_bytes=3 * one))
    with TestClient(app) as client:
        yield client, store, versions, others, expected



def _complete(client, model, stream):
    return complete(client, model, PROMPT, 6, stream)


def test_admin_actions_racing_with_requests(world):
    client, store, versions, others, expected = world
    for i, folder in enumerate(others):
        assert client.post("/admin/adapters", data={"name": f"other-{i}"}, files=files_of(folder)).status_code == 201
    assert client.post("/admin/adapters", data={"name": "hot"}, files=files_of(versions[0])).status_code == 201
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []
    problems: list[str] = []

    def traffic(worker: int) -> None:
        n = 0
        while not stop.is_set():
            model = "hot" if n % 3 else f"other-{(worker + n) % 3}"
            status, version, text = _complete(client, model, stream=bool(n % 2))
            n += 1
            seen.append((status, version))
            if status == 200 and text != expected[version]:
                problems.append(f"{model}@{version}: {text!r} != {expected[version]!r}")
            elif status not in (200, 404):
                problems.append(f"{model}: status {status}")

    workers = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    try:
        for round_ in range(6):
            folder = versions[round_ % 3]
            r = client.post("/admin/adapters", data={"name": "hot"}, files=files_of(folder))
            assert r.status_code in (200, 201), r.text
            time.sleep(0.05)
            assert client.post("/admin/adapters/hot/evict").status_code == 200
            assert client.post("/admin/adapters/hot/load", json={"pin": True}).status_code == 200
            time.sleep(0.05)
            assert client.post("/admin/adapters/hot/unpin").status_code == 200
            if round_ % 2:
                assert client.delete("/admin/adapters/hot").status_code == 200
                time.sleep(0.05)
                r = client.post("/admin/adapters", data={"name": "hot"}, files=files_of(versions[(round_ + 1) % 3]))
                assert r.status_code == 201
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert not problems, problems[:5]
    ok = [v for s, v in seen if s == 200]
    assert len(ok) > 20 and len({v for v in ok}) >= 3  # several versions were really served

    # Nothing leaked: slots, leases, host bytes, stored files of old versions.
    engine = client.app.state.loraplex.serving.engine
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listing = client.get("/admin/adapters").json()
        held = engine.send(TakeSnapshot()).result(10).held_versions()
        objects = set(os.listdir(store / ".objects"))
        linked = {os.readlink(p).split("/")[-1] for p in store.iterdir() if p.is_symlink()}
        if listing["slots_in_use"] == 0 and not held and objects == linked:
            break
        time.sleep(0.1)
    assert listing["slots_in_use"] == 0
    assert not held
    assert objects == linked, (objects, linked)
    assert listing["host_bytes"] <= listing["host_bytes_limit"]
    assert all(a["in_flight"] == 0 and not a["pinned"] for a in listing["data"])
    assert os.listdir(store / ".staging") == []
    status, version, text = _complete(client, "hot", stream=False)
    assert status == 200 and text == expected[version]
