"""The HTTP surface every baseline shares: OpenAI completions (SSE or not), models, health, and the CLI.

Handlers never touch torch: they tokenize, build a :class:`~loadtests.baselines.worker.Job`,
submit it to the worker thread and relay its events. Only what the load tests need is
served: ``POST /v1/completions`` with one prompt (text or token ids), greedy decoding
(``temperature`` 0), ``max_tokens`` (default 16), ``ignore_eos``, ``stop`` and
``stream_options.include_usage``; anything else is a 400 rather than silently ignored.
A streaming client that goes away cancels its job (its row is no longer emitted, though
``generate`` still computes it until the batch ends); a non-streaming one runs to the end.
The port is bound only once the model is loaded, so ``/health`` (and ``/ready``) mean ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from loadtests.baselines.worker import Job, Worker
from loadtests.bench.common import CACHE_DIR, setup_torch
from server.api.errors import ApiError, error_body, error_response

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions, as in loraplex
GREEDY_BELOW = 1e-5


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionBody(BaseModel):
    model: str = ""
    prompt: str | list[int]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=1)


def create_app(worker: Worker) -> FastAPI:
    """The baseline's app; ``worker`` must be loaded (``ready``). Stops the worker on shutdown."""
    assert worker.loaded is not None, "the worker has not loaded the model"
    base_name = worker.loaded.name
    tokenizer = worker.loaded.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()

    app = FastAPI(title=f"loraplex baseline: {type(worker).__name__}", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, str(exc.errors()), "invalid_request")

    @app.get("/health")
    @app.get("/ready")
    async def health() -> dict:
        """Alive, and (the port is bound only after loading) ready."""
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        cards = [{"id": base_name, "object": "model", "created": now, "owned_by": "baseline", "parent": None}]
        cards += [
            {"id": name, "object": "model", "created": now, "owned_by": "baseline", "parent": base_name}
            for name in worker.adapters
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        """Complete one prompt greedily with the base model or the adapter named by ``model``."""
        adapter = _adapter(body.model, base_name, worker.adapters)
        if body.temperature >= GREEDY_BELOW:
            raise ApiError(400, "baselines decode greedily only: send temperature 0", "unsupported_parameter",
                           "temperature")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream: true", "invalid_request", "stream_options")
        ids = tokenizer(body.prompt)["input_ids"] if isinstance(body.prompt, str) else list(body.prompt)
        if not ids:
            raise ApiError(400, "prompt is empty", "invalid_prompt", "prompt")
        if any(t < 0 or t >= len(tokenizer) for t in ids):
            raise ApiError(400, f"token ids must be in [0, {len(tokenizer)})", "invalid_prompt", "prompt")
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if len(ids) + max_tokens > worker.max_model_len:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context limit "
                           f"of {worker.max_model_len} tokens", "context_length_exceeded", "max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        job = Job(adapter, ids, max_tokens, body.ignore_eos, stop, loop=asyncio.get_running_loop())
        worker.submit(job)
        model = body.model or base_name
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, chunk, include_usage), media_type="text/event-stream")
        text, reason = [], None
        try:
            while reason is None:
                event = await job.events.get()
                if event.error is not None:
                    raise ApiError(500, event.error, "internal")
                text.append(event.text)
                reason = event.finish_reason
        finally:
            job.cancelled = job.cancelled or reason is None
        choice = {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None}
        return chunk([choice], _usage(job))

    return app


def _adapter(model: str, base_name: str, adapters: list[str]) -> str | None:
    """The adapter ``model`` names (None: the base model); 404 for an unknown one."""
    if model in ("", base_name):
        return None
    name = model.removeprefix(f"{base_name}:")
    if name not in adapters:
        raise ApiError(404, f"the model '{model}' does not exist", "model_not_found", "model")
    return name


def _usage(job: Job) -> dict:
    prompt, completion = len(job.prompt_ids), len(job.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(job: Job, chunk: Callable[..., dict], include_usage: bool) -> AsyncIterator[bytes]:
    """The job's events as SSE: text chunks, the finishing chunk, the usage chunk if asked, ``[DONE]``.

    A client that goes away closes this generator, which cancels the job.
    """
    try:
        while True:
            event = await job.events.get()
            if event.error is not None:
                yield _frame(error_body(500, event.error, "internal"))
                break
            if event.text or event.finish_reason:
                choice = {"index": 0, "text": event.text, "finish_reason": event.finish_reason, "logprobs": None}
                yield _frame(chunk([choice]))
            if event.finish_reason:
                if include_usage:
                    yield _frame(chunk([], _usage(job)))
                break
        yield b"data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a no-op once finished


def _frame(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


# -- command line -------------------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="a transformers directory or .gguf (default: loraplex's default)")
    p.add_argument("--adapters-dir", type=Path, required=True, help="one PEFT adapter per subfolder, named by it")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--max-batch", type=int, default=32, help="most requests in one generate call")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where loraplex caches the converted GGUF")
    p.add_argument("--log-level", default="info")
    return p


def serve(worker: Worker, port: int, log_level: str) -> None:
    """Load on the worker thread, then serve on 127.0.0.1:``port`` until SIGINT/SIGTERM. Exit 1 if loading fails."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_torch()
    started = time.monotonic()
    worker.start()
    worker.ready.wait()
    if worker.load_error is not None:
        log.error("could not load: %s", worker.load_error)
        sys.exit(1)
    log.info("loaded in %.1f s; serving on http://127.0.0.1:%d", time.monotonic() - started, port)
    uvicorn.run(create_app(worker), host="127.0.0.1", port=port, log_level="warning")
