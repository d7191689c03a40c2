"""Limits and shutdown: disconnect abort, the bounded queue (429), request timeouts, SIGTERM drain.

Two kinds of server. In-process: the app on uvicorn in a thread, so the engine,
scheduler, adapter cache, registry and admission counters can be inspected
directly; a throttle wrapped around the model runner gives every step a minimum
duration (so a long request is long on any machine) and a gate that can hold
the engine still (so "nothing finishes meanwhile" is certain, not a race).
Real ``loraplex serve`` subprocesses: disconnect abort seen through the admin
API, and SIGTERM with requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.cli import listening_socket
from server.config import CacheConfig, Config, LimitsConfig, LoraConfig, ModelConfig
from server.engine.builder import build_serving_in_fresh_thread
from server.engine.scheduler import SchedulerConfig
from server.model.loading import LoadedModel
from tests.helpers.server_process import free_port, running_server, wait_until_up
from tests.helpers.tiny import AdapterSpec, make_adapter, make_model, make_tokenizer
from tests.helpers.tiny_server import save_tiny_model

ADAPTER = "a"
SPEC = AdapterSpec(ADAPTER, 8, 16, ("q_proj", "v_proj", "down_proj"))
OTHER = AdapterSpec("b", 4, 8, ("q_proj", "o_proj"))  # the companion's, in the real-server disconnect test
PROMPT = "the quick brown fox jumps over the lazy dog"
CONTEXT = 512  # the tiny model's max_position_embeddings
KERNELS = ModelConfig().cache_dir  # the user's kernel cache: building the C kernels again costs seconds
STEP_S = 0.005  # the throttle's minimum step: a full-context request takes >= 2.5 s in-process
RELEASED_WITHIN_S = 1.5  # after a disconnect or timeout, everything is free again within this
LAYERS = 8  # of the model the server processes serve: deep enough that a full-context request takes a while


# -- in-process server ------------------------------------------------------------------------------------


class Throttle:
    """Wraps ``runner.execute``: each step waits for ``gate`` (held open by default), then sleeps ``STEP_S``."""

    def __init__(self, runner) -> None:
        self.inner = runner.execute
        self.gate = threading.Event()
        self.gate.set()
        runner.execute = self

    def __call__(self, seqs):
        self.gate.wait(30)
        time.sleep(STEP_S)
        return self.inner(seqs)


@dataclass
class InProcess:
    url: str
    port: int
    state: object  # server.api.state.AppState
    throttle: Throttle

    @property
    def engine(self):
        return self.state.serving.engine

    def snapshot(self) -> dict[str, int]:
        """What a request holds while it lives; all zero when the server is idle."""
        sched = self.engine.scheduler
        return {
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "kv_blocks": sched.blocks.used_blocks,
            "slots_in_use": sched.residency.slots_in_use(sched.busy_slots()),
            "leases": sched.residency.snapshot({}).in_flight(ADAPTER),
            "admitted": self.state.admission.in_flight,
        }

    def wait_idle(self, within: float = RELEASED_WITHIN_S) -> float:
        """Seconds until everything was released; fails naming what was still held."""
        start = time.monotonic()
        while any(self.snapshot().values()):
            assert time.monotonic() - start < within, f"not released within {within} s: {self.snapshot()}"
            time.sleep(0.005)
        return time.monotonic() - start


@contextmanager
def in_process(model, tok, store: Path, limits: LimitsConfig, max_num_seqs: int = 64) -> Iterator[InProcess]:
    config = Config(
        model=ModelConfig(cache_dir=KERNELS),
        lora=LoraConfig(adapters_dir=store, max_lora_rank=16, max_loras=4),
        cache=CacheConfig(kv_cache_tokens=8192),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
        limits=limits,
    )
    loaded = LoadedModel(hf_model=model, tokenizer=tok, name="tiny", source=store)
    app = create_app(lambda: build_serving_in_fresh_thread(config, loaded))
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    throttle = None
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "the in-process server failed to start"
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.02)
        state = app.state.loraplex
        throttle = Throttle(state.serving.engine.runner)
        yield InProcess(f"http://127.0.0.1:{port}", port, state, throttle)
    finally:
        if throttle is not None:
            throttle.gate.set()
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = make_tokenizer()
    model = make_model("llama", len(tok), seed=5)
    store = tmp_path_factory.mktemp("inproc-store")
    make_adapter(model, SPEC, store, seed=1)
    return model, tok, store


@pytest.fixture(scope="module")
def srv(tiny) -> Iterator[InProcess]:
    with in_process(*tiny, LimitsConfig()) as s:
        yield s


def _long(tok, **extra) -> dict:
    """A request that runs to the end of the context unless something stops it."""
    n = CONTEXT - len(tok(PROMPT)["input_ids"])
    return {"model": ADAPTER, "prompt": PROMPT, "max_tokens": n, "ignore_eos": True, "temperature": 0, **extra}


def _raw_post(port: int, body: dict) -> socket.socket:
    """A completion request on a plain socket, so the test decides exactly when the connection goes."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {got[-500:]!r}"
        got += chunk
    return got


