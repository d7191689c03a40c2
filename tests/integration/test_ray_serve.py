"""loraplex on Ray Serve: two engine replicas sharing one S3 bucket (rclone on loopback) behind the OpenAI
ingress, on a local Ray cluster bound to loopback.

Through the ingress: an adapter's completions (streamed and not) equal PEFT's greedy output; every request
for an adapter lands on the replica that first served it while new adapters spread over both replicas
(Ray's model multiplexing); our error bodies pass through unchanged. Nothing Ray starts listens beyond
loopback, and nothing it started outlives the test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.ray_cluster import is_loopback, listening_addresses, local_serve
from tests.helpers.reference import greedy, peft_model
from tests.helpers.s3_server import running_s3
from tests.helpers.server_process import free_port
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model

pytestmark = pytest.mark.slow

PROMPT = "the quick brown fox"
STORE = "s3://adapters/shared"
SEEDS = {"sql": 1, "r1": 2, "r2": 3, "r3": 4}
ROUTED = ("r1", "r2", "r3")  # touched only by the routing test
FOLLOW_UPS = 4
# A replica reports the adapters it holds to Serve's controller every 0.1 s; the ingress's router hears of
# it by long poll. Before that, a request for the adapter goes to a replica holding the fewest.
REPORTED_S = 1.5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model_dir, base, tok = save_tiny_model(root / "tiny")
    spec = AdapterSpec("a", 8, 16, ("q_proj", "v_proj"))
    adapters = {name: make_adapter(base, spec, root / f"src-{name}", seed) for name, seed in SEEDS.items()}
    with running_s3(root / "s3") as s3:
        upload(s3, root / "uploader-cache", adapters)
        yield root, model_dir, base, tok, adapters, s3


def upload(s3, cache: Path, adapters: dict[str, Path]) -> None:
    """Straight into the bucket, as any replica's admin upload would put them."""
    import shutil

    from adapters_store.s3 import S3AdapterStore

    store = S3AdapterStore(STORE, cache, s3.client())
    for name, folder in adapters.items():
        with store.staging() as staged:
            for f in folder.iterdir():
                shutil.copy(f, staged / f.name)
            store.put(name, staged)


@pytest.fixture(scope="module")
def serve_url(world):
    root, model_dir, *_, s3 = world
    port = free_port()
    with local_serve(port, env=s3.env()):
        from ray import serve

        from server.ray_serve import build_app

        args = {
            "model": str(model_dir), "adapter_store": STORE, "s3_endpoint_url": s3.endpoint,
            "adapters_dir": str(root / "replica-cache"), "cache_dir": str(root / "model-cache"),
            "kv_cache_tokens": 1024, "max_num_seqs": 8, "num_replicas": 2, "num_cpus": 1,
        }
        serve.run(build_app(args), name="loraplex", route_prefix="/")
        yield f"http://127.0.0.1:{port}"


def complete(url: str, model: str, stream: bool = False, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def expected(world, name: str | None) -> str:
    _, _, base, tok, adapters, _ = world
    model = peft_model(base, adapters[name] if name else None)
    return tok.decode(greedy(model, tok(PROMPT)["input_ids"], 8, eos_token_id=None))


def streamed_text(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


def test_completions_through_the_ingress_equal_peft_streamed_and_not(world, serve_url):
    r = complete(serve_url, "sql")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(world, "sql")
    assert r.headers["x-loraplex-adapter"].startswith("sql@")
    assert r.headers["x-loraplex-replica"]
    r = complete(serve_url, "sql", stream=True)
    assert r.status_code == 200, r.text
    assert streamed_text(r) == expected(world, "sql")
    base = complete(serve_url, "tiny")  # the base model's name: no adapter, no multiplexed id
    assert base.status_code == 200, base.text
    assert base.json()["choices"][0]["text"] == expected(world, None)
    assert "x-loraplex-adapter" not in base.headers


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(serve_url):
    home: dict[str, str] = {}
    for name in ROUTED:  # one at a time, each reported before the next arrives
        home[name] = replica_of(complete(serve_url, name))
        time.sleep(REPORTED_S)
    seen = {name: [replica_of(complete(serve_url, name)) for _ in range(FOLLOW_UPS)] for name in ROUTED}
    for name in ROUTED:
        assert seen[name] == [home[name]] * FOLLOW_UPS, f"{name}: first on {home[name]}, then {seen[name]}"
    # A new adapter goes to a replica holding the fewest (Ray's fallback), so three new adapters cannot all
    # land on one of two replicas that held at most one adapter apart.
    assert len(set(home.values())) == 2, home


def replica_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-loraplex-replica"]


def test_our_errors_pass_through(serve_url):
    for stream in (False, True):
        r = complete(serve_url, "no-such-adapter", stream=stream)
        assert r.status_code == 404, r.text
        assert r.json() == {"error": {
            "message": "The model or adapter 'no-such-adapter' does not exist", "type": "not_found_error",
            "param": "model", "code": "adapter_not_found",
        }}
    r = httpx.post(serve_url + "/v1/completions", json={"model": "sql", "max_tokens": 2}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    r = httpx.post(serve_url + "/v1/chat/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json", r.text


def test_models_list_the_shared_store(serve_url):
    r = httpx.get(serve_url + "/v1/models", timeout=60)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["tiny", *sorted(SEEDS)]


def test_ray_listens_only_on_loopback(serve_url):
    found = listening_addresses()
    assert any(name == "raylet" for name in found), found  # the scan sees Ray's processes
    assert all(is_loopback(a) for addresses in found.values() for a in addresses), found
