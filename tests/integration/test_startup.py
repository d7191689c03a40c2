"""Background start-up (as ``loraplex serve`` runs it): the server answers while the model loads.

``/health`` is 200 at once; ``/ready`` and the API routes are 503 (OpenAI error body) until the
model is loaded; a load that fails is handed to the failure callback.
"""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from server.api.app import create_app
from tests.helpers import engine as eng
from tests.helpers.tiny import make_model, make_tokenizer


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_routes_answer_503_while_the_model_loads_then_serve(tmp_path):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=3)
    release = threading.Event()

    def slow_build():
        assert release.wait(60)
        return eng.build(base, tok, tmp_path / "store", tmp_path / "cache", kv_tokens=1024)

    failures: list[BaseException] = []
    app = create_app(slow_build, on_startup_failure=failures.append)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        for method, path, body in (
            ("GET", "/ready", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"model": "", "prompt": "hello", "max_tokens": 2}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("GET", "/admin/adapters", None),
        ):
            r = client.request(method, path, json=body)
            assert r.status_code == 503, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "not_ready" and error["message"], path
        release.set()
        _wait(lambda: client.get("/ready").status_code == 200)
        r = client.post("/v1/completions", json={"model": "", "prompt": "hello", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert failures == []


def test_a_failed_load_is_reported_and_the_server_never_becomes_ready(tmp_path):
    failures: list[BaseException] = []

    def broken_build():
        raise RuntimeError("no such model")

    app = create_app(broken_build, on_startup_failure=failures.append)
    with TestClient(app) as client:
        _wait(lambda: bool(failures))
        assert "no such model" in str(failures[0])
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503
