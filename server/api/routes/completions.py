"""``POST /v1/completions``: OpenAI-compatible text completions, streaming or not."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from adapters_store.backend import StoredAdapter
from server.api.errors import ApiError, error_body, unavailable
from server.api.schemas import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from server.api.state import AppState, State
from server.engine.messages import RequestOutput
from server.engine.request import ErrorKind, Request, SamplingParams

router = APIRouter()


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, state: State, http: HttpRequest):
    """Complete ``prompt`` with the base model or the adapter named by ``model``."""
    # File reads and hashing on first sight of an adapter version: off the event loop.
    lease = await asyncio.to_thread(state.registry.resolve, body.model)
    adapter = lease.adapter if lease else None
    try:
        prompt_ids = _prompt_ids(body, state)
        params = _sampling(body, len(prompt_ids), state.serving.max_model_len)
    except BaseException:
        if lease:
            lease.release()
        raise
    request_id = f"cmpl-{uuid.uuid4().hex}"
    req = Request(request_id=request_id, prompt_ids=prompt_ids, params=params, adapter=adapter)
    outputs = state.client.generate(req, on_finish=lease.release if lease else None)
    first = await _first_output(outputs, http)
    headers = _adapter_headers(adapter, first)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _sse(first, outputs, request_id, body.model or state.serving.model_name, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    text, last = first.text, first
    async for out in _until_disconnect(outputs, http):
        text += out.text
        last = out
    if last.error is not None:
        raise request_error(last)
    response = CompletionResponse(
        id=request_id,
        created=int(time.time()),
        model=body.model or state.serving.model_name,
        choices=[CompletionChoice(text=text, finish_reason=_reason(last))],
        usage=_usage(last),
    )
    return JSONResponse(response.model_dump(), headers=headers)


def _prompt_ids(body: CompletionRequest, state: AppState) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "only one prompt per request is supported", "invalid_prompt", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty", "invalid_prompt", "prompt")
        return state.serving.tokenizer(prompt)["input_ids"]
    if not prompt:
        raise ApiError(400, "prompt is empty", "invalid_prompt", "prompt")
    vocab = len(state.serving.tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "invalid_prompt", "prompt")
    return list(prompt)


def _sampling(body: CompletionRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    if prompt_len >= max_model_len:
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens; the context limit is {max_model_len} tokens (prompt + max_tokens)",
            "context_length_exceeded",
            "prompt",
        )
    max_tokens = body.max_tokens or 16
    if prompt_len + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context limit of "
            f"{max_model_len} tokens",
            "context_length_exceeded",
            "max_tokens",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_sampling_parameters") from None


async def _first_output(outputs: AsyncIterator[RequestOutput], http: HttpRequest) -> RequestOutput:
    out = await _next_or_disconnect(outputs, http)
    if out is None:
        await outputs.aclose()
        raise ApiError(499, "client disconnected", "client_closed_request")
    if out.error is not None:
        await outputs.aclose()
        raise request_error(out)
    return out


def request_error(out: RequestOutput) -> ApiError:
    """The HTTP error for a request the engine failed."""
    message = out.error or "the request failed"
    kind = out.error_kind or ErrorKind.INVALID
    if kind is ErrorKind.UNAVAILABLE:
        return unavailable(message, kind.value, retry_after=5)
    return ApiError(500 if kind is ErrorKind.INTERNAL else 400, message, kind.value)


async def _until_disconnect(outputs: AsyncIterator[RequestOutput], http: HttpRequest) -> AsyncIterator[RequestOutput]:
    """Yield outputs; stop, aborting the request, as soon as the client goes away."""
    try:
        while (out := await _next_or_disconnect(outputs, http)) is not None:
            yield out
            if out.finished:
                return
    finally:
        await outputs.aclose()


async def _next_or_disconnect(outputs: AsyncIterator[RequestOutput], http: HttpRequest) -> RequestOutput | None:
    """The next output, or None when the stream ended or the client disconnected first."""
    nxt = asyncio.ensure_future(anext(outputs))
    watch = asyncio.ensure_future(_wait_disconnect(http))
    try:
        await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not nxt.done():
        nxt.cancel()
        return None
    try:
        return nxt.result()
    except StopAsyncIteration:
        return None


async def _wait_disconnect(http: HttpRequest) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.5)


async def _sse(
    first: RequestOutput,
    outputs: AsyncIterator[RequestOutput],
    request_id: str,
    model: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """SSE chunks; a client disconnect cancels this generator, and closing ``outputs`` aborts the request."""
    created = int(time.time())

    def chunk(text: str, reason: str | None, usage: Usage | None = None, choices: bool = True) -> bytes:
        body = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}] if choices else [],
        }
        if include_usage:
            body["usage"] = usage.model_dump() if usage else None
        return f"data: {json.dumps(body)}\n\n".encode()

    last = first
    try:
        if first.text or first.finished:
            yield chunk(first.text, _reason(first))
        if not first.finished:
            async for out in outputs:
                last = out
                if out.error is not None:
                    yield f"data: {json.dumps(error_body(500, out.error, 'request_failed'))}\n\n".encode()
                    break
                if out.text or out.finished:
                    yield chunk(out.text, _reason(out))
        if include_usage and last.finished:
            yield chunk("", None, _usage(last), choices=False)
        yield b"data: [DONE]\n\n"
    finally:
        await outputs.aclose()


def _reason(out: RequestOutput) -> str | None:
    if not out.finished or out.finish_reason is None:
        return None
    return out.finish_reason.value


def _usage(out: RequestOutput) -> Usage:
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
    )


def _adapter_headers(adapter: StoredAdapter | None, first: RequestOutput) -> dict[str, str]:
    if adapter is None:
        return {}
    return {"x-loraplex-adapter": adapter.ref, "x-loraplex-adapter-cache": first.adapter_tier or "disk"}
