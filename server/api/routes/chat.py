"""``POST /v1/chat/completions``: messages rendered by the tokenizer's chat template, then generated."""

from __future__ import annotations

import asyncio

import jinja2
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from server.api import structured_output, tool_calls
from server.api.auth import Key
from server.api.errors import ApiError
from server.api.generation import Choice, Generation, request_timeout, sampling_params, tokenize
from server.api.logprobs_format import TokenTexts, chat_content, prompt_logprobs
from server.api.schemas import ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut
from server.api.state import AppState, State
from server.api.targets import resolve_target
from server.engine.logprobs import TokenLogprob
from server.engine.messages import RequestOutput

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, state: State, key: Key, http: HttpRequest):
    """Answer the conversation with the base model, the adapter named by ``model``, or the ``adapters`` composed."""
    tokenizer = state.serving.tokenizer
    how = tool_calls.mode(body)
    tool_calls.check_template(tokenizer, how)
    prompt = await asyncio.to_thread(_render, body, state, how)
    max_len = state.serving.max_model_len
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    default = state.serving.config.limits.default_max_tokens
    if max_tokens is None and default and len(prompt) < max_len:
        max_tokens = min(default, max_len - len(prompt))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, len(prompt), max_tokens, max_len, state.serving.vocab_size, logprobs,
                             body.prompt_logprobs)
    constraints = structured_output.requested(body)
    forced = tool_calls.constraint(body, how)
    grammar = await structured_output.compile_constraint(
        state.serving.grammars, structured_output.one(constraints + ([forced] if forced else []))
    )
    target = await resolve_target(state.registry, key, body.model, body.adapters, state.max_composed)
    gen = Generation.start(state, target, [prompt], [params], "chatcmpl", http, request_timeout(state, body),
                           copies=body.choices_per_prompt, grammar=grammar)
    headers = target.headers(await gen.first_output())
    model = body.model or state.serving.model_name
    texts = TokenTexts(state.serving.grammars)

    if body.stream:
        stream = _Stream(body, how, model, texts)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage = (lambda u: _frame(gen, model, [], u.model_dump())) if include_usage else None
        return gen.stream(stream.render, usage, headers)
    choices = await gen.collect()
    response = ChatCompletionResponse(
        id=gen.id,
        created=gen.created,
        model=model,
        choices=[_choice(body, how, i, c, texts) for i, c in enumerate(choices)],
        usage=gen.usage(),
    )
    return JSONResponse(response.model_dump(), headers=headers)


def _choice(body: ChatCompletionRequest, how: tool_calls.Mode, index: int, c: Choice, texts: TokenTexts) -> ChatChoice:
    content, calls = tool_calls.parse(c.text, how, body)
    reason = "tool_calls" if calls and how in ("auto", "required") else c.finish_reason
    return ChatChoice(
        index=index,
        message=ChatMessageOut(content=content, tool_calls=calls),
        finish_reason=reason,
        logprobs=_logprobs(body, c.logprobs, texts),
        prompt_logprobs=prompt_logprobs(c.prompt_logprobs, texts) if body.prompt_logprobs is not None else None,
    )


def _logprobs(body: ChatCompletionRequest, entries: list[TokenLogprob], texts: TokenTexts) -> dict | None:
    return {"content": chat_content(entries, texts)} if body.logprobs else None


class _Stream:
    """Chunks of a streamed answer. Text streams as it comes; a named tool's arguments stream as its call's
    ``arguments``; with ``"auto"`` or ``"required"`` the answer is held to its end, then sent as calls (or as
    text when it holds none)."""

    def __init__(self, body: ChatCompletionRequest, how: tool_calls.Mode, model: str, texts: TokenTexts) -> None:
        self.body, self.how, self.model, self.texts = body, how, model, texts
        self.started: set[int] = set()
        self.call_ids: dict[int, str] = {}

    def render(self, g: Generation, index: int, out: RequestOutput) -> list[dict]:
        body, choice = self.body, g.choices[index]
        chunks = []
        if index not in self.started:
            self.started.add(index)
            first = {"role": "assistant", "content": ""}
            chunks.append(_chunk(g, self.model, index, first, None, prompt=self._prompt(out)))
        if self.how in ("auto", "required"):
            if out.finished:
                content, calls = tool_calls.parse(choice.text, self.how, body)
                delta: dict = {"content": content} if not calls else {
                    "tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                reason = "tool_calls" if calls else choice.finish_reason
                chunks.append(_chunk(g, self.model, index, delta, None, _logprobs(body, choice.logprobs, self.texts)))
                chunks.append(_chunk(g, self.model, index, {}, reason))
            return chunks
        if out.text or out.logprobs:
            delta = {"content": out.text} if self.how == "none" else {"tool_calls": [self._call_delta(index, out)]}
            chunks.append(_chunk(g, self.model, index, delta, None, _logprobs(body, list(out.logprobs), self.texts)))
        if out.finished:
            chunks.append(_chunk(g, self.model, index, {}, choice.finish_reason))
        return chunks

    def _call_delta(self, index: int, out: RequestOutput) -> dict:
        if index in self.call_ids:
            return {"index": 0, "function": {"arguments": out.text}}
        assert self.body.tool_choice is not None and not isinstance(self.body.tool_choice, str)
        call = tool_calls.call(self.body.tool_choice.function.name, out.text)
        self.call_ids[index] = call["id"]
        return {"index": 0, **call}

    def _prompt(self, out: RequestOutput) -> list | None:
        if self.body.prompt_logprobs is None:
            return None
        return prompt_logprobs(out.prompt_logprobs or (), self.texts)


def _chunk(gen: Generation, model: str, index: int, delta: dict, reason: str | None, logprobs: dict | None = None,
           prompt: list | None = None) -> dict:
    choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
    if prompt is not None:
        choice["prompt_logprobs"] = prompt
    return _frame(gen, model, [choice])


def _frame(gen: Generation, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    frame = {"id": gen.id, "object": "chat.completion.chunk", "created": gen.created, "model": model,
             "choices": choices}
    if usage is not None:
        frame["usage"] = usage
    return frame


def _render(body: ChatCompletionRequest, state: AppState, how: tool_calls.Mode = "none") -> list[int]:
    """The prompt's token ids through the chat template; 400 naming what the template refused. ``/tokenize``
    renders its messages here too (without tools)."""
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
    tools = None
    if how != "none" and body.tools and tool_calls.renders_tools(tokenizer):
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
    try:
        text = tokenizer.apply_chat_template(
            tool_calls.template_messages(body.messages),
            tools=tools,
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
