"""``loraplex serve --lora-modules`` end to end: a real server process on a tiny model with PEFT adapters made here.

The adapters are validated and stored at start-up and served like uploads; one
that cannot be served stops the start-up (exit 1) with a message naming it.
The start-up line says where the server listens and what it serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.native import cpu_isa
from tests.helpers.reference import greedy, peft_model
from tests.helpers.server_process import free_port, running_server
from tests.helpers.tiny_server import save_tiny_model_with_adapters
from tests.helpers.uploads import folder_members, tar_gz

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-modules")
    model_dir, base, tok, adapters = save_tiny_model_with_adapters(root, {"sql": 1, "chat": 2})
    archive = root / "chat.tar.gz"
    archive.write_bytes(tar_gz(folder_members(adapters["chat"], "chat/")))
    return root, model_dir, base, tok, adapters, archive


@pytest.fixture(scope="module")
def server(world):
    root, model_dir, _, _, adapters, archive = world
    store = root / "store"
    modules = [f"sql={adapters['sql']}", json.dumps({"name": "chat", "path": str(archive), "base_model_name": "tiny"})]
    log = root / "server.log"
    with running_server(["--model", str(model_dir), "--adapters-dir", str(store), "--lora-modules", *modules],
                        log) as url:
        yield url, log, store


def test_lora_modules_are_stored_and_served_like_uploads(world, server):
    _, _, base, tok, adapters, _ = world
    url, _, store = server
    listed = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert listed == ["tiny", "chat", "sql"]
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["chat", "sql"]
    for name in ("sql", "chat"):
        expected = greedy(peft_model(base, adapters[name]), tok(PROMPT)["input_ids"], 6, eos_token_id=0)
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": name, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
        assert r.headers["x-loraplex-adapter"].startswith(f"{name}@")
    info = httpx.get(url + "/admin/adapters/sql").json()
    assert info["rank"] == 8 and info["state"] != "invalid"


def test_the_start_up_line_says_where_and_what(server):
    url, log, store = server
    lines = [line for line in log.read_text().splitlines() if "ready: listening on" in line]
    assert len(lines) == 1, log.read_text()[-3000:]
    line = lines[0]
    for fact in (f"listening on {url},", "model tiny (float32 on cpu)", f"CPU ISA {cpu_isa()},",
                 f"adapter store {store}"):
        assert fact in line, (fact, line)


def _start(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()),
           "--adapters-dir", str(tmp_path / "store"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    ("module", "extra", "fragment"),
    [
        ("sql={sql}", ["--max-lora-rank", "4"], "rank 8"),
        ('{{"name": "sql", "path": "{sql}", "base_model_name": "Llama-3-8B"}}', [],
         "base_model_name 'Llama-3-8B' is not the served base model 'tiny'"),
        ("sql={weights}", [], "give a PEFT folder, or a .tar.gz, .tgz, .zip archive of one"),
    ],
    ids=["rank-over-the-limit", "another-base-model", "a-single-file-that-is-not-an-archive"],
)
def test_a_module_that_cannot_be_served_stops_the_start_naming_it(world, tmp_path, module, extra, fragment):
    _, model_dir, _, _, adapters, _ = world
    entry = module.format(sql=adapters["sql"], weights=adapters["sql"] / "adapter_model.safetensors")
    done = _start(["--model", str(model_dir), "--lora-modules", entry, *extra], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    failed = [line for line in done.stderr.splitlines() if "start-up failed: --lora-modules sql=" in line]
    assert failed and fragment in failed[0], done.stderr[-3000:]
    assert "ready: listening" not in done.stderr
    assert not (tmp_path / "store" / "sql").exists()  # nothing stored
