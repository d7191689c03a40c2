"""``POST /v1/chat/completions``: messages rendered by the tokenizer's chat template, then generated."""

from __future__ import annotations

import asyncio

import jinja2
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from server.api.auth import Key
from server.api.errors import ApiError
from server.api.generation import Generation, request_timeout, sampling_params, tokenize
from server.api.schemas import ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut
from server.api.state import AppState, State
from server.api.targets import resolve_target
from server.engine.messages import RequestOutput

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, state: State, key: Key, http: HttpRequest):
    """Answer the conversation with the base model, the adapter named by ``model``, or the ``adapters`` composed."""
    prompt = await asyncio.to_thread(_render, body, state)
    max_len = state.serving.max_model_len
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    default = state.serving.config.limits.default_max_tokens
    if max_tokens is None and default and len(prompt) < max_len:
        max_tokens = min(default, max_len - len(prompt))
    params = sampling_params(body, len(prompt), max_tokens, max_len)
    target = await resolve_target(state.registry, key, body.model, body.adapters, state.max_composed)
    gen = Generation.start(state, target, [prompt], [params], "chatcmpl", http, request_timeout(state, body))
    headers = target.headers(await gen.first_output())
    model = body.model or state.serving.model_name

    if body.stream:
        started: set[int] = set()

        def render(g: Generation, index: int, out: RequestOutput) -> list[dict]:
            chunks = []
            if index not in started:
                started.add(index)
                chunks.append(_chunk(g, model, index, {"role": "assistant", "content": ""}, None))
            if out.text:
                chunks.append(_chunk(g, model, index, {"content": out.text}, None))
            if out.finished:
                chunks.append(_chunk(g, model, index, {}, g.choices[index].finish_reason))
            return chunks

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage = (lambda u: _frame(gen, model, [], u.model_dump())) if include_usage else None
        return gen.stream(render, usage, headers)
    choices = await gen.collect()
    response = ChatCompletionResponse(
        id=gen.id,
        created=gen.created,
        model=model,
        choices=[
            ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(choices)
        ],
        usage=gen.usage(),
    )
    return JSONResponse(response.model_dump(), headers=headers)


def _chunk(gen: Generation, model: str, index: int, delta: dict, reason: str | None) -> dict:
    return _frame(gen, model, [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}])


def _frame(gen: Generation, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    frame = {"id": gen.id, "object": "chat.completion.chunk", "created": gen.created, "model": model,
             "choices": choices}
    if usage is not None:
        frame["usage"] = usage
    return frame


def _render(body: ChatCompletionRequest, state: AppState) -> list[int]:
    """The prompt's token ids through the chat template; 400 naming what the template refused."""
    tokenizer = state.serving.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400, "the base model's tokenizer has no chat template; use /v1/completions", "no_chat_template"
        )
    if body.continue_final_message and (body.add_generation_prompt or body.messages[-1].role != "assistant"):
        raise ApiError(
            400,
            "continue_final_message needs the last message to be the assistant's and add_generation_prompt false",
            "invalid_messages",
            "messages",
        )
    messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
        )
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise ApiError(400, f"the chat template refused the messages: {exc}", "invalid_messages", "messages") from None
    ids = tokenize(tokenizer, text, "messages", add_special_tokens=False)
    if not ids:
        raise ApiError(400, "the messages render to an empty prompt", "invalid_messages", "messages")
    return ids
