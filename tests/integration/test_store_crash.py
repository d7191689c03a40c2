"""kill -9 in the middle of uploads leaves the old state or the new one, and start-up cleans the rest.

Two levels: a process writing through the store directly (many kills at
random moments), and the real server killed while an HTTP upload is in flight,
then restarted on the same store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters_store.backend import content_digest
from adapters_store.local import LocalAdapterStore
from tests.helpers.server_process import running_server
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer
from tests.helpers.uploads import files_of

WRITER = r"""
import sys
from pathlib import Path
from adapters_store.local import LocalAdapterStore

root, size = Path(sys.argv[1]), int(sys.argv[2])
store = LocalAdapterStore(root)
for i in range(1_000_000):
    with store.staging() as staged:
        (staged / "adapter_config.json").write_text('{"peft_type": "LORA", "n": %d}' % i)
        with (staged / "adapter_model.safetensors").open("wb") as f:
            for _ in range(size >> 20):
                f.write(bytes([i % 251]) * (1 << 20))
        store.put("victim", staged)
    print(i, flush=True)
"""


def _content_ok(folder: Path, size: int) -> bool:
    """The files are one complete write of the writer: config number i, weights all bytes i % 251."""
    import json

    i = json.loads((folder / "adapter_config.json").read_text())["n"]
    data = (folder / "adapter_model.safetensors").read_bytes()
    return len(data) == size and data == bytes([i % 251]) * size


def _assert_clean(root: Path) -> None:
    store = LocalAdapterStore(root)
    linked = {os.readlink(p).split("/")[-1] for p in root.iterdir() if p.is_symlink()}
    objects = set(os.listdir(root / ".objects")) if (root / ".objects").exists() else set()
    assert objects == linked
    assert os.listdir(root / ".staging") == []
    assert not (root / ".trash").exists() or os.listdir(root / ".trash") == []
    for name in store.names():
        adapter = store.get(name)
        assert content_digest(adapter.path) == adapter.version


def test_kill_during_store_writes_is_always_old_or_new(tmp_path):
    root, size = tmp_path / "store", 24 << 20
    store = LocalAdapterStore(root)
    store.recover()
    stable = tmp_path / "stable"
    stable.mkdir()
    (stable / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (stable / "adapter_model.safetensors").write_bytes(b"stable")
    with store.staging() as staged:
        for f in stable.iterdir():
            (staged / f.name).write_bytes(f.read_bytes())
        stable_version = store.put("stable", staged).adapter.version
    rng = random.Random(7)
    leftovers_seen = 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for _ in range(10):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(size)], stdout=subprocess.PIPE, env=env, text=True
        )
        time.sleep(rng.uniform(0.15, 0.9))
        child.send_signal(signal.SIGKILL)
        child.wait()
        report = LocalAdapterStore(root).recover()
        leftovers_seen += bool(report)
        _assert_clean(root)
        store = LocalAdapterStore(root)
        assert store.get("stable").version == stable_version
        if "victim" in store.names():
            assert _content_ok(store.get("victim").path, size)
    assert leftovers_seen >= 3, "the kills never landed mid-write: the test proved nothing"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    tok = make_tokenizer()
    base = make_model("llama", len(tok), seed=3)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    base.save_pretrained(folder)
    tok.save_pretrained(folder)
    adapter = make_adapter(base, AdapterSpec("a", 8, 16, ("q_proj", "v_proj")), tmp_path_factory.mktemp("src"), 1)
    return folder, adapter


def test_server_killed_during_an_http_upload_recovers(tiny_model_dir, tmp_path):
    model, adapter = tiny_model_dir
    store_dir = tmp_path / "store"
    args = [
        "--model",
        str(model),
        "--adapters-dir",
        str(store_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--kv-cache-tokens",
        "1024",
        "--max-upload-size",
        "200M",
    ]
    # A large but valid upload: the real adapter plus a big README, which is accepted and ignored.
    parts = [*files_of(adapter), ("files", ("README.md", b"x" * (120 << 20)))]
    rng = random.Random(3)
    for attempt in range(2):
        log = tmp_path / f"server-{attempt}.log"
        with running_server(args, log) as base:
            sender = threading.Thread(target=_upload, args=(base, parts), daemon=True)
            sender.start()
            if attempt == 0:  # while the body is still arriving
                time.sleep(rng.uniform(0.05, 0.4))
            else:  # as soon as the upload is being assembled in the store
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not any(
                    p.suffix != ".lock" for p in (store_dir / ".staging").iterdir()
                ):
                    time.sleep(0.001)
            os.kill(base.pid, signal.SIGKILL)
            sender.join(30)
        with running_server(args, tmp_path / f"server-{attempt}-after.log") as base:
            names = httpx.get(base + "/admin/adapters").json()["data"]
            assert [a["name"] for a in names] in ([], ["new"])
            if names:
                r = httpx.post(base + "/v1/completions", json={"model": "new", "prompt": "a b", "max_tokens": 2})
                assert r.status_code == 200, r.text
            _assert_clean(store_dir)
            if attempt == 1 and not names:  # killed mid-assembly: start-up must have said what it cleaned
                assert "removed an unfinished upload" in (tmp_path / f"server-{attempt}-after.log").read_text()
            httpx.delete(base + "/admin/adapters/new", timeout=30)


def _upload(base: str, parts) -> int:
    try:
        return httpx.post(base + "/admin/adapters", data={"name": "new"}, files=parts, timeout=60).status_code
    except httpx.HTTPError:
        return -1
