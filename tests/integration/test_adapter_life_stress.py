"""20 s of mixed traffic over 200 adapters and 8 device slots while an operator thread uploads, re-uploads, pins,
unpins, loads, evicts and deletes at random.

Every answer must equal transformers + PEFT for the version its header names. Afterwards every slot, hold, host
byte and stored file is accounted for: no request holds a version, the slots in use are the pins' (none once
unpinned), a slot no record claims is empty, the host bytes are the sum of the records' host copies and within
the bound, and the store keeps exactly the files of the names' current versions.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
from fastapi.testclient import TestClient

from adapters_store.local import LocalAdapterStore
from server.adapters.commands import TakeSnapshot
from server.adapters.residency import State
from server.api.app import create_app
from server.config import AdminConfig
from tests.helpers import engine as eng
from tests.helpers.reference import greedy, peft_model
from tests.helpers.tiny import AdapterSpec, make_adapters, make_model, make_tokenizer
from tests.helpers.uploads import files_of, version_of
from tests.helpers.versioned_completion import complete

N_NAMES = 200
SLOTS = 8
SECONDS = 20.0
PROMPT = "the quick brown fox"
MAX_TOKENS = 5
SHAPES = [  # PEFT adapters of three shapes: ranks 4, 8 and 16 over different modules, one with rsLoRA
    AdapterSpec("s4", 4, 8, ("q_proj", "v_proj")),
    AdapterSpec("s8", 8, 16, ("q_proj", "k_proj", "up_proj", "down_proj")),
    AdapterSpec("s16", 16, 8, ("o_proj", "gate_proj"), rslora=True),
]
PER_SHAPE = 16  # distinct contents per shape: 48 versions spread over 200 names


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=17)
    made = tmp_path_factory.mktemp("made")
    contents = []
    for k, spec in enumerate(SHAPES):
        folder = made / spec.name
        folder.mkdir()
        seeds = {f"{spec.name}-{i}": 100 * k + i for i in range(PER_SHAPE)}
        contents += make_adapters(base, spec, folder, seeds)
    store_dir = tmp_path_factory.mktemp("store")
    store = LocalAdapterStore(store_dir)
    store.recover()
    for i in range(N_NAMES):  # placed as an earlier upload would have (files_of reads the same two files)
        with store.staging() as staged:
            for _, (file_name, data) in files_of(contents[i % len(contents)]):
                (staged / file_name).write_bytes(data)
            store.put(f"a{i:03d}", staged)
    one = max((c / "adapter_model.safetensors").stat().st_size for c in contents)
    host_limit = 24 * one  # the host tier churns too
    app = create_app(
        lambda: eng.build(
            base, tok, store_dir, tmp_path_factory.mktemp("cache"), kv_tokens=8192, max_loras=SLOTS,
            host_cache_bytes=host_limit, admin=AdminConfig(operation_timeout=5.0),
        )
    )
    with TestClient(app) as client:
        assert client.app.state.loraplex.registry.report.done.wait(60)
        assert client.get("/admin/adapters").json()["store_check"]["invalid"] == 0
        assert len(client.get("/v1/models").json()["data"]) == N_NAMES + 1
        yield client, tok, base, store_dir, contents


def _complete(client: TestClient, model: str, stream: bool) -> tuple[int, str | None, str]:
    return complete(client, model, PROMPT, MAX_TOKENS, stream)


def test_adapter_lives_under_random_operator_actions_and_traffic(world):
    client, tok, base, store_dir, contents = world
    names = [f"a{i:03d}" for i in range(N_NAMES)]
    stop = threading.Event()
    answers: list[tuple[str, str | None, str]] = []  # (model, version, text) of every 200
    problems: list[str] = []
    actions: dict[str, int] = {}

    def traffic(worker: int) -> None:
        rng = random.Random(worker)
        n = 0
        while not stop.is_set():
            n += 1
            # one request in six on the base model; of the others, half spread over all 200 names and half on a
            # skewed few (the names the operator thread acts on most)
            skewed = names[min(int(rng.paretovariate(0.7)) - 1, N_NAMES - 1)]
            model = "" if n % 6 == 0 else rng.choice(names) if rng.random() < 0.5 else skewed
            status, version, text = _complete(client, model, stream=n % 2 == 0)
            if status == 200:
                answers.append((model, version, text))
            elif status != 404:  # 404: the name was deleted meanwhile
                problems.append(f"{model}: {status} {text[:300]}")

    def operator() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            name = rng.choice(names[:40]) if rng.random() < 0.7 else rng.choice(names)  # the busy names too
            action = rng.choice(["upload", "upload", "pin", "unpin", "load", "evict", "delete"])
            if action == "upload":
                r = client.post("/admin/adapters", data={"name": name}, files=files_of(rng.choice(contents)))
                ok = r.status_code in (200, 201)
            elif action == "pin":
                r = client.post(f"/admin/adapters/{name}/load", json={"pin": True})
                ok = r.status_code in (200, 404) or r.json()["error"]["code"] in ("pin_limit_reached", "adapter_busy")
            elif action == "load":
                r = client.post(f"/admin/adapters/{name}/load")
                ok = r.status_code in (200, 404) or r.json()["error"]["code"] == "adapter_busy"
            elif action == "unpin":
                r = client.post(f"/admin/adapters/{name}/unpin")
                ok = r.status_code in (200, 404)
            elif action == "evict":
                r = client.post(f"/admin/adapters/{name}/evict")
                ok = r.status_code in (200, 404) or r.json()["error"]["code"] == "adapter_in_use"
            else:
                r = client.delete(f"/admin/adapters/{name}")
                ok = r.status_code in (200, 404) or r.json()["error"]["code"] == "adapter_in_use"
            actions[f"{action} {r.status_code}"] = actions.get(f"{action} {r.status_code}", 0) + 1
            if not ok:
                problems.append(f"{action} {name}: {r.status_code} {r.text[:300]}")
            time.sleep(rng.uniform(0.0, 0.05))

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(4)] + [threading.Thread(target=operator)]
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join(120)
    assert not problems, problems[:5]
    assert len(answers) > 100 and sum(actions.values()) > 100, (len(answers), actions)
    assert any(k.startswith(("delete 200", "upload 201")) for k in actions), actions

    # Every answer equals PEFT for the version in its header.
    ids = tok(PROMPT)["input_ids"]
    by_version = {version_of(c)[:12]: c for c in contents}
    def reference(folder) -> str:
        return tok.decode(greedy(peft_model(base, folder), ids, MAX_TOKENS, eos_token_id=0), skip_special_tokens=True)

    expected = {None: reference(None)} | {v: reference(by_version[v]) for v in {v for _, v, _ in answers if v}}
    wrong = [(m, v, t, expected[v]) for m, v, t in answers if t != expected[v]]
    assert not wrong, wrong[:5]
    assert len({v for _, v, _ in answers}) >= 30 and len({m for m, _, _ in answers}) >= 100  # really spread

    # Everything accounted for, once the last request and retirement are done.
    state = client.app.state.loraplex
    engine = state.serving.engine
    sched = engine.scheduler
    deadline = time.monotonic() + 30
    while True:
        snapshot = engine.send(TakeSnapshot()).result(10)
        idle = engine.call(lambda: (sched.has_work, sched.blocks.used_blocks, dict(sched.busy_slots()))).result(10)
        objects = set(os.listdir(store_dir / ".objects"))
        linked = {os.readlink(p).split("/")[-1] for p in store_dir.iterdir() if p.is_symlink()}
        settled = not any(r.state in (State.RETIRING, State.LOADING) for r in snapshot.records.values())
        if (idle == (False, 0, {}) and not snapshot.held_versions() and objects == linked and settled) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.1)
    assert idle == (False, 0, {}), idle
    assert not snapshot.held_versions(), {k: r.refs for k, r in snapshot.records.items() if r.refs}
    assert settled, {k: r.state for k, r in snapshot.records.items()}
    assert objects == linked, (objects - linked, linked - objects)
    assert os.listdir(store_dir / ".staging") == []
    pins = [r for r in snapshot.records.values() if r.pinned]
    assert snapshot.slots_in_use == len(pins) < SLOTS
    assert snapshot.host_bytes == sum(r.host_bytes for r in snapshot.records.values()) <= snapshot.host_bytes_limit
    on_slots = [r.slot for r in snapshot.records.values() if r.slot >= 0]
    assert len(on_slots) == len(set(on_slots)) <= SLOTS  # one record per slot

    def slot_ranks() -> list[int]:
        modules = engine.runner.slots.modules.values()
        return [max(m.host_rank[s] for m in modules) for s in range(SLOTS)]

    ranks = engine.call(slot_ranks).result(10)
    assert all(ranks[s] == 0 for s in range(SLOTS) if s not in on_slots), (ranks, on_slots)  # empty means empty
    assert all(ranks[s] > 0 for s in on_slots), (ranks, on_slots)
    for r in pins:
        assert client.post(f"/admin/adapters/{r.adapter.name}/unpin").status_code == 200
    listing = client.get("/admin/adapters").json()
    assert listing["slots_in_use"] == 0 and all(a["in_flight"] == 0 for a in listing["data"])
    # Evicting what is on the slots empties every slot and gives every host byte of those versions back.
    for name in {r.adapter.name for r in snapshot.records.values() if r.slot >= 0}:
        assert client.post(f"/admin/adapters/{name}/evict").status_code in (200, 404)
    after = engine.send(TakeSnapshot()).result(10)
    assert not [r for r in after.records.values() if r.slot >= 0]
    assert engine.call(slot_ranks).result(10) == [0] * SLOTS
    assert after.host_bytes == sum(r.host_bytes for r in after.records.values()) <= after.host_bytes_limit
    r = client.post("/admin/adapters", data={"name": names[0]}, files=files_of(contents[1]))
    assert r.status_code in (200, 201), r.text
    status, version, text = _complete(client, names[0], stream=False)  # still serving
    assert (status, version, text) == (200, version_of(contents[1])[:12], reference(contents[1]))
