"""loraplex on Ray Serve: two engine replicas behind the OpenAI ingress on a local Ray cluster bound to
loopback, sharing one adapter store: an S3 bucket (rclone on loopback), then a local directory (with
inference API keys).

Through the ingress: an adapter's completions (streamed and not) equal PEFT's greedy output; every request
for an adapter lands on the replica that first served it, while new adapters spread over both replicas
(Ray's model multiplexing); our error bodies and auth pass through unchanged. Nothing Ray starts listens beyond
loopback but Serve's token-guarded replica gRPC port, and nothing it started outlives the test.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters_store.backend import AdapterStore
from adapters_store.local import LocalAdapterStore
from adapters_store.s3 import S3AdapterStore
from tests.helpers.ray_cluster import is_loopback, listening_addresses, local_serve
from tests.helpers.reference import greedy, peft_model
from tests.helpers.s3_server import running_s3
from tests.helpers.server_process import free_port
from tests.helpers.tiny_server import save_tiny_model_with_adapters

# ray is imported only once local_serve has set it up for loopback, so the check does not import it.
pytestmark = pytest.mark.slow  # ray is in the dev extras: missing, the test fails rather than skips

PROMPT = "the quick brown fox"
BUCKET = "s3://adapters/shared"
SEEDS = {"sql": 1, "r1": 2, "r2": 3, "r3": 4}
ROUTED = ("r1", "r2", "r3")  # touched only by the routing test
FOLLOW_UPS = 4
# A replica reports the adapters it holds to Serve's controller every 0.1 s; the ingress's router hears of
# it by long poll. Until then, a request for the adapter goes to a replica holding the fewest.
REPORTED_S = 2.0
KEY = "sk-ray-test-key-0001"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model_dir, base, tok, adapters = save_tiny_model_with_adapters(root, SEEDS)
    upload(LocalAdapterStore(root / "shared-dir"), adapters)
    with running_s3(root / "s3") as s3:
        upload(S3AdapterStore(BUCKET, root / "uploader-cache", s3.client()), adapters)
        yield root, model_dir, base, tok, adapters, s3


def upload(store: AdapterStore, adapters: dict[str, Path]) -> None:
    """Through the store's own API, as a replica's admin upload would."""
    for name, folder in adapters.items():
        with store.staging() as staged:
            for f in folder.iterdir():
                shutil.copy(f, staged / f.name)
            store.put(name, staged)


@pytest.fixture(scope="module")
def cluster(world):
    *_, s3 = world
    port = free_port()
    with local_serve(port, env=s3.env()):  # replicas inherit the AWS_* variables of the S3 server
        yield f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class Served:
    url: str
    key: str | None  # the inference API key the replicas require, if any

    def post(self, path: str, key: str | None = None, headers: dict | None = None, **kw) -> httpx.Response:
        """With the served key, or ``key`` instead ("" for none)."""
        key = self.key if key is None else key
        auth = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, headers=auth | (headers or {}), timeout=60, **kw)

    def get(self, path: str) -> httpx.Response:
        auth = {"authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.get(self.url + path, headers=auth, timeout=60)


@pytest.fixture(scope="module", params=["s3", "local-dir"])
def served(request, world, cluster) -> Served:
    from ray import serve

    from server.ray_serve import build_app

    root, model_dir, *_, s3 = world
    args = {"model": str(model_dir), "kv_cache_tokens": 1024, "max_num_seqs": 8, "num_replicas": 2, "num_cpus": 1}
    if request.param == "s3":
        args |= {"adapter_store": BUCKET, "s3_endpoint_url": s3.endpoint,
                 "adapters_dir": str(root / "bucket-cache")}  # the bucket's cache, shared by both replicas
    else:
        args |= {"adapters_dir": str(root / "shared-dir"), "api_keys": KEY}
    serve.run(build_app(args), name="loraplex", route_prefix="/")
    try:
        yield Served(cluster, KEY if "api_keys" in args else None)
    finally:
        serve.delete("loraplex")


def complete(served: Served, model: str, stream: bool = False, key: str | None = None) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    return served.post("/v1/completions", json=body, key=key)


def expected(world, name: str | None) -> str:
    _, _, base, tok, adapters, _ = world
    model = peft_model(base, adapters[name] if name else None)
    return tok.decode(greedy(model, tok(PROMPT)["input_ids"], 8, eos_token_id=None))


def streamed_text(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    return "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])


def replica_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-loraplex-replica"]


def test_completions_through_the_ingress_equal_peft_streamed_and_not(world, served):
    r = complete(served, "sql")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(world, "sql")
    assert r.headers["x-loraplex-adapter"].startswith("sql@")
    r = complete(served, "sql", stream=True)
    assert r.status_code == 200, r.text
    assert streamed_text(r) == expected(world, "sql")
    base = complete(served, "tiny")  # the base model's name: no adapter, no multiplexed id
    assert base.status_code == 200, base.text
    assert base.json()["choices"][0]["text"] == expected(world, None)
    assert "x-loraplex-adapter" not in base.headers


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(served):
    home: dict[str, str] = {}
    for name in ROUTED:  # one at a time, each reported before the next arrives
        home[name] = replica_of(complete(served, name))
        time.sleep(REPORTED_S)
    seen = {name: [] for name in ROUTED}
    for _ in range(FOLLOW_UPS):  # interleaved: no replica is "the last one used" for long
        for name in ROUTED:
            seen[name].append(replica_of(complete(served, name)))
    for name in ROUTED:
        assert seen[name] == [home[name]] * FOLLOW_UPS, f"{name}: first on {home[name]}, then {seen[name]}"
    # A new adapter goes to a replica holding the fewest (Ray's fallback), so three new adapters cannot all
    # land on one of two replicas that held at most one adapter apart.
    assert len(set(home.values())) == 2, home


def test_our_errors_pass_through(served):
    for stream in (False, True):
        r = complete(served, "no-such-adapter", stream=stream)
        assert r.status_code == 404, r.text
        assert r.json() == {"error": {
            "message": "The model or adapter 'no-such-adapter' does not exist", "type": "not_found_error",
            "param": "model", "code": "adapter_not_found",
        }}
    r = served.post("/v1/completions", json={"model": "sql", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"] == "prompt is required", r.text
    r = served.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    if served.key:
        for key in ("", "sk-not-a-valid-key"):
            r = complete(served, "sql", key=key)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
            assert r.json()["error"]["code"] == "invalid_api_key", r.text


def test_models_list_the_shared_store(served):
    r = served.get("/v1/models")
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["tiny", *sorted(SEEDS)]


def test_ray_listens_only_on_loopback_but_for_serve_replicas_token_guarded_grpc(served):
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::]:0 (hard-coded); everything else
    Ray starts here is on loopback. That one port refuses callers without the cluster's token."""
    import grpc

    found = listening_addresses()
    assert any(name == "raylet" for name, _ in found), found  # the scan sees Ray's processes
    beyond = [(name, addr) for name, addr in found if not is_loopback(addr[0])]
    assert {name for name, _ in beyond} == {
        "ray::ServeReplica:loraplex:LoraplexReplica", "ray::ServeReplica:loraplex:OpenAIIngress"}, beyond
    assert len(beyond) == 3 and all(addr[0] == "::" for _, addr in beyond), beyond  # one per replica
    for _, (_, port) in beyond:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_serve_config_file_is_valid_and_its_args_build(cluster):
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from server.ray_serve import build_app
    from server.ray_serve.ingress import OpenAIIngress
    from server.ray_serve.replica import LoraplexReplica

    path = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "server.ray_serve:build_app"
    assert {d.name for d in app.deployments} == {LoraplexReplica.name, OpenAIIngress.name}
    assert isinstance(build_app(app.args), Application)
