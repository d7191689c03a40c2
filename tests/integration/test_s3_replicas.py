"""Two real server processes share one bucket on a real S3-compatible server (rclone serve s3, loopback).

An adapter uploaded through one is served by the other (same tokens as PEFT); a
re-upload or delete through one is honoured by the other within --store-refresh;
a server killed (-9) in the middle of sending an upload to the bucket leaves no
visible adapter anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.reference import greedy, peft_model
from tests.helpers.s3_server import running_s3
from tests.helpers.server_process import free_port, running_server
from tests.helpers.tiny_server import save_tiny_model_with_adapters
from tests.helpers.uploads import files_of

PROMPT = "the quick brown fox"
REFRESH = 0.5
STORE = "s3://adapters/shared"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model_dir, base, tok, adapters = save_tiny_model_with_adapters(root, {1: 1, 2: 2, 3: 3})
    with running_s3(root / "s3") as s3:
        yield root, model_dir, base, tok, adapters, s3


def server_args(world, name: str, endpoint: str | None = None) -> list[str]:
    root, model_dir, *_, s3 = world
    return [
        "--model", str(model_dir), "--adapter-store", STORE, "--s3-endpoint-url", endpoint or s3.endpoint,
        "--store-refresh", str(REFRESH), "--adapters-dir", str(root / f"{name}-cache"),
        "--cache-dir", str(root / "model-cache"), "--kv-cache-tokens", "1024",
    ]


def complete(base: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return httpx.post(base + "/v1/completions", json=body, timeout=60)


def expected(world, folder: Path) -> str:
    _, _, base, tok, *_ = world
    return tok.decode(greedy(peft_model(base, folder), tok(PROMPT)["input_ids"], 8, eos_token_id=None))


def upload(base: str, name: str, folder: Path) -> httpx.Response:
    return httpx.post(base + "/admin/adapters", data={"name": name}, files=files_of(folder), timeout=60)


def test_two_replicas_share_uploads_reuploads_and_deletes(world):
    root, *_, adapters, s3 = world
    with (
        running_server(server_args(world, "a"), root / "a.log", env=s3.env()) as a,
        running_server(server_args(world, "b"), root / "b.log", env=s3.env()) as b,
    ):
        assert complete(b, "sql").status_code == 404  # B looks first: nothing there yet
        r = upload(a, "sql", adapters[1])
        assert r.status_code == 201, r.text
        v1 = r.json()["version"]
        time.sleep(REFRESH)  # B's remembered miss expires
        got = complete(b, "sql")
        assert got.status_code == 200, got.text
        assert got.headers["x-loraplex-adapter"] == f"sql@{v1[:12]}"
        assert got.json()["choices"][0]["text"] == expected(world, adapters[1])
        assert "sql" in [m["id"] for m in httpx.get(b + "/v1/models").json()["data"]]

        pinned = httpx.post(b + "/admin/adapters/sql/load", json={"pin": True}, timeout=60).json()
        assert (pinned["pinned"], pinned["tier"]) == (True, "device")

        r = upload(a, "sql", adapters[2])  # re-upload through A: B follows
        assert r.status_code == 201, r.text
        v2 = r.json()["version"]
        assert v2 != v1
        seen = wait_for(lambda: complete(b, "sql").headers.get("x-loraplex-adapter") == f"sql@{v2[:12]}")
        assert seen <= REFRESH + 1.0
        assert complete(b, "sql").json()["choices"][0]["text"] == expected(world, adapters[2])
        info = lambda: httpx.get(b + "/admin/adapters/sql").json()  # noqa: E731
        wait_for(lambda: (info()["version"], info()["pinned"], info()["tier"]) == (v2, True, "device"))  # pin moved

        assert httpx.delete(a + "/admin/adapters/sql", timeout=60).status_code == 200  # delete through A
        seen = wait_for(lambda: complete(b, "sql").status_code == 404)
        assert seen <= REFRESH + 1.0
        r = complete(b, "sql")
        assert r.json()["error"]["code"] == "adapter_not_found"
        wait_for(lambda: "sql" not in [m["id"] for m in httpx.get(b + "/v1/models").json()["data"]])
        # B retired both versions it had loaded from its host tier (A's changes, noticed on use)
        wait_for(lambda: evictions(b, "host", "replaced") == 1 and evictions(b, "host", "delete") == 1)
        log = (root / "b.log").read_text()
        assert f"sql@{v1[:12]} changed in the store (now sql@{v2[:12]})" in log
        assert f"sql@{v2[:12]} changed in the store (now deleted)" in log


def evictions(base: str, tier: str, reason: str) -> float:
    text = httpx.get(base + "/metrics").text
    m = re.search(rf'^loraplex_adapter_evictions_total{{reason="{reason}",tier="{tier}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_kill_9_while_sending_an_upload_to_the_bucket_leaves_nothing_visible(world):
    root, *_, adapters, s3 = world
    with StallingProxy(s3.endpoint) as proxy:
        with running_server(server_args(world, "c", proxy.endpoint), root / "c.log", env=s3.env()) as c:
            sender = threading.Thread(target=lambda: _quietly(upload, c, "half", adapters[3]), daemon=True)
            sender.start()
            assert proxy.stalled.wait(60), "the upload never reached the bucket"
            os.kill(c.pid, signal.SIGKILL)
            sender.join(30)
        assert proxy.stalled_on.endswith("/adapter_model.safetensors")
    bucket = s3.root / "adapters" / "shared"
    version = proxy.stalled_on.split("/")[-2]
    assert (bucket / "objects" / version / "adapter_config.json").exists()  # the upload was under way
    weights = bucket / "objects" / version / "adapter_model.safetensors"
    assert not weights.exists() or weights.stat().st_size < (adapters[3] / "adapter_model.safetensors").stat().st_size
    assert not (bucket / "adapters" / "half.json").exists()
    with running_server(server_args(world, "d"), root / "d.log", env=s3.env()) as d:
        assert complete(d, "half").status_code == 404
        assert "half" not in [m["id"] for m in httpx.get(d + "/v1/models").json()["data"]]
        # the adapter itself is fine: the same upload through a live server works
        assert upload(d, "half", adapters[3]).status_code == 201
        assert complete(d, "half").json()["choices"][0]["text"] == expected(world, adapters[3])
        assert httpx.delete(d + "/admin/adapters/half", timeout=60).status_code == 200


def wait_for(done, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not seen within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _quietly(fn, *args):
    with contextlib.suppress(httpx.HTTPError):
        fn(*args)


class StallingProxy:
    """A loopback TCP proxy to the S3 server that forwards everything until the first request that uploads
    an adapter's weights; it forwards that request's head and first bytes, then holds the rest forever."""

    TRIGGER = re.compile(rb"PUT (/\S*/objects/[0-9a-f]{64}/adapter_model\.safetensors)")

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.stalled = threading.Event()
        self.stalled_on = ""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closing = False

    def __enter__(self) -> StallingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if watch and not self.stalled.is_set() and (m := self.TRIGGER.search(chunk)):
                    dst.sendall(chunk[: m.end() + 4096])
                    self.stalled_on = m.group(1).decode()
                    self.stalled.set()
                    while not self._closing:
                        time.sleep(0.1)
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
