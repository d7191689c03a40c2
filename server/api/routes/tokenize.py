"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's routes and bodies).

Every adapter shares the base model's tokenizer, so ``model`` changes no token;
it is still checked as a completion checks it (the API key's adapters, 404 for
an unknown adapter), so a client gets here the answer generation would give.
Nothing runs on the engine.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.api.auth import Key
from server.api.errors import ApiError
from server.api.generation import tokenize
from server.api.keys import ApiKey
from server.api.routes.chat import _render as render_chat
from server.api.state import AppState, State
from server.api.targets import resolve_target
from server.api.tokenize_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizePromptRequest,
    TokenizeResponse,
)

router = APIRouter()
SHOWN_BAD_IDS = 10


@router.post("/tokenize", response_model=TokenizeResponse)
async def create_tokenize(
    body: Annotated[dict, Body(description="{model, prompt, ...} or {model, messages, add_generation_prompt, ...}")],
    state: State,
    key: Key,
) -> TokenizeResponse:
    """Token ids of a text ``prompt`` (as /v1/completions sees it) or of ``messages`` through the chat template
    (as /v1/chat/completions sees them), their count, and the context limit."""
    request = _parse(body)
    await _check_model(state, key, request.model)
    ids = await asyncio.to_thread(_token_ids, request, state)
    strs = state.serving.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.serving.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def create_detokenize(body: DetokenizeRequest, state: State, key: Key) -> DetokenizeResponse:
    """The text of ``tokens`` (special tokens kept, so it tokenizes back to the same ids where the tokenizer allows)."""
    await _check_model(state, key, body.model)
    tokenizer = state.serving.tokenizer
    vocab = len(tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        shown = ", ".join(str(t) for t in bad[:SHOWN_BAD_IDS])
        more = f" and {len(bad) - SHOWN_BAD_IDS} more" if len(bad) > SHOWN_BAD_IDS else ""
        raise ApiError(
            400, f"tokens: ids outside the vocabulary [0, {vocab}): {shown}{more}", "invalid_tokens", "tokens"
        )
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))


def _parse(body: dict) -> TokenizePromptRequest | TokenizeChatRequest:
    """The chat form when ``messages`` is given, else the prompt form; errors as for any malformed body."""
    form = TokenizeChatRequest if "messages" in body else TokenizePromptRequest
    try:
        return form.model_validate(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]  # as FastAPI's own
        raise RequestValidationError(errors, body=body) from None


async def _check_model(state: AppState, key: ApiKey | None, model: str | None) -> None:
    """404 for an unknown adapter, 403 for one outside the key's adapters, as generation answers."""
    target = await resolve_target(state.registry, key, model or "", None, state.max_composed)
    target.lease.release()


def _token_ids(request: TokenizePromptRequest | TokenizeChatRequest, state: AppState) -> list[int]:
    if isinstance(request, TokenizeChatRequest):
        return render_chat(request, state)  # the same fields as a chat completion's, read the same way
    return tokenize(state.serving.tokenizer, request.prompt, "prompt", add_special_tokens=request.add_special_tokens)