def _wait_for(condition, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- disconnect -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_disconnect_aborts_and_frees_everything_in_process(srv, tiny, stream):
    _, tok, _ = tiny
    srv.wait_idle()
    body = _long(tok, stream=stream)
    steps_before = srv.engine.steps
    sock = _raw_post(srv.port, body)
    try:
        if stream:
            head = _read_until(sock, b"data: ")
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
        else:
            _wait_for(lambda: srv.engine.steps - steps_before >= 3, 10, "the request to run")
            time.sleep(0.05)
        assert srv.snapshot()["running"] == 1, srv.snapshot()
    finally:
        sock.close()
    released = srv.wait_idle()
    ran = srv.engine.steps - steps_before
    # To its end, the request needs one step per token; aborted, it stops within a few steps of the close.
    assert ran < body["max_tokens"] // 4, f"{ran} steps of {body['max_tokens']}: the abort came late"
    assert released < RELEASED_WITHIN_S
    # The server is unharmed: the next request runs to its end.
    r = httpx.post(srv.url + "/v1/completions", json={**body, "max_tokens": 5, "stream": False}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
    srv.wait_idle()


# -- request timeout ------------------------------------------------------------------------------------


def _assert_timeout_error(payload: dict, seconds: str) -> None:
    error = payload["error"]
    assert error["code"] == "request_timeout", error
    assert error["type"] == "timeout_error", error
    assert f"within its timeout of {seconds} s" in error["message"], error


def test_timeout_non_streaming_is_504_and_frees_everything(srv, tiny):
    _, tok, _ = tiny
    srv.wait_idle()
    steps_before = srv.engine.steps
    started = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", json=_long(tok, timeout=0.05), timeout=30)
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    _assert_timeout_error(r.json(), "0.05")
    assert r.headers["x-should-retry"] == "false"  # openai clients retry a 5xx otherwise: it would time out again
    assert elapsed < 2.0  # the whole request needs >= 2.5 s
    srv.wait_idle()
    assert srv.engine.steps - steps_before < 200


def _sse_events(lines: Iterator[str]) -> Iterator[str]:
    return (line[6:] for line in lines if line.startswith("data: "))


def test_timeout_mid_stream_is_an_error_event_then_done(srv, tiny):
    _, tok, _ = tiny
    srv.wait_idle()
    events: list[str] = []
    try:
        # 3 s: room for the first token on a loaded machine; after it the gate holds the engine, so the end is certain
        with httpx.stream("POST", srv.url + "/v1/completions", json=_long(tok, stream=True, timeout=3.0),
                          timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    srv.throttle.gate.clear()  # after the first chunk nothing more runs: the timeout must end it
    finally:
        srv.throttle.gate.set()
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])
    _assert_timeout_error(error, "3")
    chunks = [json.loads(e) for e in events[:-2]]
    assert chunks and all("choices" in c for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    srv.wait_idle()


def test_stream_timing_out_before_its_first_token_is_a_plain_504(srv, tiny):
    _, tok, _ = tiny
    srv.wait_idle()
    srv.throttle.gate.clear()  # the engine holds still: no token can come before the timeout
    try:
        r = httpx.post(srv.url + "/v1/completions", json=_long(tok, stream=True, timeout=0.05), timeout=30)
    finally:
        srv.throttle.gate.set()
    assert r.status_code == 504, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-should-retry"] == "false"
    _assert_timeout_error(r.json(), "0.05")
    srv.wait_idle()


def test_server_request_timeout_caps_a_longer_body_timeout(tiny):
    _, tok, _ = tiny
    with in_process(*tiny, LimitsConfig(request_timeout=0.3)) as s:
        s.throttle.gate.clear()
        try:
            for given, applied in ((60, "0.3"), (None, "0.3"), (0.1, "0.1")):
                body = _long(tok) if given is None else _long(tok, timeout=given)
                started = time.monotonic()
                r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
                assert r.status_code == 504, r.text
                _assert_timeout_error(r.json(), applied)
                assert time.monotonic() - started < 2.5
        finally:
            s.throttle.gate.set()
        s.wait_idle()


# -- shutdown -------------------------------------------------------------------------------------------


def test_requests_the_stopped_engine_never_runs_are_503_and_release_everything(tiny):
    """The engine stops (as the lifespan's shutdown does) while the HTTP side still answers: the request it was
    running is aborted with 503 (the server's state, not the request's fault: not 400), and a request sent
    afterwards is refused at once with 503 and Retry-After instead of waiting for an engine that is gone. Their
    admission and adapter leases are given back. Then, with admission closed, 503 with Retry-After too."""
    _, tok, _ = tiny
    with in_process(*tiny, LimitsConfig()) as s:
        running = _start(s.url, _long(tok, timeout=20))
        _wait_for(lambda: s.snapshot()["running"] == 1 and s.engine.steps >= 3, 20, "the request to run")
        s.engine.stop()
        assert running.ended.wait(20) and running.failure is None, running.failure
        assert running.status == 503, (running.status, running.body)
        assert "shutting down" in running.body["error"]["message"], running.body
        s.wait_idle()

        started = time.monotonic()
        # its own timeout (5 s) only bounds the test: the refusal must come at once, not as a 504
        late = httpx.post(s.url + "/v1/completions", json=_long(tok, max_tokens=5, timeout=5), timeout=30)
        assert late.status_code == 503, late.text
        assert late.headers["retry-after"] and "shutting down" in late.json()["error"]["message"]
        assert time.monotonic() - started < 4
        stream = httpx.post(s.url + "/v1/completions", json=_long(tok, max_tokens=5, timeout=5, stream=True),
                            timeout=30)
        assert stream.status_code == 503 and stream.headers["retry-after"], stream.text
        s.wait_idle()  # admission and leases of the refused requests given back
        assert s.state.admission.in_flight == 0 and s.snapshot()["leases"] == 0

        s.state.admission.closed = True  # what the lifespan's shutdown sets first
        closed = httpx.post(s.url + "/v1/completions", json=_long(tok, max_tokens=5), timeout=30)
        assert closed.status_code == 503, closed.text
        assert closed.json()["error"]["code"] == "shutting_down" and closed.headers["retry-after"] == "1"


# -- the bounded queue ----------------------------------------------------------------------------------


def test_flood_gets_429_with_retry_after_and_the_accepted_complete(tiny):
    flood, accepted, max_tokens = 12, 4, 16  # --max-num-seqs 2 + --max-queued-requests 2
    body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    with in_process(*tiny, LimitsConfig(max_queued_requests=2), max_num_seqs=2) as s:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60,
                                         limits=httpx.Limits(max_connections=flood)) as client:
                tasks = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(flood)]
                # The engine holds still, so none of the accepted can finish and make room: the 429s are exact.
                deadline = time.monotonic() + 20
                while sum(t.done() for t in tasks) < flood - accepted and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert s.state.admission.in_flight == accepted, s.snapshot()
                s.throttle.gate.set()
                return await asyncio.gather(*tasks)

        s.throttle.gate.clear()
        try:
            responses = asyncio.run(run())
        finally:
            s.throttle.gate.set()
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * accepted + [429] * (flood - accepted), statuses
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                error = r.json()["error"]
                assert error["code"] == "server_overloaded" and error["type"] == "rate_limit_error", error
                assert "--max-queued-requests 2" in error["message"]
            else:
                choice = r.json()["choices"][0]
                assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == max_tokens
        s.wait_idle()
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        s.wait_idle()
        assert s.state.admission.in_flight == 0


