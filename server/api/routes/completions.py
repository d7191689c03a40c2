"""``POST /v1/completions``: OpenAI-compatible text completions, streaming or not, one choice per prompt."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from server.api.auth import Key
from server.api.errors import ApiError
from server.api.generation import Generation, request_timeout, sampling_params, tokenize
from server.api.schemas import MAX_PROMPTS, CompletionChoice, CompletionRequest, CompletionResponse
from server.api.state import AppState, State
from server.api.targets import resolve_target
from server.engine.messages import RequestOutput

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, state: State, key: Key, http: HttpRequest):
    """Complete each prompt with the base model, the adapter named by ``model``, or the ``adapters`` composed."""
    prompts = await asyncio.to_thread(_prompts, body, state)
    max_len = state.serving.max_model_len
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = [sampling_params(body, len(ids), max_tokens, max_len) for ids in prompts]
    target = await resolve_target(state.registry, key, body.model, body.adapters, state.max_composed)
    gen = Generation.start(state, target, prompts, params, "cmpl", http, request_timeout(state, body))
    headers = target.headers(await gen.first_output())
    model = body.model or state.serving.model_name

    if body.stream:

        def render(g: Generation, index: int, out: RequestOutput) -> list[dict]:
            if not (out.text or out.finished):
                return []
            choice = {"index": index, "text": out.text, "finish_reason": g.choices[index].finish_reason,
                      "logprobs": None}
            return [_chunk(g, model, [choice])]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage = (lambda u: _chunk(gen, model, [], u.model_dump())) if include_usage else None
        return gen.stream(render, usage, headers)
    choices = await gen.collect()
    response = CompletionResponse(
        id=gen.id,
        created=gen.created,
        model=model,
        choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(choices)],
        usage=gen.usage(),
    )
    return JSONResponse(response.model_dump(), headers=headers)


def _chunk(gen: Generation, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    chunk = {"id": gen.id, "object": "text_completion", "created": gen.created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _prompts(body: CompletionRequest, state: AppState) -> list[list[int]]:
    """Token ids of each prompt: text, ids, or a list of either."""
    prompt = body.prompt
    single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise ApiError(400, "prompt is empty", "invalid_prompt", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(
            400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "invalid_prompt", "prompt"
        )
    vocab = len(state.serving.tokenizer)
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not p:
            raise ApiError(400, f"{where} is empty", "invalid_prompt", "prompt")
        if isinstance(p, str):
            out.append(tokenize(state.serving.tokenizer, p, "prompt"))
            continue
        if any(t < 0 or t >= vocab for t in p):
            raise ApiError(400, f"{where}: token ids must be in [0, {vocab})", "invalid_prompt", "prompt")
        out.append(list(p))
    return out
