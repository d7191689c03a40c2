"""The real server refuses to start with a KV cache smaller than one request of the context, naming the flags."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.server_process import free_port
from tests.helpers.tiny_server import save_tiny_model


def test_a_kv_cache_too_small_for_the_context_stops_the_start_naming_the_flags(tmp_path):
    model_dir, _, _ = save_tiny_model(tmp_path / "tiny")  # a context of 512 tokens
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--model", str(model_dir),
           "--adapters-dir", str(tmp_path / "store"), "--kv-cache-tokens", "256"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    failed = [line for line in done.stderr.splitlines() if "start-up failed: " in line]
    assert failed, done.stderr[-3000:]
    assert "--kv-cache-tokens 256 is too small for one request of the model's context (512 tokens)" in failed[0]
    assert "--max-model-len" in failed[0]
    assert "Traceback" not in done.stderr and "ready: listening" not in done.stderr