# -- real server processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model on disk (``LAYERS`` deep), with one adapter in a store beside it."""
    root = tmp_path_factory.mktemp("served")
    folder, model, tok = save_tiny_model(root / "model", layers=LAYERS)
    store = root / "store"
    store.mkdir()
    make_adapter(model, SPEC, store, seed=2)
    make_adapter(model, OTHER, store, seed=3)
    return folder, store, tok, root


def _serve_args(saved, *extra: str) -> list[str]:
    folder, store, _, _ = saved
    return ["--model", str(folder), "--adapters-dir", str(store), "--kv-cache-tokens", "8192", *extra]


# One OpenMP thread per server process: on 2 shared cores a spinning OpenMP team makes step times erratic
# (seconds), while one thread keeps them steady. The tests check behaviour, not speed.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


@dataclass
class Call:
    """One completion request run on its own thread, streaming or not."""

    status: int | None = None
    events: list[dict] = field(default_factory=list)  # SSE chunks (streaming)
    body: dict | None = None  # the JSON body (non-streaming)
    saw_done: bool = False
    failure: BaseException | None = None
    first: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def finish_reason(self) -> str | None:
        chunks = self.events if self.events else [self.body or {}]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        return reasons[-1] if reasons else None

    @property
    def completion_tokens(self) -> int | None:
        usage = [c["usage"] for c in (self.events or [self.body or {}]) if c.get("usage")]
        return usage[-1]["completion_tokens"] if usage else None


