"""``POST /v1/completions``: OpenAI-compatible text completions, streaming or not, ``n`` choices per prompt."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from server.api import structured_output
from server.api.auth import Key
from server.api.errors import ApiError
from server.api.generation import Choice, Generation, request_timeout, sampling_params, tokenize
from server.api.logprobs_format import TokenTexts, completion_logprobs, prompt_logprobs
from server.api.schemas import MAX_PROMPTS, CompletionChoice, CompletionRequest, CompletionResponse
from server.api.state import AppState, State
from server.api.targets import resolve_target
from server.engine.messages import RequestOutput

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, state: State, key: Key, http: HttpRequest):
    """Complete each prompt with the base model, the adapter named by ``model``, or the ``adapters`` composed."""
    prompts, texts = await asyncio.to_thread(_prompts, body, state)
    max_len = state.serving.max_model_len
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    # echo with logprobs scores the prompt too: its log-probs are computed with as many alternatives
    scored = max(body.logprobs, body.prompt_logprobs or 0) if body.echo and body.logprobs is not None else None
    prompt_lp = body.prompt_logprobs if scored is None else scored
    params = [
        sampling_params(body, len(ids), max_tokens, max_len, state.serving.vocab_size, body.logprobs, prompt_lp)
        for ids in prompts
    ]
    grammar = await structured_output.compile_constraint(
        state.serving.grammars, structured_output.one(structured_output.requested(body))
    )
    n = body.choices_per_prompt
    copies = body.best_of or n
    target = await resolve_target(state.registry, key, body.model, body.adapters, state.max_composed)
    gen = Generation.start(state, target, prompts, params, "cmpl", http, request_timeout(state, body),
                           copies=copies, grammar=grammar, rank_by_logprob=copies > n)
    headers = target.headers(await gen.first_output())
    model = body.model or state.serving.model_name
    shape = _Shape(body, TokenTexts(state.serving.grammars), prompts, texts)

    if body.stream:
        offsets: dict[int, int] = {}

        def render(g: Generation, index: int, out: RequestOutput) -> list[dict]:
            first = index not in offsets
            text = (texts[index // copies] if body.echo and first else "") + out.text
            if not (text or out.finished or out.logprobs):
                return []
            choice = {"index": index, "text": text, "finish_reason": g.choices[index].finish_reason,
                      "logprobs": None}
            if body.logprobs is not None:
                entries = (shape.echoed(index // copies, out.prompt_logprobs or ()) if body.echo and first else [])
                choice["logprobs"] = completion_logprobs(
                    [*entries, *out.logprobs], shape.texts, offsets.get(index, 0), prompts[index // copies][0]
                )
            offsets[index] = offsets.get(index, 0) + len(text)
            if first and body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = shape.prompt(out.prompt_logprobs or ())
            return [_chunk(g, model, [choice])]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage = (lambda u: _chunk(gen, model, [], u.model_dump())) if include_usage else None
        return gen.stream(render, usage, headers)
    choices = await gen.collect()
    out: list[CompletionChoice] = []
    for p in range(len(prompts)):
        group = choices[p * copies : (p + 1) * copies]
        if copies > n:  # best_of: the n candidates with the highest sum of token log-probs
            group = sorted(group, key=_cumulative_logprob, reverse=True)
        out.extend(shape.choice(p, len(out), c) for c in group[:n])
    response = CompletionResponse(id=gen.id, created=gen.created, model=model, choices=out, usage=gen.usage())
    return JSONResponse(response.model_dump(exclude_none=False), headers=headers)


class _Shape:
    """One prompt's choice as the response shows it: echo, logprobs, prompt_logprobs."""

    def __init__(self, body: CompletionRequest, texts: TokenTexts, prompts: list[list[int]],
                 prompt_texts: list[str]) -> None:
        self.body, self.texts, self.prompts, self.prompt_texts = body, texts, prompts, prompt_texts

    def echoed(self, prompt: int, scored: tuple) -> list:
        return [None, *scored] if len(scored) == len(self.prompts[prompt]) - 1 else []

    def prompt(self, scored: tuple) -> list:
        k = self.body.prompt_logprobs or 0
        return prompt_logprobs([replace(e, top=e.top[:k]) for e in scored], self.texts)

    def choice(self, prompt: int, index: int, c: Choice) -> CompletionChoice:
        body = self.body
        echo = self.prompt_texts[prompt] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            entries = self.echoed(prompt, c.prompt_logprobs) if body.echo else []
            logprobs = completion_logprobs([*entries, *c.logprobs], self.texts, 0, self.prompts[prompt][0])
        return CompletionChoice(
            index=index, text=echo + c.text, finish_reason=c.finish_reason, logprobs=logprobs,
            prompt_logprobs=self.prompt(c.prompt_logprobs) if body.prompt_logprobs is not None else None,
        )


def _cumulative_logprob(choice: Choice) -> float:
    out = choice.last
    return out.cumulative_logprob if out is not None and out.cumulative_logprob is not None else float("-inf")


def _chunk(gen: Generation, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    chunk = {"id": gen.id, "object": "text_completion", "created": gen.created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _prompts(body: CompletionRequest, state: AppState) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt (text, ids, or a list of either), and each prompt's text (for echo)."""
    prompt = body.prompt
    single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise ApiError(400, "prompt is empty", "invalid_prompt", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(
            400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "invalid_prompt", "prompt"
        )
    tokenizer = state.serving.tokenizer
    vocab = len(tokenizer)
    out: list[list[int]] = []
    texts: list[str] = []
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not p:
            raise ApiError(400, f"{where} is empty", "invalid_prompt", "prompt")
        if isinstance(p, str):
            out.append(tokenize(tokenizer, p, "prompt"))
            texts.append(p)
            continue
        if any(t < 0 or t >= vocab for t in p):
            raise ApiError(400, f"{where}: token ids must be in [0, {vocab})", "invalid_prompt", "prompt")
        out.append(list(p))
        texts.append(tokenizer.decode(p) if body.echo else "")
    return out, texts
