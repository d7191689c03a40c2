"""An open-loop driver: sends each planned request at its time over SSE and records what each one saw.

Open loop: a request is sent at its planned time whether or not earlier ones have finished, so a slow server
meets a growing queue instead of a politely waiting client. Every request streams (``stream: true`` with
``stream_options.include_usage``), so time to first token and the gap before each later text chunk are measured
at the client. Only loopback URLs are accepted: this is a load generator, not a tool to point at other machines.

Two options serve other servers and closed-loop runs: ``concurrency`` bounds the requests in flight (a later one
is sent when an earlier one ends, so an infinite rate with ``concurrency`` N is N clients each waiting for its
answer), and ``map_body`` rewrites each request body into another server's dialect (llama-server's adapter field).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit

import httpx

from loadtests.workload import PlannedRequest


def check_loopback(url: str) -> None:
    """Raise ValueError unless ``url`` is http(s) to localhost or a loopback address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http:// or https:// URLs")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{url!r}: the load generator only drives loopback servers (127.0.0.0/8, ::1, localhost)")


@dataclass
class RequestRecord:
    """What the client saw of one request. Times in seconds; ``sent`` is relative to the start of the run."""

    index: int
    adapter: str | None
    cold: bool
    max_tokens: int
    sent: float | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)  # gap before each text chunk after the first
    e2el: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None  # from the usage chunk; the count of text chunks when there is none
    status: int | None = None
    error: str | None = None

    @property
    def adapter_kind(self) -> str:
        return "base" if self.adapter is None else "adapter"

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2el is not None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as vLLM's benchmark defines it."""
        if not self.ok or self.ttft is None or not self.output_tokens or self.output_tokens < 2:
            return None
        assert self.e2el is not None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


@dataclass
class RunResult:
    records: list[RequestRecord]  # the requests sent, in plan order
    duration: float  # from the first send to the end of the last request (or the drain timeout)
    issued: int  # requests sent; fewer than planned when the time bound stopped the run


@dataclass(frozen=True)
class ClientConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000
    base_model: str = ""  # `model` for base-only requests ("" = no adapter)
    max_duration: float | None = None  # stop issuing after this many seconds of wall time
    drain_timeout: float = 120.0  # after the last send, wait this long for in-flight requests, then abort them
    request_timeout: float = 600.0  # httpx read timeout for one request
    ignore_eos: bool = True  # generate exactly max_tokens, as vLLM's benchmark does
    temperature: float = 0.0
    concurrency: int | None = None  # at most this many requests in flight; None = no bound (open loop)
    map_body: Callable[[dict], dict] | None = None  # the body as the server under test takes it

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")


class Progress:
    """A one-line progress bar on stderr (no dependency): completed, failed, in flight."""

    def __init__(self, total: int, stream: TextIO | None = sys.stderr, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.completed = self.failed = self.in_flight = 0
        self._start = time.monotonic()

    def render(self) -> str:
        done = self.completed + self.failed
        filled = self.width * done // self.total if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self._start
        return (
            f"\r[{bar}] {done}/{self.total}  ok {self.completed}  failed {self.failed}  "
            f"in flight {self.in_flight}  {elapsed:6.1f} s"
        )

    def draw(self, final: bool = False) -> None:
        if self.stream is None:
            return
        self.stream.write(self.render() + ("\n" if final else ""))
        self.stream.flush()


async def _send(
    client: httpx.AsyncClient, cfg: ClientConfig, req: PlannedRequest, rec: RequestRecord, t0: float
) -> None:
    body = {
        "model": req.adapter if req.adapter is not None else cfg.base_model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.map_body is not None:
        try:
            body = cfg.map_body(body)
        except (KeyError, ValueError) as exc:
            rec.error = f"not sent: {exc}"[:300]
            return
    start = time.perf_counter()
    rec.sent = time.monotonic() - t0
    last = None
    chunks = 0
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                payload = json.loads(data)
                if "error" in payload:
                    rec.error = f"stream error: {json.dumps(payload['error'])[:300]}"
                    continue
                if payload.get("usage"):
                    rec.prompt_tokens = payload["usage"].get("prompt_tokens")
                    rec.output_tokens = payload["usage"].get("completion_tokens")
                if any(c.get("text") for c in payload.get("choices") or ()):
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itls.append(now - last)
                    last = now
                    chunks += 1
        if rec.error is None and not done:
            rec.error = "stream ended without [DONE]"
        if rec.error is None:
            rec.e2el = time.perf_counter() - start
            if rec.output_tokens is None:
                rec.output_tokens = chunks
    except asyncio.CancelledError:
        rec.error = "aborted: still running at the drain timeout"
        raise
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_plan(
    plan: list[PlannedRequest], cfg: ClientConfig, progress_stream: TextIO | None = sys.stderr
) -> RunResult:
    """Send ``plan`` open loop against ``cfg.url``; one record per request sent (the time bound may stop early)."""
    check_loopback(cfg.url)
    records = [RequestRecord(r.index, r.adapter, r.cold, r.max_tokens) for r in plan]
    progress = Progress(len(plan), progress_stream)
    timeout = httpx.Timeout(cfg.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    tasks: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None

    def finished(task: asyncio.Task, rec: RequestRecord) -> None:
        if slots is not None:
            slots.release()
        progress.in_flight -= 1
        if rec.ok:
            progress.completed += 1
        else:
            progress.failed += 1

    async def draw_forever() -> None:
        while True:
            progress.draw()
            await asyncio.sleep(0.25)

    async with httpx.AsyncClient(base_url=cfg.url, timeout=timeout, limits=limits, trust_env=False) as client:
        drawer = asyncio.create_task(draw_forever())
        t0 = time.monotonic()
        issued = 0
        try:
            for req, rec in zip(plan, records, strict=True):
                delay = t0 + req.at - time.monotonic()
                if cfg.max_duration is not None and req.at >= cfg.max_duration:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                if slots is not None:
                    await slots.acquire()
                if cfg.max_duration is not None and time.monotonic() - t0 >= cfg.max_duration:
                    break
                task = asyncio.create_task(_send(client, cfg, req, rec, t0))
                task.add_done_callback(lambda t, rec=rec: finished(t, rec))
                tasks.add(task)
                progress.in_flight += 1
                issued += 1
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=cfg.drain_timeout)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            duration = time.monotonic() - t0
        finally:
            drawer.cancel()
            await asyncio.gather(drawer, return_exceptions=True)
            for task in tasks:
                task.cancel()
            progress.draw(final=True)
    sent = records[:issued]
    for rec in sent:
        if not rec.ok and rec.error is None:
            rec.error = "aborted: still running at the drain timeout"
    return RunResult(sent, duration, issued)