def _start(url: str, body: dict) -> Call:
    call = Call()

    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=httpx.Timeout(120, connect=5)) as r:
                call.status = r.status_code
                if not body.get("stream"):
                    call.first.set()
                    call.body = json.loads(r.read())
                    return
                for data in _sse_events(r.iter_lines()):
                    if data == "[DONE]":
                        call.saw_done = True
                    else:
                        call.events.append(json.loads(data))
                    call.first.set()
        except BaseException as exc:  # the stream cut short is what some tests expect
            call.failure = exc
        finally:
            call.first.set()
            call.ended.set()

    threading.Thread(target=run, daemon=True).start()
    return call


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _admin_in_flight(url: str, name: str = ADAPTER) -> int:
    return httpx.get(f"{url}/admin/adapters/{name}", timeout=10).json()["in_flight"]


@pytest.fixture(scope="module")
def real(saved):
    *_, root = saved
    with pytest.MonkeyPatch.context() as mp:
        for k, v in SERVER_ENV.items():
            mp.setenv(k, v)  # running_server passes its environment on
        with running_server(_serve_args(saved), root / "disconnect.log") as url:
            yield url


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_disconnect_aborts_on_a_real_server(real, saved, stream):
    tok = saved[2]
    port = _port_of(real)
    _wait_for(lambda: _admin_in_flight(real) + _admin_in_flight(real, OTHER.name) == 0, 30, "an idle server")
    # A companion of the same length on the other adapter starts first and runs in the same batches: the
    # request that disconnects lags it, so if that one is released while the companion still runs, it cannot
    # have run to its end. The admin API tells the two apart by adapter.
    companion = _raw_post(port, _long(tok, model=OTHER.name, stream=True))
    try:
        assert _read_until(companion, b"data: ").startswith(b"HTTP/1.1 200")
        sock = _raw_post(port, _long(tok, stream=stream))
        try:
            if stream:
                assert _read_until(sock, b"data: ").startswith(b"HTTP/1.1 200")
            else:
                _wait_for(lambda: _admin_in_flight(real) == 1, 10, "the request to be admitted")
                time.sleep(0.05)
        finally:
            sock.close()
        _wait_for(lambda: _admin_in_flight(real) == 0, 5, "the disconnected request to be released")
        assert _admin_in_flight(real, OTHER.name) == 1, "the companion ended first: the abort came late"
    finally:
        companion.close()
    _wait_for(lambda: _admin_in_flight(real, OTHER.name) == 0, 5, "the companion to be released")
    listing = httpx.get(real + "/admin/adapters", timeout=10).json()
    assert listing["slots_in_use"] == 0, listing
    assert {a["name"]: a["in_flight"] for a in listing["data"]} == {ADAPTER: 0, OTHER.name: 0}
    # The server is unharmed: a request runs to its end.
    r = httpx.post(real + "/v1/completions", json=_long(tok, max_tokens=5), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text


@contextmanager
def spawned(args: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Like ``running_server``, but hands out the process so a test can signal it and read its exit code."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | SERVER_ENV
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_up(proc, url + "/ready", log_path, 120)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(saved):
    tok, root = saved[2], saved[3]
    log_path = root / "sigterm.log"
    with spawned(_serve_args(saved), log_path) as (url, proc):
        n = 300
        streams = [_start(url, _long(tok, max_tokens=n, stream=True, stream_options={"include_usage": True}))
                   for _ in range(3)]
        plain = _start(url, _long(tok, max_tokens=n))
        for call in streams:
            assert call.first.wait(60) and call.status == 200, call.failure
            assert call.events, call.failure
        _wait_for(lambda: _admin_in_flight(url) == 4, 10, "all four requests in flight")
        os.kill(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        _wait_for(lambda: _refused(_port_of(url)), 5, "new connections to be refused")
        unfinished = sum(not c.ended.is_set() for c in [*streams, plain])
        assert unfinished, "every request ended before new connections were refused: nothing was drained"
        for call in [*streams, plain]:
            assert call.ended.wait(120)
            assert call.failure is None, call.failure
            assert call.status == 200
            assert call.finish_reason == "length" and call.completion_tokens == n
        assert all(c.saw_done for c in streams)
        drained = time.monotonic()
        code = proc.wait(15)
        exited = time.monotonic()
    assert code == 0, f"exit status {code}:\n{log_path.read_text()[-3000:]}"
    assert exited - drained < 10, f"exit took {exited - drained:.1f} s after the last request ended"
    assert drained - signalled < 60


def test_sigterm_past_the_shutdown_timeout_ends_streams_and_exits_0(saved):
    tok, root = saved[2], saved[3]
    log_path = root / "sigterm-timeout.log"
    with spawned(_serve_args(saved, "--shutdown-timeout", "0.5"), log_path) as (url, proc):
        streams = [_start(url, _long(tok, stream=True)) for _ in range(8)]
        for call in streams:
            assert call.first.wait(60) and call.status == 200, call.failure
        os.kill(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(20)
        exited = time.monotonic()
        for call in streams:
            assert call.ended.wait(10), "a stream still hangs after the server exited"
    assert code == 0, f"exit status {code}:\n{log_path.read_text()[-3000:]}"
    assert exited - signalled < 8, f"exit took {exited - signalled:.1f} s with --shutdown-timeout 0.5"
    cut = [c for c in streams if not c.saw_done]
    assert cut, "every stream finished within 0.5 s: the shutdown timeout was not exercised"
    for call in cut:  # cut off: no end of stream, and no normal finish either
        assert call.finish_reason != "length", call.events[-1:]
