"""llama-server as a load-test system: its command line, our requests in its dialect, and the client options.

The client options (a concurrency bound, a body mapping) are checked against a tiny SSE server in a thread
that records every body and how many requests it held at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtests.client import ClientConfig, run_plan
from loadtests.llama_cpp.server import LlamaServerConfig, llama_body, slot_context, system_info
from loadtests.servers import LLAMA_CPP_SYSTEMS, SYSTEMS, ready_path, server_cmd
from loadtests.workload import WorkloadSpec, build_plan

CONFIG = LlamaServerConfig(
    binary=Path("/b/llama-server"),
    model=Path("/g/base-f32.gguf"),
    alias="SmolLM2-135M-Instruct",
    loras=(("lora-0", Path("/g/a0.gguf")), ("lora-1", Path("/g/a1.gguf"))),
    parallel=16,
    slot_ctx=512,
)


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_the_command_is_fair_and_serves_the_base_unless_asked():
    cmd = CONFIG.command(8123)
    assert cmd[0] == "/b/llama-server" and flag(cmd, "--model") == "/g/base-f32.gguf"
    assert flag(cmd, "--host") == "127.0.0.1" and flag(cmd, "--port") == "8123"
    assert flag(cmd, "--threads") == flag(cmd, "--threads-batch") == "2"
    assert flag(cmd, "--parallel") == "16" and flag(cmd, "--ctx-size") == str(16 * 512)
    assert "--cont-batching" in cmd and flag(cmd, "--alias") == "SmolLM2-135M-Instruct"
    assert cmd.count("--lora") == 1 and flag(cmd, "--lora") == "/g/a0.gguf,/g/a1.gguf"  # in id order
    assert "--lora-init-without-apply" in cmd
    assert CONFIG.lora_ids == {"lora-0": 0, "lora-1": 1}


def test_without_adapters_there_is_no_lora_flag():
    cmd = LlamaServerConfig(binary=Path("/b"), model=Path("/m"), alias="m").command(1)
    assert "--lora" not in cmd and "--lora-init-without-apply" not in cmd
    assert flag(cmd, "--parallel") == "1"


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="repeat"):
        LlamaServerConfig(binary=Path("/b"), model=Path("/m"), alias="m", loras=(("a", Path("1")), ("a", Path("2"))))
    with pytest.raises(ValueError, match=">= 1"):
        LlamaServerConfig(binary=Path("/b"), model=Path("/m"), alias="m", parallel=0)
    with pytest.raises(ValueError, match="comma"):
        LlamaServerConfig(binary=Path("/b"), model=Path("/m"), alias="m", loras=(("a", Path("/x,y.gguf")),))


def test_a_slot_holds_one_request_with_a_margin():
    assert slot_context(256, 128) == 512  # 256 + 128 + 64 = 448, rounded up
    assert slot_context(10, 10) == 256
    assert slot_context(256, 192) == 512 and slot_context(256, 193) == 768


def test_an_adapter_request_applies_only_its_adapter():
    body = {"model": "lora-1", "prompt": "p", "max_tokens": 5, "temperature": 0.0, "ignore_eos": True}
    got = llama_body(body, CONFIG.lora_ids, CONFIG.alias)
    assert got["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}] and got["model"] == CONFIG.alias
    assert got["max_tokens"] == 5 and got["ignore_eos"] is True and got["top_k"] == 1
    assert body["model"] == "lora-1"  # the caller's body is left alone
    assert "top_k" not in llama_body({"temperature": 0.7}, CONFIG.lora_ids, CONFIG.alias)
    with pytest.raises(KeyError, match="lora-9"):
        llama_body({"model": "lora-9"}, CONFIG.lora_ids, CONFIG.alias)


def test_a_base_request_sets_every_adapter_to_zero():
    """Without `lora` llama-server applies every --lora adapter at its start-up scale (1.0 in this build)."""
    for base in ({"model": ""}, {"model": CONFIG.alias}, {}):
        assert llama_body(base, CONFIG.lora_ids, CONFIG.alias)["lora"] == [
            {"id": 0, "scale": 0.0},
            {"id": 1, "scale": 0.0},
        ]
    assert "lora" not in llama_body({"model": "m"}, {}, "m")  # a server with no adapters
    with pytest.raises(KeyError, match="has none"):
        llama_body({"model": "lora-0"}, {}, "m")


def test_llama_systems_need_their_config_and_answer_health():
    assert set(LLAMA_CPP_SYSTEMS) == {"llama_cpp_f32", "llama_cpp_bf16", "llama_cpp_q8_0", "llama_cpp_q4_1"}
    assert server_cmd("llama_cpp_f32", Path("/s"), 9, llama=CONFIG) == CONFIG.command(9)
    with pytest.raises(ValueError, match="LlamaServerConfig"):
        server_cmd("llama_cpp_q4_1", Path("/s"), 9)
    assert ready_path("llama_cpp_bf16") == "/health"
    assert all(ready_path(s) == "/ready" for s in SYSTEMS)
    assert "llama_cpp_f32" not in SYSTEMS  # loadtests.compare starts systems from a store alone


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.in_flight = self.most = 0


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
            self.server.in_flight += 1
            self.server.most = max(self.server.most, self.server.in_flight)
        time.sleep(0.05)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        for _ in range(n):
            self.wfile.write(b'data: {"choices": [{"text": "x", "index": 0}]}\n\n')
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        with self.server.lock:
            self.server.in_flight -= 1


@pytest.fixture
def fake_server():
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_concurrency_bounds_requests_in_flight_and_bodies_are_mapped(fake_server):
    spec = WorkloadSpec(num_adapters=2, rate=float("inf"), num_requests=12, output_len=(4, 4), seed=3)
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    mapping = functools.partial(llama_body, lora_ids=CONFIG.lora_ids, alias=CONFIG.alias)
    cfg = ClientConfig(url=url, base_model=CONFIG.alias, concurrency=3, map_body=mapping)
    result = asyncio.run(run_plan(build_plan(spec), cfg, progress_stream=None))
    assert all(r.ok for r in result.records) and len(result.records) == 12
    assert fake_server.most <= 3
    assert all(r.output_tokens == 4 and r.prompt_tokens == 3 for r in result.records)
    applied = {e["id"] for b in fake_server.bodies for e in b["lora"] if e["scale"] == 1.0}
    assert applied == {0, 1} and all(b["model"] == CONFIG.alias for b in fake_server.bodies)


def test_without_a_bound_everything_is_sent_at_once(fake_server):
    spec = WorkloadSpec(num_adapters=0, base_share=1.0, rate=float("inf"), num_requests=6, output_len=(2, 2))
    cfg = ClientConfig(url=f"http://127.0.0.1:{fake_server.server_address[1]}")
    result = asyncio.run(run_plan(build_plan(spec), cfg, progress_stream=None))
    assert all(r.ok for r in result.records) and fake_server.most > 3


def test_a_body_the_mapping_refuses_is_not_sent(fake_server):
    spec = WorkloadSpec(num_adapters=1, adapter_prefix="missing-", rate=float("inf"), num_requests=2, output_len=(2, 2))
    mapping = functools.partial(llama_body, lora_ids={}, alias="m")
    cfg = ClientConfig(url=f"http://127.0.0.1:{fake_server.server_address[1]}", map_body=mapping)
    result = asyncio.run(run_plan(build_plan(spec), cfg, progress_stream=None))
    assert [r.error[:9] for r in result.records] == ["not sent:"] * 2 and not fake_server.bodies
    with pytest.raises(ValueError, match="concurrency"):
        ClientConfig(url="http://127.0.0.1:1", concurrency=0)


def test_the_build_line_is_read_from_a_short_start_and_the_server_stopped(tmp_path):
    fake = tmp_path / "llama-server"
    line = "I cmn common_param: system_info: n_threads = 2 | AVX2 = 1"
    fake.write_text(f'#!/bin/sh\necho "loading"\necho "{line}"\nexec sleep 30\n')
    fake.chmod(0o755)
    started = time.monotonic()
    assert system_info(fake, tmp_path / "m.gguf", 1) == "n_threads = 2 | AVX2 = 1"
    assert time.monotonic() - started < 10
    fake.write_text("#!/bin/sh\necho nothing\n")
    assert system_info(fake, tmp_path / "m.gguf", 1) is None
